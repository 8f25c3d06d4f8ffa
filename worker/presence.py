"""A worker step that keeps this worker's row in the ``workers`` table while it runs (service/workers.py).

The worker's main process announces its queues, pool size and GPUs every heartbeat
interval from a thread of its own, and withdraws as it shuts down; a worker killed
outright just stops announcing and ages out after the heartbeat timeout. Its slots count
for the fair scheduler from its first announcement, which is followed by a scheduling
round of its queues: a new worker gets jobs at once, not at the reconciler's next round.
"""

import logging
import threading
from typing import ClassVar

from celery import bootsteps

from service import fleet, scheduler, workers
from service.db import get_engine, get_sessionmaker
from service.queue import enqueue_many
from service.settings import get_settings

log = logging.getLogger("nclab.worker")


class Presence(bootsteps.StartStopStep):
    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker) -> None:
        name = worker.hostname
        queues = sorted(worker.app.amqp.queues.consume_from)
        gpus = fleet.pinned_gpus() or None
        settings = get_settings()

        def announce_forever() -> None:
            first = True
            while True:
                try:
                    with get_sessionmaker()() as session:
                        workers.announce(session, name, queues, worker.concurrency, gpus)
                        if first and settings.scheduler == "fair":
                            scheduler.run_rounds(session, queues, settings, enqueue_many)
                        first = False
                except Exception:
                    # A missed announcement is recoverable: a worker ages out only after the heartbeat timeout.
                    log.exception("could not announce worker %s", name)
                finally:
                    # This is the process that forks the pool: it keeps no connection open between
                    # announcements for a new pool process to inherit (service/db.py).
                    get_engine().dispose()
                if self._stop.wait(settings.heartbeat_interval):
                    return

        self._thread = threading.Thread(target=announce_forever, name="nclab-presence", daemon=True)
        self._thread.start()
        log.info("worker %s serves queues %s with %d processes", name, ",".join(queues), worker.concurrency)

    def stop(self, worker) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with get_sessionmaker()() as session:
                workers.withdraw(session, worker.hostname)
        except Exception:
            log.exception("could not withdraw worker %s; it ages out after the heartbeat timeout", worker.hostname)
