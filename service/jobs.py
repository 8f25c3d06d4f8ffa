"""The job lifecycle: queued -> running -> succeeded | failed | canceled.

The database is the source of truth. Every transition is a conditional UPDATE, so a
redelivered message, a second reconciler or a worker that lost its job cannot move a job
the wrong way. A running job is owned by one attempt: the worker passes its attempt
number with every write, and a write for an attempt that no longer owns the job changes
nothing.
"""

import json
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, case, delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, load_only

from service import analysis, audit, idempotency
from service.audit import Actor
from service.db import rowcount
from service.idempotency import Keyed
from service.identity import ANONYMOUS
from service.models import (
    Artifact,
    Experiment,
    IdempotencyKey,
    MetricRow,
    Sweep,
    history_copies,
    result_copies,
    spec_copies,
    utcnow,
)
from service.schemas import MAX_TAGS, TERMINAL_STATUSES, LabelPatch
from service.search.queries import RESOURCE_COLUMNS, RESOURCE_KEYS
from service.settings import Settings

log = logging.getLogger("nclab.jobs")

# How long the reconciler leaves a new, unsent job to the dispatcher that sends it after its
# submit's response (in milliseconds, under load): a second message would be harmless, but
# it is one more message per job for every reconcile round that falls in between.
FIRST_SEND_GRACE = timedelta(seconds=5)


def log_transition(experiment_id: str, old: str | None, new: str, **fields) -> None:
    """One JSON line per status change, for log pipelines: event, experiment, from, to, and the details."""
    log.info(json.dumps({"event": "transition", "experiment": experiment_id, "from": old, "to": new, **fields}))


def json_safe(values: dict) -> dict:
    """NaN and infinities are not JSON: store them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def _queued(
    spec: dict, owner: str, name: str | None, tags: dict[str, str] | None, priority: int, sweep: str | None = None
) -> dict:
    """A new experiment's columns."""
    return dict(
        id=str(uuid.uuid4()),
        status="queued",
        spec=spec,
        owner=owner,
        name=name,
        tags=tags or {},
        sweep=sweep,
        priority=priority,
        **spec_copies(spec),
        progress=0.0,
        attempts=0,
        cancel_requested=False,
        send_count=0,
        created_at=utcnow(),
    )


class Outgoing(NamedTuple):
    """A job's message to send: which experiment, to which queue (its spec's ``resources``)."""

    id: str
    queue: str


@dataclass(frozen=True)
class Submitted:
    """What a submit created, or, for a replayed Idempotency-Key, what the key's first request did."""

    id: str  # the experiment's or the sweep's
    new: bool
    # The new experiments' messages, for the dispatcher to send (none for a replay).
    experiments: list[Outgoing] = field(default_factory=list)
    # A new experiment as stored (queries.RESOURCE_KEYS): its response needs no second read.
    stored: dict | None = None


# Built once: a statement made per call with .values() costs more to build and key than to run.
# Its parameters are named by column (K, d), not by attribute (num_classes, dim).
_INSERT = insert(Experiment.__table__).returning(*RESOURCE_COLUMNS)
_INSERT_KEY = insert(IdempotencyKey.__table__)
_COLUMN_OF = {prop.key: prop.columns[0].key for prop in Experiment.__mapper__.column_attrs}


def submit(
    connection: Connection | Session,
    spec: dict,
    owner: str = ANONYMOUS,
    name: str | None = None,
    tags: dict[str, str] | None = None,
    keyed: Keyed | None = None,
    actor: Actor | None = None,
    priority: int = 0,
) -> Submitted:
    """A queued experiment, stored with the request's idempotency key (if any) and the ``actor``'s audit
    row (if any) in one commit; an analysis's uploads are checked there (analysis.hold_uploads).

    One INSERT ... RETURNING, with no ORM object to build, flush and read back; with a key,
    the key's INSERT first, in the same transaction.
    """
    values = _queued(spec, owner, name, tags, priority)

    def create() -> Submitted:
        if keyed is not None:
            connection.execute(_INSERT_KEY, keyed.record(values["id"]))
        row = connection.execute(_INSERT, {_COLUMN_OF[key]: value for key, value in values.items()}).one()
        analysis.hold_uploads(connection, [spec])
        if actor is not None:
            detail = f"{spec['kind']} on queue {values['queue']}"
            audit.record(connection, actor.entry("experiment.submit", values["id"], 202, detail))
        connection.commit()
        outgoing = [Outgoing(values["id"], values["queue"])]
        return Submitted(values["id"], new=True, experiments=outgoing, stored=dict(zip(RESOURCE_KEYS, row)))

    submitted = _once(connection, keyed, create)
    if submitted.new:
        log_transition(submitted.id, None, "queued", kind=spec["kind"], owner=owner)
    return submitted


