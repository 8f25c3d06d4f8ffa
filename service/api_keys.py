"""The API keys in force: NCLAB_API_KEYS and the file NCLAB_API_KEYS_FILE names, which is re-read when it changes.

The file holds the same ``owner:key[:role]`` entries, one a line (blank lines and ``#``
comments allowed), so that a key is added or revoked without a restart. Its modification
time and size are looked at no more than once every CHECK_INTERVAL seconds per process (a
submit must not pay a ``stat`` each time). A file that no longer parses, or cannot be read,
leaves the last good set in force and says why in the log: a typo must not lock the lab
out. Naming a file turns authentication on, even while the file holds no key.
"""

import logging
import threading
import time
from pathlib import Path

from service.identity import Caller, parse_entries

log = logging.getLogger("nclab.api_keys")

CHECK_INTERVAL = 1.0  # seconds


def read_file(path: Path) -> dict[str, Caller]:
    """The entries of a keys file, comments and blank lines left out; OSError, or InvalidKeyEntry naming the line."""
    entries = [line.partition("#")[0] for line in path.read_text().splitlines()]
    callers: dict[str, Caller] = {}
    for number, entry in enumerate(entries, start=1):
        try:
            callers |= parse_entries(entry)
        except ValueError as exc:
            raise type(exc)(f"{path}, line {number}: {exc}") from None
    return callers


class KeyRing:
    def __init__(self, entries: str, file: Path | None):
        self._from_settings = parse_entries(entries)
        self._file = file
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        self._seen: tuple[int, int] | None = None  # the file's (mtime, size) when it was last read
        self._callers = self._from_settings
        if file is not None:
            try:
                self._seen = self._signature(file)
                self._callers = self._from_settings | read_file(file)
            except OSError as exc:
                raise ValueError(f"NCLAB_API_KEYS_FILE: cannot read the keys file: {exc}") from None

    @property
    def authenticating(self) -> bool:
        """Whether a key is needed: keys are set, or a file of them is named."""
        return self._file is not None or bool(self._from_settings)

    def callers(self) -> dict[str, Caller]:
        """API key -> its owner and role, the file's entries as it was at most CHECK_INTERVAL seconds ago."""
        if self._file is not None and time.monotonic() - self._checked_at >= CHECK_INTERVAL:
            self._reload_if_changed(self._file)
        return self._callers

    @staticmethod
    def _signature(file: Path) -> tuple[int, int]:
        stat = file.stat()
        return stat.st_mtime_ns, stat.st_size

    def _reload_if_changed(self, file: Path) -> None:
        if not self._lock.acquire(blocking=False):
            return  # another thread is looking: this request uses the set in force
        try:
            self._checked_at = time.monotonic()
            try:
                signature = self._signature(file)
                if signature == self._seen:
                    return
                self._seen = signature
                from_file = read_file(file)
                self._callers = self._from_settings | from_file
                log.info("read %d keys from %s", len(from_file), file)
            except (OSError, ValueError) as exc:
                log.error("NCLAB_API_KEYS_FILE: %s; the keys read before stay in force", exc)
        finally:
            self._lock.release()
