"""The job lifecycle's transitions, on SQLite and PostgreSQL: conditional, attempt-owned, repairable."""

import json
import logging
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import sessionmaker

from service import idempotency, jobs, migrate
from service.db import make_engine
from service.models import Experiment, IdempotencyKey, MetricRow, Sweep, utcnow
from service.settings import Settings

SPEC = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2, "normalization": "normalized", "resources": "cpu"}


@pytest.fixture(params=["sqlite", "postgresql"])
def session(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.sqlite'}" if request.param == "sqlite" else request.getfixturevalue(
        "pg_database")
    migrate.upgrade(url)
    engine = make_engine(url)
    with sessionmaker(engine, expire_on_commit=False)() as session:
        yield session
    engine.dispose()


def created(session, spec=SPEC, **labels) -> Experiment:
    """A new queued experiment, as the ORM object the assertions below read and refresh."""
    item = jobs.submit(session, spec, **labels).stored
    job = session.get(Experiment, item["id"])
    assert (job.status, job.spec, job.attempts, job.sent_at) == (item["status"], spec, 0, None)
    return job


def settings(**overrides) -> Settings:
    return Settings(heartbeat_timeout=10, resend_after=60, max_attempts=2, **overrides)


def test_a_job_is_claimed_once_and_only_its_attempt_may_write(session):
    job = created(session)
    claimed = jobs.claim(session, job.id, worker="w1")
    assert (claimed.attempts, claimed.kind, claimed.spec) == (1, "ufm", SPEC)
    assert session.get(Experiment, job.id, populate_existing=True).status == "running"
    assert jobs.claim(session, job.id, worker="w2") is None  # a redelivered message does nothing

    jobs.record_metrics(session, job.id, 1, 0, {"loss": 1.0, "nc1": float("nan")})
    jobs.record_metrics(session, job.id, 1, 0, {"loss": 0.5})  # same step overwrites
    jobs.record_metrics(session, job.id, 2, 1, {"loss": 9.0})  # not the owning attempt: ignored
    rows = session.scalars(select(MetricRow).where(MetricRow.experiment_id == job.id)).all()
    assert [(r.step, r.values) for r in rows] == [(0, {"loss": 0.5})]

    assert not jobs.finish(session, job.id, 2, "succeeded", result={"loss": 0.0})
    assert jobs.finish(session, job.id, 1, "succeeded", result={"loss": 0.5, "nc1": float("inf")})
    session.refresh(job)
    assert (job.status, job.progress, job.result) == ("succeeded", 1.0, {"loss": 0.5, "nc1": None})
    assert not jobs.finish(session, job.id, 1, "failed", error="late")  # terminal stays terminal


def test_cancel_is_immediate_when_queued_and_cooperative_when_running(session):
    queued = created(session)
    assert jobs.cancel(session, queued.id).status == "canceled"
    assert jobs.claim(session, queued.id, worker="w") is None

    running = created(session)
    jobs.claim(session, running.id, worker="w")
    after = jobs.cancel(session, running.id)
    assert (after.status, after.cancel_requested) == ("running", True)
    assert jobs.heartbeat(session, running.id, 1, 0.5) is False  # the worker learns to stop
    assert jobs.finish(session, running.id, 1, "canceled")


def age(session, job: Experiment, seconds: float) -> None:
    """Make the job as old as if it had been submitted ``seconds`` ago."""
    session.execute(update(Experiment).where(Experiment.id == job.id)
                    .values(created_at=utcnow() - timedelta(seconds=seconds)))
    session.commit()


def test_reconciler_requeues_stale_jobs_then_fails_them_at_the_attempt_cap(session):
    """FIFO: the reconciler itself sends what was never sent (under the fair scheduler a round chooses:
    tests/test_scheduler.py)."""
    sent = []
    send = lambda experiment_id, _queue: sent.append(experiment_id)  # noqa: E731
    job = created(session)
    jobs.reconcile(session, settings(scheduler="fifo"), send)
    assert sent == []  # new and unsent: the API's dispatcher is about to send it
    age(session, job, jobs.FIRST_SEND_GRACE.total_seconds() + 1)
    jobs.reconcile(session, settings(scheduler="fifo"), send)  # still never sent (e.g. broker was down): send it
    assert sent == [job.id]

    for attempt in (1, 2):
        assert jobs.claim(session, job.id, worker="w").attempts == attempt
        session.execute(update(Experiment).where(Experiment.id == job.id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=11)))
        session.commit()
        jobs.reconcile(session, settings(scheduler="fifo"), send)
        session.refresh(job)
        if attempt == 1:
            assert (job.status, sent[-1]) == ("queued", job.id)
            assert len(sent) == 2
    assert job.status == "failed"
    assert "worker lost" in job.error and "attempt 2 of 2" in job.error


def test_reconciler_resends_queued_jobs_with_backoff_and_tolerates_a_dead_broker(session):
    job = created(session)

    def broker_down(_id, _queue):
        raise ConnectionError("broker down")

    assert not jobs.send(session, job.id, "cpu", broker_down)
    age(session, job, jobs.FIRST_SEND_GRACE.total_seconds() + 1)
    sent = []
    send = lambda *message: sent.append(message)  # noqa: E731
    jobs.reconcile(session, settings(scheduler="fifo"), send)
    jobs.reconcile(session, settings(scheduler="fifo"), send)  # sent just now: not again
    assert sent == [(job.id, "cpu")]  # to the queue its spec names

    session.execute(update(Experiment).where(Experiment.id == job.id)
                    .values(sent_at=utcnow() - timedelta(seconds=61)))
    session.commit()
    jobs.reconcile(session, settings(), send)  # presumed lost after resend_after
    assert sent == [(job.id, "cpu"), (job.id, "cpu")]
    session.refresh(job)
    assert job.send_count == 2


