"""Re-send the queued jobs whenever the worker (re)connects to its broker.

A broker that restarts without its data (Redis with no persistence) loses the messages
of queued jobs. The database still says they are queued, and the reconciler would
re-send them, but only after RESEND_AFTER (minutes). A worker that has just connected
is the moment to know better: it marks every queued job as never sent, and the
reconciler's next round (RECONCILE_INTERVAL, seconds) sends them again. A message that
did survive becomes a duplicate, which the conditional claim makes harmless.
"""

import logging
from typing import ClassVar

from celery import bootsteps

from service import jobs
from service.db import get_engine, get_sessionmaker

log = logging.getLogger("nclab.worker")


class ResendQueuedOnConnect(bootsteps.StartStopStep):
    """A consumer step: Celery starts it on every connection to the broker, the first and each after a loss."""

    requires: ClassVar[set[str]] = {"celery.worker.consumer.connection:Connection"}

    def start(self, consumer) -> None:
        try:
            with get_sessionmaker()() as session:
                count = jobs.forget_sends(session)
        except Exception:
            # The reconciler's own re-send delay still covers these jobs.
            log.exception("could not mark the queued jobs for re-sending")
            return
        finally:
            # This is the worker's main process, which forks the pool's processes: it keeps no
            # connection open for a new pool process to inherit (service/db.py).
            get_engine().dispose()
        if count:
            log.info("connected to the broker: %d queued jobs will be sent again", count)
