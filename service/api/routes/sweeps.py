"""/sweeps: many experiments in one request, followed and canceled together."""

import uuid
from typing import Annotated

from fastapi import Query, Response

from service import analysis, idempotency, jobs, permissions, sweeps
from service.api.admission import check_queued_quota
from service.api.deps import (
    ActorDep,
    CallerDep,
    IdempotencyKeyHeader,
    SessionDep,
    api_router,
    get_or_404,
    submitted_headers,
)
from service.api.problems import InvalidField, problem_responses
from service.dispatch import get_dispatcher
from service.models import Sweep, utcnow
from service.schemas import LabelPatch, SweepList, SweepOut
from service.search import newest_first
from service.search import sweeps as sweep_queries
from service.settings import get_settings

router = api_router("/sweeps", "sweeps")
NOT_FOUND = problem_responses(404)
FORBIDDEN = problem_responses(403)


@router.post(
    "", name="sweep.submit", status_code=202, response_model=SweepOut, responses=problem_responses(400, 403, 429)
)
def submit(
    request: sweeps.SweepRequest,
    session: SessionDep,
    caller: CallerDep,
    actor: ActorDep,
    response: Response,
    idempotency_key: IdempotencyKeyHeader = None,
) -> SweepOut:
    """Expand base x variants x grid, validate every member, store them all and the audit row in one
    transaction; their messages are sent after the response, by the dispatcher. ``priority`` is every member's
    (above 0: admins only, else 403); a sweep that would take the owner past its queued quota is a 429 and stores
    nothing."""
    permissions.check(caller, "sweep.submit")
    permissions.check_priority(caller, "sweep.submit", request.priority)
    try:
        specs = sweeps.members(request)
        for index, spec in enumerate(specs):
            if spec["kind"] == "analysis":
                specs[index] = _resolved_member(session, index, spec)
    except sweeps.InvalidMember as exc:
        raise InvalidField(f"members[{exc.index}].{exc.field}" if exc.index >= 0 else exc.field, str(exc)) from None
    sweep = Sweep(
        id=str(uuid.uuid4()),
        owner=caller.owner,
        name=request.name,
        tags=request.tags,
        definition=request.model_dump(include={"base", "variants", "grid"}),
        size=len(specs),
        created_at=utcnow(),
    )
    check_queued_quota(session, caller.owner, len(specs), get_settings())
    keyed = idempotency.keyed(caller.owner, idempotency_key, "/sweeps", request.model_dump(mode="json"))
    try:
        submitted = jobs.submit_sweep(session, sweep, specs, keyed, actor, request.priority)
    except analysis.UploadDeleted as exc:
        raise InvalidField(f"members[{exc.index}].{exc.field}", exc.message) from None
    get_dispatcher().send(*submitted.experiments)
    response.headers.update(submitted_headers(submitted, "/sweeps"))
    return sweep_queries.resource(session, get_or_404(session, Sweep, submitted.id))


@router.get("/{sweep_id}", response_model=SweepOut, responses=NOT_FOUND)
def read(sweep_id: str, session: SessionDep) -> SweepOut:
    return sweep_queries.resource(session, get_or_404(session, Sweep, sweep_id))


@router.get("", response_model=SweepList)
def list_sweeps(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> SweepList:
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    try:
        items, next_cursor = sweep_queries.page(session, limit, cursor)
    except newest_first.UnknownCursor as exc:
        raise InvalidField("cursor", str(exc)) from None
    return SweepList(items=items, next_cursor=next_cursor)


@router.patch(
    "/{sweep_id}",
    name="sweep.relabel",
    response_model=SweepOut,
    responses={**NOT_FOUND, **FORBIDDEN, **problem_responses(400)},
)
def relabel(sweep_id: str, patch: LabelPatch, session: SessionDep, caller: CallerDep, actor: ActorDep) -> SweepOut:
    """Rename (``"name": null`` clears it) and retag the sweep and its members: tags are merged into each (a null
    value removes that tag); a member still named as the sweep was takes the new name.

    Its owner's members and the admins may; the change, on all of them, and its audit row are one commit.
    """
    sweep = get_or_404(session, Sweep, sweep_id)
    permissions.check(caller, "sweep.relabel", sweep_id, sweep.owner)
    try:
        jobs.relabel_sweep(session, sweep, patch, actor)
    except jobs.TooManyTags as exc:
        raise InvalidField("tags", str(exc)) from None
    return sweep_queries.resource(session, sweep)


@router.post("/{sweep_id}/cancel", name="sweep.cancel", response_model=SweepOut, responses={**NOT_FOUND, **FORBIDDEN})
def cancel(sweep_id: str, session: SessionDep, caller: CallerDep, actor: ActorDep) -> SweepOut:
    """Cancel every member that has not finished: queued ones at once, running ones within seconds.

    Its owner's members and the admins may; the change and its audit row are one commit.
    """
    sweep = get_or_404(session, Sweep, sweep_id)
    permissions.check(caller, "sweep.cancel", sweep_id, sweep.owner)
    jobs.cancel_sweep(session, sweep.id, actor)
    return sweep_queries.resource(session, sweep)


def _resolved_member(session, index: int, spec: dict) -> dict:
    """An analysis member with its source's K and d (service/analysis.py)."""
    try:
        return analysis.resolve(session, spec)
    except analysis.InvalidSource as exc:
        raise sweeps.InvalidMember(index, {"source": spec["source"]}, exc.field, exc.message) from None
