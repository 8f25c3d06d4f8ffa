"""Sweeps as the API shows them: each with its members' ids, status counts and progress."""

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import Experiment, Sweep
from service.schemas import STATUSES, TERMINAL_STATUSES, SweepOut
from service.search import newest_first


def resources(session: Session, sweeps: Sequence[Sweep]) -> list[SweepOut]:
    """The sweeps with their members, read in one query."""
    rows = session.execute(
        select(Experiment.sweep, Experiment.id, Experiment.status, Experiment.progress)
        .where(Experiment.sweep.in_([sweep.id for sweep in sweeps]))
        .order_by(Experiment.created_at, Experiment.id)
    ).all()
    members: dict[str, list] = {sweep.id: [] for sweep in sweeps}
    for sweep_id, *member in rows:
        assert sweep_id is not None, "the query reads only members of these sweeps"
        members[sweep_id].append(member)
    found = []
    for sweep in sweeps:
        counts = dict.fromkeys(STATUSES, 0)
        for _id, status, _progress in members[sweep.id]:
            counts[status] += 1
        done = sum(1.0 if status in TERMINAL_STATUSES else p for _id, status, p in members[sweep.id])
        found.append(
            SweepOut(
                id=sweep.id,
                name=sweep.name,
                tags=sweep.tags,
                owner=sweep.owner,
                created_at=sweep.created_at,
                size=sweep.size,
                status_counts=counts,
                progress=done / max(len(members[sweep.id]), 1),
                members=[member[0] for member in members[sweep.id]],
            )
        )
    return found


def resource(session: Session, sweep: Sweep) -> SweepOut:
    return resources(session, [sweep])[0]


def page(session: Session, limit: int, cursor: str | None) -> tuple[list[SweepOut], str | None]:
    """Newest first: a page of sweeps and the cursor of the next (None on the last); UnknownCursor."""
    rows, next_cursor = newest_first.page(session, Sweep, limit, cursor)
    return resources(session, rows), next_cursor
