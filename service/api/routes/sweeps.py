"""/sweeps: many experiments in one request, followed and canceled together."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from sqlalchemy import select

from service import jobs, sweeps
from service.api.deps import (
    IdempotencyKeyHeader, OwnerDep, SessionDep, create_once, get_or_404, require_api_key, strict_query,
)
from service.api.problems import InvalidField, problem_responses
from service.models import Experiment, Sweep, utcnow
from service.queue import enqueue_many
from service.schemas import STATUSES, TERMINAL_STATUSES, SweepList, SweepOut

router = APIRouter(prefix="/sweeps", tags=["sweeps"], dependencies=[Depends(require_api_key), Depends(strict_query)],
                   responses=problem_responses(401, 413, 422, 503))
NOT_FOUND = problem_responses(404)


def _resources(session, sweeps: list[Sweep]) -> list[SweepOut]:
    """The sweeps with their members' ids, status counts and progress, read in one query."""
    rows = session.execute(
        select(Experiment.sweep, Experiment.id, Experiment.status, Experiment.progress)
        .where(Experiment.sweep.in_([sweep.id for sweep in sweeps])).order_by(Experiment.created_at, Experiment.id)
    ).all()
    members: dict[str, list] = {sweep.id: [] for sweep in sweeps}
    for sweep_id, *member in rows:
        members[sweep_id].append(member)
    resources = []
    for sweep in sweeps:
        counts = dict.fromkeys(STATUSES, 0)
        for _id, status, _progress in members[sweep.id]:
            counts[status] += 1
        done = sum(1.0 if status in TERMINAL_STATUSES else p for _id, status, p in members[sweep.id])
        resources.append(SweepOut(
            id=sweep.id, name=sweep.name, tags=sweep.tags, owner=sweep.owner, created_at=sweep.created_at,
            size=sweep.size, status_counts=counts, progress=done / max(len(members[sweep.id]), 1),
            members=[member[0] for member in members[sweep.id]]))
    return resources


def _resource(session, sweep: Sweep) -> SweepOut:
    return _resources(session, [sweep])[0]


@router.post("", status_code=202, response_model=SweepOut, responses=problem_responses(400))
def submit(request: sweeps.SweepRequest, session: SessionDep, owner: OwnerDep, response: Response,
           idempotency_key: IdempotencyKeyHeader = None) -> SweepOut:
    """Expand base x variants x grid, validate every member, store them all in one transaction, enqueue."""
    try:
        specs = sweeps.members(request)
    except sweeps.InvalidMember as exc:
        raise InvalidField(f"members[{exc.index}].{exc.field}" if exc.index >= 0 else exc.field, str(exc)) from None
    members: list[str] = []

    def create(key) -> str:
        sweep = Sweep(id=str(uuid.uuid4()), owner=owner, name=request.name, tags=request.tags,
                      definition=request.model_dump(include={"base", "variants", "grid"}), size=len(specs),
                      created_at=utcnow())
        members.extend(member.id for member in jobs.create_sweep(session, sweep, specs, idempotency_key=key))
        return sweep.id

    sweep_id, new = create_once(session, owner, idempotency_key, "/sweeps", request, create,
                                response.headers)
    if new:
        jobs.send_many(session, members, enqueue_many)
    response.headers["Location"] = f"/sweeps/{sweep_id}"
    return _resource(session, get_or_404(session, Sweep, sweep_id))


@router.get("/{sweep_id}", response_model=SweepOut, responses=NOT_FOUND)
def read(sweep_id: str, session: SessionDep) -> SweepOut:
    return _resource(session, get_or_404(session, Sweep, sweep_id))


@router.get("", response_model=SweepList)
def list_sweeps(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> SweepList:
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    query = select(Sweep).order_by(Sweep.created_at.desc(), Sweep.id.desc())
    if cursor is not None:
        last = session.get(Sweep, cursor)
        if last is None:
            raise InvalidField("cursor", "not a cursor returned by this API")
        query = query.where((Sweep.created_at < last.created_at)
                            | ((Sweep.created_at == last.created_at) & (Sweep.id < last.id)))
    page = session.scalars(query.limit(limit + 1)).all()
    return SweepList(items=_resources(session, page[:limit]),
                     next_cursor=page[limit - 1].id if len(page) > limit else None)


@router.post("/{sweep_id}/cancel", response_model=SweepOut, responses=NOT_FOUND)
def cancel(sweep_id: str, session: SessionDep) -> SweepOut:
    """Cancel every member that has not finished: queued ones at once, running ones within seconds."""
    sweep = get_or_404(session, Sweep, sweep_id)
    unfinished = session.scalars(select(Experiment.id).where(
        Experiment.sweep == sweep.id, Experiment.status.not_in(TERMINAL_STATUSES))).all()
    for experiment_id in unfinished:
        jobs.cancel(session, experiment_id)
    return _resource(session, sweep)
