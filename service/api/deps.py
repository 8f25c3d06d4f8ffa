"""Request dependencies: a database session, the caller's identity, strict query strings, and lookups."""

import hmac
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.security import APIKeyCookie, APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.api.problems import InvalidField, problem_responses
from service.audit import Actor
from service.db import get_session
from service.identity import NO_KEYS_CALLER, Caller
from service.jobs import Submitted
from service.models import Base
from service.search.fields import UnknownField, names
from service.settings import get_settings

SessionDep = Annotated[Session, Depends(get_session)]


def _caller_of(presented: str, key_callers: dict[str, Caller]) -> Caller | None:
    """The caller a key names, comparing against every key in constant time."""
    caller = None
    for key, key_caller in key_callers.items():
        if hmac.compare_digest(presented.encode(), key.encode()):
            caller = key_caller
    return caller


# Declared as security schemes, so that the OpenAPI document says how to authenticate.
bearer = HTTPBearer(auto_error=False, description="an API key from NCLAB_API_KEYS")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key from NCLAB_API_KEYS")
# The dashboard's: set by its sign-in form, so that the browser's own requests (pages,
# plots, CSV links) carry the key. SameSite=Strict: another site cannot make a browser send it.
UI_KEY_COOKIE = "nclab_api_key"
api_key_cookie = APIKeyCookie(
    name=UI_KEY_COOKIE,
    auto_error=False,
    description="an API key from NCLAB_API_KEYS, as the dashboard's sign-in sets it",
)


def caller_of_key(presented: str) -> Caller | None:
    """Who a presented key names: the anonymous admin when no keys are set, None for an unknown key."""
    key_ring = get_settings().key_ring
    if not key_ring.authenticating:
        return NO_KEYS_CALLER
    return _caller_of(presented, key_ring.callers())


async def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    x_api_key: Annotated[str | None, Depends(api_key_header)],
    cookie: Annotated[str | None, Depends(api_key_cookie)],
) -> Caller:
    """The caller: the key's owner and role when keys are set, else the anonymous admin.

    ``Authorization`` must name the Bearer scheme (in any case); a bare key there is refused.
    The caller is kept in the request's state, for the audit of a refusal (api/audit_trail.py).
    """
    caller = caller_of_key(x_api_key or (credentials.credentials if credentials else "") or cookie or "")
    request.state.caller = caller
    if caller is None:
        raise HTTPException(
            401,
            "missing or unknown API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return caller


CallerDep = Annotated[Caller, Depends(require_api_key)]


def actor_of(request: Request, caller: CallerDep) -> Actor:
    """Who made the request and from where, for the audit row of what it changes."""
    return Actor(caller, request.client.host if request.client else None)


ActorDep = Annotated[Actor, Depends(actor_of)]


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[!-~]+$",
        description="any unique string (a UUID): a retry with the same key and body within 24 h returns "
        "what the first request created instead of creating it again",
    ),
]


def submitted_headers(submitted: Submitted, collection: str) -> dict[str, str]:
    """Where the created resource lives; a replayed Idempotency-Key is marked ``Idempotent-Replayed: true``."""
    headers = {"Location": f"{collection}/{submitted.id}"}
    if not submitted.new:
        headers["Idempotent-Replayed"] = "true"
    return headers


Model = TypeVar("Model", bound=Base)


def not_found(model: type[Base], resource_id: str) -> HTTPException:
    """A 404 naming what was asked for."""
    return HTTPException(404, f"no {model.__tablename__.removesuffix('s')} with id {resource_id!r}")


def get_or_404(session: Session, model: type[Model], resource_id: str) -> Model:
    """The row of ``model`` with this id, or a 404."""
    row = session.get(model, resource_id)
    if row is None:
        raise not_found(model, resource_id)
    return row


def _declared_query_parameters(request: Request) -> dict[str, bool]:
    """The route's query parameters, each with whether it takes several values."""
    route = request.scope["route"]
    declared = getattr(route, "_nclab_query_parameters", None)
    if declared is None:
        declared = {}
        pending = [route.dependant]
        while pending:
            dependant = pending.pop()
            pending.extend(dependant.dependencies)
            for parameter in dependant.query_params:
                declared[parameter.alias] = str(parameter.field_info.annotation).startswith("list")
        route._nclab_query_parameters = declared
    return declared


async def strict_query(request: Request) -> None:
    """Reject query parameters the route does not take, and repeats of single-valued ones.

    A misspelt filter (``?seed=0``, ``?order_by=nc1`` on an old server) must not quietly
    answer with an unfiltered list.
    """
    declared = _declared_query_parameters(request)
    for name in dict.fromkeys(request.query_params.keys()):
        if name not in declared:
            allowed = ", ".join(sorted(declared)) or "none"
            raise InvalidField(name, f"unknown query parameter (this route takes: {allowed})")
        if not declared[name] and len(request.query_params.getlist(name)) > 1:
            raise InvalidField(name, f"given {len(request.query_params.getlist(name))} times; it takes one value")


def metric_names(text: str | None, parameter: str, resolve) -> list[str]:
    """The metrics a parameter names, each resolved (history_key, numeric_result_key); a 422 for an unknown one."""
    try:
        return [resolve(name) for name in names(text)]
    except UnknownField as exc:
        raise InvalidField(parameter, str(exc)) from None


def api_router(prefix: str, tag: str) -> APIRouter:
    """A router of the API's resources: every route needs a key and takes only the query
    parameters it declares, and may answer 401, 413, 422 or 503 as problem+json."""
    return APIRouter(
        prefix=prefix,
        tags=[tag],
        dependencies=[Depends(require_api_key), Depends(strict_query)],
        responses=problem_responses(401, 413, 422, 503),
    )
