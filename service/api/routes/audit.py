"""/audit: every change and every refusal, for the admins; the filter language over the audit's fields, JSON or CSV."""

from typing import Annotated

from fastapi import Query, Request

from service import permissions
from service.api.deps import CallerDep, SessionDep, api_router
from service.api.formats import CSV_RESPONSES, Format, csv_response, json_response, wants_csv
from service.api.problems import problem_responses
from service.db import get_sessionmaker
from service.schemas import AuditList
from service.search import export, queries
from service.search.fields import audit_lookup
from service.search.language import parse_optional_filter, parse_optional_order_by

router = api_router("/audit", "audit")


@router.get("", name="audit.read", response_model=AuditList, responses={**CSV_RESPONSES, **problem_responses(403)})
def read_audit(
    session: SessionDep,
    caller: CallerDep,
    request: Request,
    where: Annotated[
        str | None,
        Query(max_length=20_000, description="a filter of the audit's fields, e.g. \"status = 403 and owner = 'bob'\""),
    ] = None,
    order_by: Annotated[str | None, Query(max_length=2000, description="e.g. owner,-at (default: -at)")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
    format: Format = None,
):
    """Newest first unless ``order_by`` says otherwise; pass ``next_cursor`` back as ``cursor`` for the
    next page. Fields: id, at, owner, role, action, target, client, status, detail. Admins only."""
    permissions.check(caller, "audit.read")
    tree = parse_optional_filter(where, lookup=audit_lookup)
    order = parse_optional_order_by(order_by, lookup=audit_lookup)
    if wants_csv(request, format):

        def chunks():
            with get_sessionmaker()() as stream_session:  # its own: the stream outlives the request's
                yield from export.audit(queries.audit_stream(stream_session, tree, order))

        return csv_response(chunks(), "audit")
    page = queries.audit(session, tree, order, limit, cursor)
    return json_response({"items": page.items, "next_cursor": page.next_cursor})
