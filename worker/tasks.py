"""The one Celery task: run an experiment whose row says it is queued.

The row, not the message, decides: a message for a job that is not queued (a duplicate,
a redelivery, a canceled job) does nothing. Failures end the job ``failed`` with a
readable error; a worker that dies mid-run leaves a stale heartbeat, which the
reconciler turns into a re-queue (or a failure once the attempts are used up).
"""

import logging
import os
import signal
import socket
import traceback

from celery.signals import worker_process_init
from pydantic import TypeAdapter
from sqlalchemy.exc import InterfaceError, OperationalError

from service import jobs
from service.db import get_sessionmaker
from service.lifetime import die_with_parent
from service.queue import RUN_EXPERIMENT, celery_app
from service.schemas import ExperimentSpec
from service.settings import get_settings
from worker import runners
from worker.heartbeat import Heartbeat
from worker.memory import retain_freed_memory
from worker.nc.ufm import Diverged, Stopped

log = logging.getLogger("nclab.worker")
SPECS = TypeAdapter(ExperimentSpec)


@worker_process_init.connect
def prepare_pool_process(**_) -> None:
    retain_freed_memory()
    # A pool process whose worker was killed outright stops at once: the reconciler
    # re-queues its job, which must not go on running unowned.
    die_with_parent(signal.SIGKILL)


# While the database is unreachable a message cannot be claimed: it goes back to the
# queue this many seconds later, as often as it takes (the row still says queued).
CLAIM_RETRY_SECONDS = 2.0


@celery_app.task(name=RUN_EXPERIMENT, bind=True, max_retries=None)
def run_experiment(self, experiment_id: str) -> None:
    sessions = get_sessionmaker()
    try:
        with sessions() as session:
            job = jobs.claim(session, experiment_id, worker=f"{socket.gethostname()} pid {os.getpid()}")
    except (OperationalError, InterfaceError) as exc:
        log.warning("experiment %s: the database is unreachable (%s); retrying in %g s",
                    experiment_id, exc.__class__.__name__, CLAIM_RETRY_SECONDS)
        raise self.retry(countdown=CLAIM_RETRY_SECONDS) from exc
    if job is None:
        log.info("experiment %s is not queued; nothing to do", experiment_id)
        return
    attempt = job.attempts
    log.info("experiment %s: attempt %d starts", experiment_id, attempt)

    def record(step: int, row: dict) -> None:
        with sessions() as session:
            jobs.record_metrics(session, experiment_id, attempt, step, row)

    with Heartbeat(experiment_id, attempt, get_settings().heartbeat_interval) as heartbeat:
        def set_progress(fraction: float) -> None:
            heartbeat.progress = min(max(fraction, 0.0), 1.0)

        try:
            # Re-validated so that rows stored by an older version get today's defaults.
            spec = SPECS.validate_python(job.spec).model_dump(mode="json")
            result = runners.RUNNERS[spec["kind"]](spec, record, set_progress, heartbeat.stop_requested.is_set)
        except Stopped:
            outcome = dict(status="canceled")
        except Diverged as exc:
            outcome = dict(status="failed", error=f"diverged: {exc}")
        except Exception as exc:
            log.exception("experiment %s failed", experiment_id)
            outcome = dict(status="failed", error=f"{exc.__class__.__name__}: {exc}\n{traceback.format_exc(limit=3)}")
        else:
            outcome = dict(status="succeeded", result=result)
    with sessions() as session:
        if not jobs.finish(session, experiment_id, attempt, **outcome):
            log.warning("experiment %s: attempt %d no longer owns the job; outcome dropped", experiment_id, attempt)
