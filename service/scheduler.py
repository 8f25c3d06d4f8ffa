"""Which queued job a free worker slot gets: fair share across owners, per queue (NCLAB_SCHEDULER=fair).

The database decides what runs next, not the broker's arrival order. A round for a queue
counts its slots (the pool processes of the live workers that serve it, from the
``workers`` table), the jobs in flight there (running, or sent and not yet claimed), and
sends as many queued jobs as there are free slots, one at a time to the owner with the
fewest jobs in flight in that queue; ties go to the higher priority, then the older job.
So the broker holds about one message per slot, and a sweep of 1,000 puts no 1,000
messages ahead of everyone.

Each slot gets one message ahead (AHEAD_PER_SLOT): the job a process takes when its
current one ends is already waiting, so that a worker never idles while a round runs,
and a job submitted meanwhile still starts no later than the second slot that frees.

Who runs a round: the API after a submit (service/dispatch.py), a worker's pool process
after each job it ran (the slot it frees, worker/tasks.py), a worker as it starts (its slots are new), and
every API process's reconciler, as the fallback. Rounds of one queue are serialized: on
PostgreSQL by an advisory lock held for the round's transaction; on SQLite (one process
and its worker) by the database's write lock, taken before the round reads. The
conditional ``sent_at`` UPDATE lets only one round send each job besides.

Nothing else of the lifecycle changes: the row stays the truth (the task's conditional
claim), a lost message is re-sent by the reconciler, a dead worker's job is re-queued.
"""

import heapq
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import Connection, and_, bindparam, case, func, or_, select, update
from sqlalchemy.orm import Session

from service import workers
from service.models import Experiment, utcnow
from service.schemas import QUEUES
from service.settings import Settings

log = logging.getLogger("nclab.scheduler")

# Messages waiting in the broker per slot, beside the slot's running job (see the module's docstring).
AHEAD_PER_SLOT = 1

# One advisory lock per queue (PostgreSQL's 64-bit key space: a CRC of the name is enough).
_LOCK_KEYS = {queue: zlib.crc32(f"nclab.scheduler.{queue}".encode()) for queue in QUEUES}

# A job in flight in its queue: it holds a slot, or is on its way to one.
IN_FLIGHT = or_(Experiment.status == "running", and_(Experiment.status == "queued", Experiment.sent_at.is_not(None)))


class Candidate(NamedTuple):
    """A queued, unsent job, as the fair order compares it."""

    id: str
    owner: str
    priority: int
    created_at: datetime


def fair_order(candidates: Iterable[Candidate], in_flight: dict[str, int], count: int, cap: int | None) -> list[str]:
    """The ids of the next ``count`` jobs to send: each to the owner with the fewest jobs in flight (counting
    those chosen before it), ties to the higher priority, then the older job; no owner past ``cap`` in flight.

    ``candidates``: each owner's jobs in its own order (priority, then age).
    """
    by_owner: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        by_owner.setdefault(candidate.owner, []).append(candidate)
    heads = []
    for owner, jobs in by_owner.items():
        load = in_flight.get(owner, 0)
        if cap is None or load < cap:
            heads.append((load, -jobs[0].priority, jobs[0].created_at, jobs[0].id, owner, 0))
    heapq.heapify(heads)
    chosen: list[str] = []
    while heads and len(chosen) < count:
        load, _priority, _created_at, experiment_id, owner, index = heapq.heappop(heads)
        chosen.append(experiment_id)
        following = by_owner[owner][index + 1 : index + 2]
        if following and (cap is None or load + 1 < cap):
            job = following[0]
            heapq.heappush(heads, (load + 1, -job.priority, job.created_at, job.id, owner, index + 1))
    return chosen


_LOCK = select(func.set_config("synchronous_commit", "off", True), func.pg_advisory_xact_lock(bindparam("key")))