def submit_sweep(
    session: Session,
    sweep: Sweep,
    specs: list[dict],
    keyed: Keyed | None = None,
    actor: Actor | None = None,
    priority: int = 0,
) -> Submitted:
    """The sweep, all its members and the ``actor``'s audit row (if any) in one transaction: all of them are
    stored, or none (analysis.UploadDeleted where an analysis member's upload went meanwhile).

    Each member is a microsecond younger than the one before it: the scheduler sends an owner's jobs of
    one priority oldest first, so a sweep's run in its order (variants, then the grid).
    """
    members = [_queued(spec, sweep.owner, sweep.name, sweep.tags, priority, sweep.id) for spec in specs]
    for index, member in enumerate(members):
        member["created_at"] = members[0]["created_at"] + timedelta(microseconds=index)

    def create() -> Submitted:
        if keyed is not None:
            session.execute(_INSERT_KEY, keyed.record(sweep.id))
        session.add(sweep)
        session.flush()  # the sweep's row first: the members' foreign key names it
        session.execute(insert(Experiment), members)
        analysis.hold_uploads(session, specs)
        if actor is not None:
            audit.record(session, actor.entry("sweep.submit", sweep.id, 202, f"{len(members)} experiments"))
        session.commit()
        return Submitted(
            sweep.id, new=True, experiments=[Outgoing(member["id"], member["queue"]) for member in members]
        )

    submitted = _once(session, keyed, create)
    if submitted.new:
        for member in members:
            log_transition(member["id"], None, "queued", kind=member["kind"], owner=sweep.owner, sweep=sweep.id)
    return submitted


def _once(connection: Connection | Session, keyed: Keyed | None, create: Callable[[], Submitted]) -> Submitted:
    """``create()``, unless the request's key already created something: then that, not new.

    The key's INSERT is tried first, without a read before it: a first request (nearly
    all of them) costs one statement more than an unkeyed one. A key that is taken, by an
    earlier request or a concurrent one that committed first, fails that INSERT.
    """
    if keyed is None:
        return create()
    try:
        return create()
    except IntegrityError:
        connection.rollback()
    found = idempotency.earlier(connection, keyed)  # an expired key is forgotten here
    if found is not None:
        return Submitted(found, new=False)
    return create()  # the key had expired


def send(session: Session, experiment_id: str, queue: str, enqueue: Callable[[str, str], None]) -> bool:
    """Enqueue the job's message on its queue; on success record when. A failed send is retried by the reconciler."""
    try:
        enqueue(experiment_id, queue)
    except Exception:
        session.execute(update(Experiment).where(Experiment.id == experiment_id).values(sent_at=None))
        session.commit()
        return False
    _mark_sent(session, [experiment_id])
    return True


