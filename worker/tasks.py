"""The one Celery task: run an experiment whose row says it is queued.

The row, not the message, decides: a message for a job that is not queued (a duplicate,
a redelivery, a canceled job) does nothing. The experiment's own failures end the job
``failed`` with a readable error. The infrastructure's do not: a database error while
claiming is retried, one while recording or finishing is retried in place and then
gives the attempt back to the queue, and a worker that dies mid-run leaves a stale
heartbeat, which the reconciler turns into a re-queue. Either way, the attempt cap
(MAX_ATTEMPTS) ends a job that never gets through as failed, saying why.
"""

import logging
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable

from billiard.process import current_process
from celery.signals import worker_process_init
from pydantic import TypeAdapter
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service import artifacts, fleet, jobs, scheduler
from service.db import bound_connections, get_engine, get_sessionmaker
from service.lifetime import die_with_parent
from service.queue import RUN_EXPERIMENT, celery_app, enqueue_many
from service.schemas import ExperimentSpec
from service.settings import get_settings
from worker import environment, runners
from worker.heartbeat import Heartbeat
from worker.memory import retain_freed_memory
from worker.nc.analysis import BadData
from worker.nc.ufm import Diverged, Stopped

log = logging.getLogger("nclab.worker")
SPECS = TypeAdapter(ExperimentSpec)


@worker_process_init.connect
def prepare_pool_process(**_) -> None:
    gpu = fleet.pin_gpu(current_process().index)  # before anything in this process touches CUDA
    retain_freed_memory()
    bound_connections(get_engine(), get_settings().heartbeat_timeout)
    # A pool process whose worker was killed outright stops at once: the reconciler
    # re-queues its job, which must not go on running unowned.
    die_with_parent(signal.SIGKILL)
    log.info("pool process %d started: it ends with its worker%s", os.getpid(), f"; on GPU {gpu}" if gpu else "")


# While the database is unreachable a message cannot be claimed: it goes back to the
# queue this many seconds later, as often as it takes (the row still says queued).
CLAIM_RETRY_SECONDS = 2.0
# A write of a running attempt's (a history row, the outcome) that the database refuses is
# tried again after each of these pauses: a cut connection is replaced, a restart is ridden
# out. After the last, the attempt is given back to the queue (jobs.give_back).
WRITE_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)


class InfrastructureError(Exception):
    """The database kept refusing a write of the attempt's: the attempt failed, not the experiment."""


def _write(what: str, write: Callable[[Session], object]) -> object:
    pauses = iter(WRITE_RETRY_DELAYS)
    while True:
        try:
            with get_sessionmaker()() as session:
                return write(session)
        except SQLAlchemyError as exc:
            pause = next(pauses, None)
            if pause is None:
                raise InfrastructureError(f"database error while {what}: {exc.__class__.__name__}: {exc}") from exc
            log.warning("database error while %s (%s); trying again in %g s", what, exc.__class__.__name__, pause)
            time.sleep(pause)


@celery_app.task(name=RUN_EXPERIMENT, bind=True, max_retries=None)
def run_experiment(self, experiment_id: str) -> None:
    worker = f"{socket.gethostname()} pid {os.getpid()}"
    try:
        with get_sessionmaker()() as session:
            claim = jobs.claim(session, experiment_id, worker, environment.describe(runners.device(), worker))
    except SQLAlchemyError as exc:
        log.warning(
            "experiment %s: the database failed the claim (%s); retrying in %g s",
            experiment_id,
            exc.__class__.__name__,
            CLAIM_RETRY_SECONDS,
        )
        raise self.retry(countdown=CLAIM_RETRY_SECONDS) from exc
    if claim is None:
        log.info("experiment %s is not queued; nothing to do", experiment_id)
        return
    try:
        _run_attempt(experiment_id, claim)
    finally:
        if get_settings().scheduler == "fair":
            _schedule_after(claim.queue)


def _schedule_after(queue: str) -> None:
    """This process's slot is free: choose the job that will wait for it (scheduler.AHEAD_PER_SLOT), before
    the task returns. On a thread of its own the round would run beside the next job and slow it down more
    than it costs here (bench/fairshare.py); a failed round is the reconciler's to make up."""
    try:
        with get_sessionmaker()() as session:
            scheduler.run_round(session, queue, get_settings(), enqueue_many)
    except Exception:
        log.exception("the scheduling round after a job failed; the reconciler's round runs it")