def _lock_queue(session: Session, queue: str) -> None:
    """Serialize the queue's rounds until the transaction ends, so that each reads what the one before it sent.

    PostgreSQL: an advisory lock per queue; the commit does not wait for the disk (``sent_at`` is a hint,
    jobs._mark_sent, and a round runs after every job). SQLite: the database's write lock, taken before the
    round reads. Without it every read saw the latest commit on its own: a round that counted the jobs in
    flight before another round's commit and read the queued ones after it sent more jobs than the slots
    hold, and published them beside the other round's, so that a later job could start before an older one.
    """
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(_LOCK, {"key": _LOCK_KEYS[queue]})
    else:  # every caller starts a round with its writes committed, so no transaction is open here
        connection.exec_driver_sql("BEGIN IMMEDIATE")


# Built once, as jobs.py's: a round runs after every job, and building and keying its statements anew
# cost as much as running them.
_IN_FLIGHT = (
    select(Experiment.owner, func.count())
    .where(Experiment.queue == bindparam("queue"), Experiment.status.in_(("running", "queued")), IN_FLIGHT)
    .group_by(Experiment.owner)
)
_RANKED = (
    select(
        Experiment.id,
        Experiment.owner,
        Experiment.priority,
        Experiment.created_at,
        func.row_number()
        .over(
            partition_by=Experiment.owner, order_by=(Experiment.priority.desc(), Experiment.created_at, Experiment.id)
        )
        .label("rank"),
    )
    .where(Experiment.queue == bindparam("queue"), Experiment.status == "queued", Experiment.sent_at.is_(None))
    .subquery()
)
_CANDIDATES = (
    select(_RANKED.c.id, _RANKED.c.owner, _RANKED.c.priority, _RANKED.c.created_at)
    .where(_RANKED.c.rank <= bindparam("per_owner"))
    .order_by(_RANKED.c.owner, _RANKED.c.rank)
)
_MARK_SENT = (
    update(Experiment)
    .where(Experiment.id.in_(bindparam("ids", expanding=True)), Experiment.status == "queued")
    .where(Experiment.sent_at.is_(None))
    .values(sent_at=bindparam("now"), send_count=Experiment.send_count + 1)
    .returning(Experiment.id)
)


def in_flight_by_owner(connection: Connection | Session, queue: str) -> dict[str, int]:
    """Owner -> its jobs running or sent in ``queue``."""
    return {owner: count for owner, count in connection.execute(_IN_FLIGHT, {"queue": queue})}


def candidates(connection: Connection | Session, queue: str, per_owner: int) -> list[Candidate]:
    """Each owner's first ``per_owner`` queued, unsent jobs of ``queue``, in the owner's own order."""
    return [Candidate(*row) for row in connection.execute(_CANDIDATES, {"queue": queue, "per_owner": per_owner})]


def free_slots(session: Session, queue: str, settings: Settings, in_flight: dict[str, int]) -> int:
    slots = workers.consumers(session, settings).get(queue, 0)
    return slots * (1 + AHEAD_PER_SLOT) - sum(in_flight.values())


Publish = Callable[[Sequence[tuple[str, str]]], None]