def _mark_sent(session: Session, experiment_ids: list[str]) -> None:
    """Record the send, in a commit that does not wait for PostgreSQL's disk flush.

    ``sent_at`` is a hint for the reconciler: a crash may lose the commit, which costs
    one message sent again, while waiting for the flush doubled the time of a submit.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))
    session.execute(
        update(Experiment)
        .where(Experiment.id.in_(experiment_ids))
        .values(sent_at=utcnow(), send_count=Experiment.send_count + 1)
        .execution_options(synchronize_session=False)  # no object in the session needs these two columns
    )
    session.commit()


def send_many(session: Session, outgoing: list[Outgoing], enqueue_many: Callable[[list[Outgoing]], None]) -> bool:
    """Enqueue many jobs in one round of sends and record it in one UPDATE (a sweep's members).

    If the round fails part-way, none is marked sent and the reconciler sends them all
    again; a job that gets two messages still runs once (claims are conditional).
    """
    try:
        enqueue_many(outgoing)
    except Exception:
        return False
    _mark_sent(session, [message.id for message in outgoing])
    return True


class Claim(NamedTuple):
    """A claimed job, as the claim's own UPDATE returned it."""

    attempts: int  # the number of this attempt: every later write of the run carries it
    kind: str
    spec: dict
    queue: str  # whose slot it takes: the one that frees when it ends


def claim(session: Session, experiment_id: str, worker: str, environment: dict | None = None) -> Claim | None:
    """Move a queued job to running for a new attempt, run by ``worker`` in ``environment``; None if it is
    not queued. The history is left as it is: the attempt says where it starts (start_history).

    The attempt number comes back from the UPDATE itself: read afterwards, it could already be
    a later attempt's, if this worker were cut off and the job re-queued and claimed meanwhile.
    """
    now = utcnow()
    claimed = session.execute(
        update(Experiment)
        .where(Experiment.id == experiment_id, Experiment.status == "queued")
        .values(
            status="running",
            attempts=Experiment.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            worker=worker,
            environment=environment,
            resumed_from_epoch=None,
            progress=0.0,
            error=None,
            result=None,
            **result_copies(None),
        )
        .returning(Experiment.attempts, Experiment.kind, Experiment.spec, Experiment.queue)
    ).first()
    if claimed is None:
        session.rollback()
        return None
    session.commit()
    log_transition(experiment_id, "queued", "running", attempt=claimed.attempts, worker=worker)
    return Claim(*claimed)


def start_history(session: Session, experiment_id: str, attempt: int, resumed_from_epoch: int | None) -> None:
    """Where the attempt's history starts: afresh, or after the epoch of the checkpoint it resumed from.

    The rows of the steps it will write again (all of them, or those after the checkpoint)
    are deleted, so that what a lost attempt wrote past its last checkpoint is never mixed
    with what this one writes.
    """
    if _lock_if_owned(session, experiment_id, attempt) is None:
        session.rollback()
        return
    stale = delete(MetricRow).where(MetricRow.experiment_id == experiment_id)
    if resumed_from_epoch is not None:
        stale = stale.where(MetricRow.step > resumed_from_epoch)
    session.execute(stale)
    session.execute(
        update(Experiment).where(*_owned(experiment_id, attempt)).values(resumed_from_epoch=resumed_from_epoch)
    )
    session.commit()


def _owned(experiment_id: str, attempt: int):
    return (Experiment.id == experiment_id, Experiment.status == "running", Experiment.attempts == attempt)


def heartbeat(session: Session, experiment_id: str, attempt: int, progress: float) -> bool:
    """Record liveness and progress; False when the attempt should stop (cancel, or job lost)."""
    updated = rowcount(
        session.execute(
            update(Experiment)
            .where(*_owned(experiment_id, attempt), Experiment.cancel_requested.is_(False))
            .values(heartbeat_at=utcnow(), progress=progress)
        )
    )
    session.commit()
    return bool(updated)


def _lock_if_owned(session: Session, experiment_id: str, attempt: int) -> str | None:
    """The job's id if the attempt owns it, its row locked until the transaction ends (PostgreSQL: FOR UPDATE;
    SQLite's transactions are serialized): a write that follows cannot land after the job has moved on."""
    return session.scalar(select(Experiment.id).where(*_owned(experiment_id, attempt)).with_for_update())


def record_metrics(session: Session, experiment_id: str, attempt: int, step: int, values: dict) -> None:
    if _lock_if_owned(session, experiment_id, attempt) is None:
        session.rollback()
        return
    values = json_safe(values)
    session.merge(
        MetricRow(experiment_id=experiment_id, step=step, values=values, recorded_at=utcnow(), **history_copies(values))
    )
    session.commit()


def finish(
    session: Session,
    experiment_id: str,
    attempt: int,
    status: str,
    result: dict | None = None,
    error: str | None = None,
    artifacts: list[dict] | None = None,
) -> bool:
    """End the attempt's job with its outcome and the files it kept (service/artifacts.describe), in one
    transaction; False when the attempt no longer owns the job (nothing is written)."""
    assert status in TERMINAL_STATUSES
    values: dict[str, Any] = dict(status=status, finished_at=utcnow(), error=error)
    if result is not None:
        values["result"] = json_safe(result)
        values.update(result_copies(values["result"]))
    if status == "succeeded":
        values["progress"] = 1.0
    finished = rowcount(session.execute(update(Experiment).where(*_owned(experiment_id, attempt)).values(**values)))
    if finished and artifacts:
        now = utcnow()
        session.execute(delete(Artifact).where(Artifact.experiment_id == experiment_id))
        session.execute(
            insert(Artifact),
            [{**artifact, "experiment_id": experiment_id, "created_at": now} for artifact in artifacts],
        )
    session.commit()
    if finished:
        log_transition(experiment_id, "running", status, attempt=attempt, **({"error": error} if error else {}))
    return bool(finished)


def _after_lost_attempt(job: Experiment, settings: Settings, reason: str, now: datetime) -> dict:
    """Where a running job goes when its attempt ended without an outcome: canceled if a cancel
    was asked for, failed once it has used up its attempts, else queued for a new attempt
    (sent by the reconciler's next round)."""
    if job.cancel_requested:
        return dict(status="canceled", finished_at=now)
    if job.attempts >= settings.max_attempts:
        return dict(
            status="failed",
            finished_at=now,
            error=f"{reason} during attempt {job.attempts} of {settings.max_attempts}; giving up",
        )
    return dict(status="queued", heartbeat_at=None, worker=None, sent_at=None)


def give_back(session: Session, experiment_id: str, attempt: int, settings: Settings, reason: str) -> str | None:
    """End an attempt that the infrastructure failed (a database error), not the experiment.

    The job goes where a job whose worker was lost goes (_after_lost_attempt); the new
    status, or None when the attempt no longer owns the job.
    """
    job = session.scalar(select(Experiment).where(*_owned(experiment_id, attempt)))
    if job is None:
        return None
    values = _after_lost_attempt(job, settings, reason, utcnow())
    moved = rowcount(session.execute(update(Experiment).where(*_owned(experiment_id, attempt)).values(**values)))
    session.commit()
    if not moved:
        return None
    log_transition(experiment_id, "running", values["status"], attempt=attempt, reason=reason)
    return values["status"]


def cancel(session: Session, experiment_id: str, actor: Actor | None = None) -> Experiment | None:
    """Cancel a queued job at once; ask a running one to stop. None if no such job.

    The ``actor``'s audit row (if any) is committed with the change: 202 for a running job
    asked to stop, else 200.
    """
    changed = _cancel_where(session, Experiment.id == experiment_id)
    if actor is not None:
        asked_to_stop = [status for _, status in changed] == ["running"]
        detail = "asked to stop" if asked_to_stop else "canceled" if changed else "already finished"
        audit.record(session, actor.entry("experiment.cancel", experiment_id, 202 if asked_to_stop else 200, detail))
    _commit_cancel(session, changed)
    return session.get(Experiment, experiment_id, populate_existing=True)


def cancel_sweep(session: Session, sweep_id: str, actor: Actor | None = None) -> None:
    """Cancel every unfinished member of a sweep, as ``cancel`` does one job: one UPDATE for all."""
    changed = _cancel_where(session, Experiment.sweep == sweep_id)
    if actor is not None:
        stopping = sum(status == "running" for _, status in changed)
        detail = f"{len(changed) - stopping} canceled, {stopping} asked to stop"
        audit.record(session, actor.entry("sweep.cancel", sweep_id, 200, detail))
    _commit_cancel(session, changed)


def _cancel_where(session: Session, which) -> list[tuple[str, str]]:
    """One UPDATE, not committed: the queued jobs among ``which`` become canceled, the running ones
    are asked to stop. Each changed job's id and its status after."""
    was_queued = Experiment.status == "queued"
    changed = session.execute(
        update(Experiment)
        .where(which, Experiment.status.in_(("queued", "running")))
        .values(
            cancel_requested=True,
            status=case((was_queued, "canceled"), else_=Experiment.status),
            finished_at=case((was_queued, utcnow()), else_=Experiment.finished_at),
        )
        .returning(Experiment.id, Experiment.status)
        .execution_options(synchronize_session=False)
    ).all()
    return [(experiment_id, status) for experiment_id, status in changed]


def _commit_cancel(session: Session, changed: list[tuple[str, str]]) -> None:
    session.commit()
    for experiment_id, status in changed:
        if status == "canceled":
            log_transition(experiment_id, "queued", "canceled")


class TooManyTags(ValueError):
    pass


def relabel(session: Session, experiment: Experiment, patch: LabelPatch, actor: Actor | None = None) -> None:
    """Rename (a null name clears it) and retag (tags merged in, a null value removes that tag); the
    ``actor``'s audit row (if any) is committed with the change. TooManyTags, changing nothing, past MAX_TAGS."""
    _apply_labels(experiment, patch)
    if actor is not None:
        audit.record(session, actor.entry("experiment.relabel", experiment.id, 200, _changes(patch)))
    session.commit()


def relabel_sweep(session: Session, sweep: Sweep, patch: LabelPatch, actor: Actor | None = None) -> int:
    """Relabel the sweep and, the same way, each of its members: its tags are merged into every member's,
    and a member still named as the sweep was takes its new name (one renamed on its own keeps its name).
    All or nothing, with the ``actor``'s audit row; TooManyTags, changing nothing, if any member would pass
    MAX_TAGS. The number of members relabeled."""
    old_name = sweep.name
    members = session.scalars(
        select(Experiment).where(Experiment.sweep == sweep.id).options(load_only(Experiment.name, Experiment.tags))
    ).all()
    try:
        _apply_labels(sweep, patch)
        for member in members:
            _apply_labels(member, patch, rename="name" in patch.model_fields_set and member.name == old_name)
    except TooManyTags:
        session.rollback()
        raise
    if actor is not None:
        changes = f"{_changes(patch)} on {len(members)} experiments"
        audit.record(session, actor.entry("sweep.relabel", sweep.id, 200, changes))
    session.commit()
    return len(members)


def _apply_labels(target: Experiment | Sweep, patch: LabelPatch, rename: bool | None = None) -> None:
    if patch.tags:
        tags = {**target.tags, **patch.tags}
        tags = {key: value for key, value in tags.items() if value is not None}
        if len(tags) > MAX_TAGS:
            raise TooManyTags(f"at most {MAX_TAGS} tags; this would make {len(tags)}")
        target.tags = tags
    if "name" in patch.model_fields_set if rename is None else rename:
        target.name = patch.name


def _changes(patch: LabelPatch) -> str:
    return json.dumps(patch.model_dump(mode="json", exclude_unset=True), ensure_ascii=False)


def running_count(session: Session) -> int:
    return session.execute(
        select(func.count()).select_from(Experiment).where(Experiment.status == "running")
    ).scalar_one()


def forget_sends(session: Session) -> int:
    """Mark every queued job as never sent, so that the reconciler sends it on its next round."""
    count = rowcount(
        session.execute(
            update(Experiment)
            .where(Experiment.status == "queued", Experiment.sent_at.is_not(None))
            .values(sent_at=None)
        )
    )
    session.commit()
    return count


def reconcile(session: Session, settings: Settings, enqueue: Callable[[str, str], None]) -> None:
    """Repair what a crash or a lost message left behind.

    - running jobs with a stale heartbeat are re-queued, or failed once they have used
      up their attempts (or canceled, if a cancel was asked for);
    - queued jobs whose message may have been lost are re-sent; under the fifo scheduler,
      so are those never sent (a new one after FIRST_SEND_GRACE). Under the fair one, which
      never-sent jobs go out is a scheduling round's choice (service/scheduler.py), run by
      the reconciler after this.
    """
    now = utcnow()
    stale_before = now - timedelta(seconds=settings.heartbeat_timeout)
    stale = session.scalars(
        select(Experiment).where(Experiment.status == "running", Experiment.heartbeat_at < stale_before)
    ).all()
    moves = []
    for job in stale:
        assert job.heartbeat_at is not None  # selected by heartbeat_at < stale_before
        silent_for = (now - job.heartbeat_at).total_seconds()
        values = _after_lost_attempt(job, settings, f"worker lost: no heartbeat for {silent_for:.0f} s", now)
        moved = rowcount(
            session.execute(
                update(Experiment)
                .where(
                    Experiment.id == job.id, Experiment.status == "running", Experiment.heartbeat_at == job.heartbeat_at
                )
                .values(**values)
            )
        )
        if moved:
            moves.append((job.id, values["status"], job.attempts, silent_for))
    session.commit()
    for experiment_id, status, attempt, silent_for in moves:
        log_transition(experiment_id, "running", status, attempt=attempt, reason=f"no heartbeat for {silent_for:.0f} s")

    # Only the jobs whose shortest possible delay has passed: a long queue is not read every round.
    # A new job's first send is the API's dispatcher's (service/dispatch.py) for a few seconds.
    due = Experiment.sent_at < now - _resend_delay(settings, 0)
    if settings.scheduler == "fifo":
        due |= Experiment.sent_at.is_(None) & (Experiment.created_at < now - FIRST_SEND_GRACE)
    queued = session.execute(
        select(Experiment.id, Experiment.queue, Experiment.sent_at, Experiment.send_count).where(
            Experiment.status == "queued", due
        )
    ).all()
    for row in queued:
        if row.sent_at is not None and now - row.sent_at < _resend_delay(settings, row.send_count):
            continue
        # Take the re-send with a conditional update so two reconcilers do not both send.
        taken = rowcount(
            session.execute(
                update(Experiment)
                .where(Experiment.id == row.id, Experiment.status == "queued", _same_sent_at(row.sent_at))
                .values(sent_at=now)
            )
        )
        session.commit()
        if taken:
            send(session, row.id, row.queue, enqueue)


def _resend_delay(settings: Settings, send_count: int) -> timedelta:
    return timedelta(seconds=settings.resend_after * 2 ** min(max(send_count - 1, 0), 6))


def _same_sent_at(sent_at: datetime | None):
    return Experiment.sent_at.is_(None) if sent_at is None else Experiment.sent_at == sent_at
