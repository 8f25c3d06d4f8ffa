"""The live workers as the database knows them: which queues they serve, with how many processes.

Each worker's main process announces itself every heartbeat interval (worker/presence.py)
and withdraws as it shuts down; a worker killed outright stops announcing, and its row
counts for nothing once it is older than the heartbeat timeout. The API reads this to say
why a queued job waits (no live worker serves its queue) and to export consumers per
queue on /metrics.
"""

import time
from datetime import timedelta

from sqlalchemy import Connection, delete, select
from sqlalchemy.orm import Session

from service.models import WorkerPresence, utcnow
from service.settings import Settings


def announce(session: Session, name: str, queues: list[str], processes: int, gpus: list[str] | None) -> None:
    session.merge(WorkerPresence(name=name, queues=queues, processes=processes, gpus=gpus, seen_at=utcnow()))
    session.commit()


def withdraw(session: Session, name: str) -> None:
    session.execute(delete(WorkerPresence).where(WorkerPresence.name == name))
    session.commit()


def consumers(connection: Connection | Session, settings: Settings) -> dict[str, int]:
    """Queue -> the pool processes of the live workers that serve it (queues nobody serves are absent)."""
    alive_since = utcnow() - timedelta(seconds=settings.heartbeat_timeout)
    served: dict[str, int] = {}
    rows = connection.execute(
        select(WorkerPresence.queues, WorkerPresence.processes).where(WorkerPresence.seen_at >= alive_since)
    )
    for queues, processes in rows:
        for queue in queues:
            served[queue] = served.get(queue, 0) + processes
    return served


def waiting(item: dict, served: dict[str, int]) -> str | None:
    """Why a queued experiment (a resource row with ``status`` and ``queue``) cannot start: None if it can."""
    if item["status"] != "queued" or served.get(item["queue"]):
        return None
    return f"no worker serves queue {item['queue']}"


# The table changes once a heartbeat interval (5 s): a submit or a poll of a queued job reads
# it at most once a second per API process, not once a request. Read once a request, it cost
# a keyed submit a quarter of its rate (a plain httpx client, sequential submits).
RECENT_SECONDS = 1.0
_recent: dict[str, tuple[float, dict[str, int]]] = {}  # database URL -> (read at, consumers)


def recent_consumers(connection: Connection, settings: Settings) -> dict[str, int]:
    """``consumers``, as read at most RECENT_SECONDS ago by this process."""
    database = connection.engine.url.render_as_string()
    read_at, served = _recent.get(database, (-RECENT_SECONDS, {}))
    if time.monotonic() - read_at >= RECENT_SECONDS:
        served = consumers(connection, settings)
        _recent[database] = (time.monotonic(), served)
    return served


def say_why_waiting(connection: Connection, items: list[dict], settings: Settings) -> list[dict]:
    """Set each resource row's ``waiting``; the workers are read only when one of the rows is queued."""
    served = recent_consumers(connection, settings) if any(item["status"] == "queued" for item in items) else {}
    for item in items:
        item["waiting"] = waiting(item, served)
    return items