def run_round(session: Session, queue: str, settings: Settings, publish: Publish) -> list[str]:
    """Send the next jobs of ``queue`` to its free slots, in fair order; the ids sent.

    The jobs are marked sent, and the round's lock released, before their messages are
    published: a round that follows counts them in flight. If the publish fails they are
    marked unsent again, for a later round; a process that dies in between leaves them
    to the reconciler's re-send of lost messages.
    """
    _lock_queue(session, queue)
    connection = session.connection()  # Core statements: the ORM's per-statement bookkeeping is not needed
    in_flight = in_flight_by_owner(connection, queue)
    free = free_slots(session, queue, settings, in_flight)
    if free <= 0:
        session.rollback()
        return []
    chosen = fair_order(candidates(connection, queue, free), in_flight, free, settings.max_running_per_owner)
    if not chosen:
        session.rollback()
        return []
    sent = set(connection.execute(_MARK_SENT, {"ids": chosen, "now": utcnow()}).scalars())
    session.commit()
    outgoing = [(experiment_id, queue) for experiment_id in chosen if experiment_id in sent]
    try:
        publish(outgoing)
    except Exception:
        log.warning("the broker refused %d jobs of queue %s; a later round sends them", len(outgoing), queue)
        session.execute(
            update(Experiment)
            .where(Experiment.id.in_([experiment_id for experiment_id, _queue in outgoing]))
            .where(Experiment.status == "queued")
            .values(sent_at=None, send_count=Experiment.send_count - 1)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return []
    return [experiment_id for experiment_id, _queue in outgoing]


def run_rounds(session: Session, queues: Iterable[str], settings: Settings, publish: Publish) -> int:
    """A round for each of ``queues``; the jobs sent in all."""
    return sum(len(run_round(session, queue, settings, publish)) for queue in queues)


def queued_of_owner(connection: Connection | Session, owner: str) -> int:
    """The owner's queued jobs, in every queue (NCLAB_MAX_QUEUED_PER_OWNER caps it)."""
    return connection.execute(
        select(func.count()).select_from(Experiment).where(Experiment.status == "queued", Experiment.owner == owner)
    ).scalar_one()


def next_slot_owner(connection: Connection | Session, queue: str, settings: Settings) -> str | None:
    """Whose job the queue's next free slot gets, as a round would choose now (None: no unsent job waits)."""
    chosen = fair_order(
        candidates(connection, queue, 1), in_flight_by_owner(connection, queue), 1, settings.max_running_per_owner
    )
    if not chosen:
        return None
    return connection.execute(select(Experiment.owner).where(Experiment.id == chosen[0])).scalar_one()


# A poll of a queued job reads whose the next slot is at most once a second per API process and queue: it changes
# when a slot frees, and a poll should cost one more indexed count, not a round's reads.
RECENT_SECONDS = 1.0
_recent_next: dict[tuple[str, str], tuple[float, str | None]] = {}  # (database, queue) -> (read at, owner)


def _recent_next_slot_owner(connection: Connection, queue: str, settings: Settings) -> str | None:
    key = (connection.engine.url.render_as_string(), queue)
    read_at, owner = _recent_next.get(key, (-RECENT_SECONDS, None))
    if time.monotonic() - read_at >= RECENT_SECONDS:
        owner = next_slot_owner(connection, queue, settings)
        _recent_next[key] = (time.monotonic(), owner)
    return owner


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def place(connection: Connection, item: dict, settings: Settings) -> dict:
    """A queued experiment's place (schemas.QueuePlace): among its owner's queued jobs of its queue, in the
    order they are sent (priority, then age), and whose job the queue's next free slot gets."""
    ahead = or_(
        Experiment.priority > item["priority"],
        and_(
            Experiment.priority == item["priority"],
            or_(
                Experiment.created_at < item["created_at"],
                and_(Experiment.created_at == item["created_at"], Experiment.id < item["id"]),
            ),
        ),
    )
    queued, before = connection.execute(
        select(func.count(), func.coalesce(func.sum(case((ahead, 1), else_=0)), 0)).where(
            Experiment.queue == item["queue"], Experiment.status == "queued", Experiment.owner == item["owner"]
        )
    ).one()
    next_owner = _recent_next_slot_owner(connection, item["queue"], settings)
    of_owner = before + 1
    text = f"{_ordinal(of_owner)} of {item['owner']}'s {queued}; " + (
        f"the next slot goes to {next_owner}" if next_owner else "every queued job of the queue is sent"
    )
    return {"of_owner": of_owner, "owner_queued": queued, "next_slot_owner": next_owner, "text": text}


def say_place(connection: Connection, items: list[dict], settings: Settings) -> list[dict]:
    """Set each resource row's ``place``: for a queued experiment under the fair scheduler, else None."""
    for item in items:
        queued = item["status"] == "queued" and settings.scheduler == "fair"
        item["place"] = place(connection, item, settings) if queued else None
    return items
