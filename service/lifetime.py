"""Child processes that end with their parent (Linux's PR_SET_PDEATHSIG).

uvicorn's worker processes and Celery's pool processes are children of a supervising
process. If that process is killed outright (kill -9), nothing tells them: an API
worker goes on serving a port nobody manages, a pool process goes on with a job whose
heartbeat has stopped. Asking the kernel to signal them when their parent dies closes
that gap without a watchdog thread.
"""

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (no-op where unsupported)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os.kill(os.getpid(), sig)  # the parent died before the request took effect


def is_spawned_child() -> bool:
    """Whether this process was started by multiprocessing (a uvicorn worker under --workers)."""
    return multiprocessing.parent_process() is not None


def children(pid: int) -> set[int]:
    """The live (not zombie) child processes of ``pid``, read from /proc (for tests and bench/chaos.py)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found
