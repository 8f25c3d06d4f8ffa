"""The Celery task body, called in-process on an embedded SQLite database."""

import pytest
from sqlalchemy.exc import OperationalError

from service import jobs, migrate
from service.db import get_engine, get_sessionmaker
from service.models import Experiment, MetricRow
from service.settings import get_settings
from worker import runners, tasks
from worker.nc.ufm import Diverged

# As a row written by an older version could hold it: the task fills in today's defaults.
SPEC = {"kind": "ufm", "K": 4, "d": 3, "n_per_class": 5, "logit_scale": 5.0, "resources": "cpu"}


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.setenv("NCLAB_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("NCLAB_DATABASE_URL", raising=False)
    for cached in (get_settings, get_engine, get_sessionmaker):
        cached.cache_clear()
    migrate.upgrade()
    with get_sessionmaker()() as session:
        yield session
    get_engine().dispose()
    for cached in (get_settings, get_engine, get_sessionmaker):
        cached.cache_clear()


def run(session, spec=SPEC) -> Experiment:
    experiment_id = jobs.submit(session, spec).id
    tasks.run_experiment(experiment_id)
    session.expire_all()
    return session.get(Experiment, experiment_id)


def test_a_run_stores_result_and_history_and_a_second_message_does_nothing(session):
    job = run(session)
    assert job.status == "succeeded" and job.result["optimality_gap"] < 1e-8
    steps = session.query(MetricRow.step).filter_by(experiment_id=job.id).order_by(MetricRow.step).all()
    assert steps[0] == (0,) and steps[-1] == (job.result["iterations"],)

    tasks.run_experiment(job.id)  # a redelivered message
    session.expire_all()
    assert session.get(Experiment, job.id).attempts == 1


@pytest.mark.parametrize(
    ("raised", "expected_error"),
    [(Diverged("objective is not finite at iteration 7"), "diverged: objective is not finite at iteration 7"),
     (MemoryError("CUDA out of memory"), "MemoryError: CUDA out of memory")],
)
def test_a_failing_run_ends_failed_with_a_readable_error(session, monkeypatch, raised, expected_error):
    def explode(*_args):
        raise raised

    monkeypatch.setitem(runners.RUNNERS, "ufm", explode)
    job = run(session)
    assert job.status == "failed"
    assert job.error.startswith(expected_error)
    assert job.finished_at is not None and job.result is None


def _database_error(*_args, **_kwargs):
    raise OperationalError("UPDATE experiments ...", {}, Exception("server closed the connection unexpectedly"))


def _failing(times: int, real):
    """``real``, after raising a database error ``times`` times."""
    calls = []

    def write(*args, **kwargs):
        calls.append(args)
        if len(calls) <= times:
            _database_error()
        return real(*args, **kwargs)
    return write


@pytest.fixture
def no_pauses(monkeypatch):
    monkeypatch.setattr(tasks, "WRITE_RETRY_DELAYS", (0.0,) * len(tasks.WRITE_RETRY_DELAYS))


def test_a_database_blip_while_recording_is_ridden_out(session, monkeypatch, no_pauses):
    retries = len(tasks.WRITE_RETRY_DELAYS)
    monkeypatch.setattr(jobs, "record_metrics", _failing(retries, jobs.record_metrics))
    job = run(session)
    assert job.status == "succeeded" and job.attempts == 1
    steps = [s for (s,) in session.query(MetricRow.step).filter_by(experiment_id=job.id).order_by(MetricRow.step)]
    assert steps[0] == 0 and steps[-1] == job.result["iterations"]


@pytest.mark.parametrize("write", ["record_metrics", "finish"])
def test_a_database_that_keeps_failing_a_write_gives_the_attempt_back(session, monkeypatch, no_pauses, write):
    real = getattr(jobs, write)
    monkeypatch.setattr(jobs, write, _database_error)
    job = run(session)
    assert (job.status, job.attempts, job.error, job.sent_at, job.worker) == ("queued", 1, None, None, None)

    monkeypatch.setattr(jobs, write, real)  # the database is back: the re-sent message runs it
    tasks.run_experiment(job.id)
    session.expire_all()
    job = session.get(Experiment, job.id)
    assert (job.status, job.attempts) == ("succeeded", 2) and job.result["optimality_gap"] < 1e-8


def test_the_attempt_cap_ends_a_job_the_database_keeps_failing(session, monkeypatch, no_pauses):
    monkeypatch.setattr(jobs, "record_metrics", _database_error)
    job = run(session)
    for _ in range(get_settings().max_attempts - 1):
        tasks.run_experiment(job.id)
    session.expire_all()
    job = session.get(Experiment, job.id)
    assert (job.status, job.attempts) == ("failed", get_settings().max_attempts)
    assert job.error.startswith("database error while recording step 0: OperationalError")
    cap = get_settings().max_attempts
    assert job.error.endswith(f"during attempt {cap} of {cap}; giving up")