def test_every_transition_is_one_json_log_line(session, caplog):
    caplog.set_level(logging.INFO, logger="nclab.jobs")
    first, second, third = (created(session, owner="alice") for _ in range(3))
    jobs.claim(session, first.id, worker="w1")
    jobs.finish(session, first.id, 1, "failed", error="diverged: loss became nan")
    jobs.finish(session, first.id, 1, "succeeded")  # not running any more: no transition, no line
    jobs.cancel(session, second.id)
    jobs.claim(session, third.id, worker="w1")
    session.execute(update(Experiment).where(Experiment.id == third.id)
                    .values(heartbeat_at=utcnow() - timedelta(seconds=60)))
    session.commit()
    jobs.reconcile(session, settings(), enqueue=lambda _id, _queue: None)

    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == "nclab.jobs"]
    moves = [(line["experiment"], line["from"], line["to"]) for line in lines]
    assert moves == [
        (first.id, None, "queued"), (second.id, None, "queued"), (third.id, None, "queued"),
        (first.id, "queued", "running"), (first.id, "running", "failed"),
        (second.id, "queued", "canceled"),
        (third.id, "queued", "running"), (third.id, "running", "queued"),
    ]
    assert all(line["event"] == "transition" for line in lines)
    assert lines[0]["owner"] == "alice" and lines[0]["kind"] == "ufm"
    assert lines[4]["error"] == "diverged: loss became nan" and lines[4]["attempt"] == 1
    assert lines[7]["reason"].startswith("no heartbeat for")


def test_a_keyed_submit_creates_once_and_its_replays_say_so(session):
    keyed = idempotency.keyed("alice", "key-1", "/experiments", {"spec": SPEC})
    first = jobs.submit(session, SPEC, owner="alice", keyed=keyed)
    assert first.new and first.experiments == [(first.id, "cpu")] and first.stored["id"] == first.id
    replay = jobs.submit(session, SPEC, owner="alice", keyed=keyed)
    assert (replay.id, replay.new, replay.experiments, replay.stored) == (first.id, False, [], None)
    assert session.scalar(select(func.count()).select_from(Experiment)) == 1

    other_request = idempotency.keyed("alice", "key-1", "/experiments", {"spec": {**SPEC, "K": 4}})
    with pytest.raises(idempotency.KeyReused):
        jobs.submit(session, {**SPEC, "K": 4}, owner="alice", keyed=other_request)
    bob = jobs.submit(session, SPEC, owner="bob", keyed=idempotency.keyed("bob", "key-1", "/experiments",
                                                                          {"spec": SPEC}))
    assert bob.new  # keys are the owner's own

    session.execute(update(IdempotencyKey).values(created_at=utcnow() - idempotency.KEY_LIFETIME
                                                  - timedelta(seconds=1)))
    session.commit()
    after_expiry = jobs.submit(session, SPEC, owner="alice", keyed=keyed)
    assert after_expiry.new and after_expiry.id != first.id


def test_a_sweep_is_stored_whole_and_its_members_are_left_to_the_dispatcher(session):
    sweep = Sweep(id=str(uuid.uuid4()), owner="alice", name="s", tags={}, definition={}, size=3,
                  created_at=utcnow())
    specs = [{**SPEC, "seed": seed, "resources": resources} for seed, resources in enumerate(["cpu", "gpu", "cpu"])]
    submitted = jobs.submit_sweep(session, sweep, specs)
    members = session.scalars(select(Experiment).where(Experiment.sweep == sweep.id)
                              .order_by(Experiment.created_at, Experiment.id)).all()
    assert submitted.new and sorted(submitted.experiments) == sorted((m.id, m.spec["resources"]) for m in members)
    assert [member.queue for member in members] == ["cpu", "gpu", "cpu"]
    assert [(m.status, m.sent_at, m.owner, m.spec["seed"]) for m in members] == [
        ("queued", None, "alice", seed) for seed in range(3)]


def test_a_sweep_is_canceled_in_one_update(session):
    sweep = Sweep(id=str(uuid.uuid4()), owner="alice", name=None, tags={}, definition={}, size=4,
                  created_at=utcnow())
    queued, running, done, also_queued = (message.id for message in jobs.submit_sweep(session, sweep, [SPEC] * 4).experiments)
    jobs.claim(session, running, worker="w")
    jobs.claim(session, done, worker="w")
    jobs.finish(session, done, 1, "succeeded", result={"loss": 0.1})

    statements = []
    listen = lambda *args: statements.append(args[2])  # noqa: E731 (the statement's text)
    event.listen(session.get_bind(), "before_cursor_execute", listen)
    try:
        jobs.cancel_sweep(session, sweep.id)
    finally:
        event.remove(session.get_bind(), "before_cursor_execute", listen)
    assert [text.split()[0] for text in statements if not text.startswith(("BEGIN", "COMMIT", "SET"))] == ["UPDATE"]

    session.expire_all()
    state = {i: (job.status, job.cancel_requested) for i in (queued, running, done, also_queued)
             for job in [session.get(Experiment, i)]}
    assert state == {queued: ("canceled", True), running: ("running", True), done: ("succeeded", False),
                     also_queued: ("canceled", True)}
    assert session.get(Experiment, queued).finished_at is not None
