"""A running job's heartbeat: a thread that keeps the job's row alive while it computes.

It writes ``heartbeat_at`` and the latest progress every ``interval`` seconds, and raises
the stop flag when the row says the attempt should end (a cancel was asked for, or the
reconciler gave the job to another attempt). The computation only reads the flag, so a
long matrix product never delays a heartbeat and cancel costs nothing per iteration.

It also raises the flag when no beat has been written for the heartbeat timeout (the
database is unreachable, or this worker is cut off from it): by then the reconciler has
given the job to another attempt, and this one stops rather than go on writing files
(checkpoints, weights) into the experiment's directory beside its successor.
"""

import logging
import threading
import time

from service import jobs
from service.db import get_sessionmaker

log = logging.getLogger("nclab.heartbeat")


class Heartbeat:
    def __init__(self, experiment_id: str, attempt: int, interval: float, timeout: float):
        self.experiment_id = experiment_id
        self.attempt = attempt
        self.interval = interval
        self.timeout = timeout
        self.progress = 0.0
        self.stop_requested = threading.Event()
        self.lost = threading.Event()  # stopped because no beat could be written: the attempt is given back
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{experiment_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        last_beat = time.monotonic()
        while not self._done.wait(self.interval):
            try:
                with get_sessionmaker()() as session:
                    keep_going = jobs.heartbeat(session, self.experiment_id, self.attempt, self.progress)
            except Exception:
                silent_for = time.monotonic() - last_beat
                if silent_for < self.timeout:
                    # A missed beat is recoverable; the reconciler only acts after heartbeat_timeout.
                    log.exception("heartbeat failed for %s", self.experiment_id)
                    continue
                log.error(
                    "no heartbeat written for %s in %.0f s (the timeout is %g s): the job is presumed lost and "
                    "given to another attempt; attempt %d stops",
                    self.experiment_id,
                    silent_for,
                    self.timeout,
                    self.attempt,
                )
                self.lost.set()
                keep_going = False
            else:
                last_beat = time.monotonic()
            if not keep_going:
                self.stop_requested.set()