def _run_attempt(experiment_id: str, claim: jobs.Claim) -> None:
    attempt = claim.attempts
    log.info("experiment %s: attempt %d starts", experiment_id, attempt)

    def record(step: int, row: dict) -> None:
        _write(
            f"recording step {step}", lambda session: jobs.record_metrics(session, experiment_id, attempt, step, row)
        )

    store = artifacts.get_store()
    try:
        store.fetch_checkpoint(experiment_id)
    except Exception as exc:
        _give_back(experiment_id, attempt, f"the artifact store failed: {exc.__class__.__name__}: {exc}")
        return
    run_dir = store.working_dir(experiment_id)
    resumed_from = runners.resume_point(claim.kind, run_dir)
    if resumed_from is None:
        store.discard(experiment_id)  # what an earlier attempt left, with no checkpoint to resume from
    else:
        log.info("experiment %s: attempt %d resumes after epoch %d", experiment_id, attempt, resumed_from)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = get_settings()
    with Heartbeat(experiment_id, attempt, settings.heartbeat_interval, settings.heartbeat_timeout) as heartbeat:

        def set_progress(fraction: float) -> None:
            heartbeat.progress = min(max(fraction, 0.0), 1.0)

        def keep_checkpoint(path) -> None:
            _store("copying the checkpoint", lambda: store.keep_checkpoint(experiment_id, path))

        try:
            _write(
                "starting the history",
                lambda session: jobs.start_history(session, experiment_id, attempt, resumed_from),
            )
            outcome = _run(
                experiment_id,
                claim.spec,
                run_dir,
                record,
                set_progress,
                heartbeat.stop_requested.is_set,
                keep_checkpoint,
            )
            if heartbeat.lost.is_set():
                raise InfrastructureError(f"no heartbeat could be written for {settings.heartbeat_timeout:g} s")
            if outcome["status"] == "succeeded":
                outcome["artifacts"] = artifacts.describe(run_dir)
                names = [artifact["name"] for artifact in outcome["artifacts"]]
                _store("storing the artifacts", lambda: store.publish(experiment_id, names))
            owned = _write(
                "storing the outcome", lambda session: jobs.finish(session, experiment_id, attempt, **outcome)
            )
        except InfrastructureError as exc:
            _give_back(experiment_id, attempt, str(exc))
            store.release(experiment_id)  # the stored checkpoint stays, for the next attempt
            return
    if not owned:
        # Its files are the attempt that owns the job now's: left alone.
        log.warning("experiment %s: attempt %d no longer owns the job; outcome dropped", experiment_id, attempt)
    elif outcome["status"] == "succeeded":
        store.drop_checkpoint(experiment_id)
    else:
        store.discard(experiment_id)  # a failed or canceled run keeps no files


def _store(what: str, operation: Callable[[], None]) -> None:
    """An artifact store operation: its failure (a remote store out of reach) is the infrastructure's."""
    try:
        operation()
    except Exception as exc:
        raise InfrastructureError(f"the artifact store failed while {what}: {exc.__class__.__name__}: {exc}") from exc


def _run(experiment_id: str, spec: dict, run_dir, record, set_progress, should_stop, keep_checkpoint) -> dict:
    """The experiment's outcome: the columns jobs.finish sets. Its own errors fail it; the
    database's (InfrastructureError) go through to the caller."""
    try:
        # Re-validated so that rows stored by an older version get today's defaults.
        spec = SPECS.validate_python(spec).model_dump(mode="json")
        result = runners.RUNNERS[spec["kind"]](spec, run_dir, record, set_progress, should_stop, keep_checkpoint)
    except InfrastructureError:
        raise
    except Stopped:
        return dict(status="canceled")
    except Diverged as exc:
        return dict(status="failed", error=f"diverged: {exc}")
    except BadData as exc:
        return dict(status="failed", error=f"bad data: {exc}")
    except Exception as exc:
        log.exception("experiment %s failed", experiment_id)
        return dict(status="failed", error=f"{exc.__class__.__name__}: {exc}\n{traceback.format_exc(limit=3)}")
    return dict(status="succeeded", result=result)


def _give_back(experiment_id: str, attempt: int, reason: str) -> None:
    """The attempt ends without an outcome; the job is queued for a new one (or failed, once its
    attempts are used up). If even that write fails, the job's heartbeat has stopped, and the
    reconciler does the same once it is stale."""
    log.warning("experiment %s: attempt %d given back: %s", experiment_id, attempt, reason)
    try:
        _write(
            "giving the attempt back",
            lambda session: jobs.give_back(session, experiment_id, attempt, get_settings(), reason),
        )
    except InfrastructureError:
        log.exception("experiment %s: could not give attempt %d back; the reconciler will", experiment_id, attempt)
