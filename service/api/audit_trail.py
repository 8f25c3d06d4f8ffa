"""The audit of refusals: a 401, 403 or 429, wherever a route raises it, is one audit row.

Recorded where the API turns the exception into its answer, so that a refusal raised by
any route (the key check, the roles' rule, a quota) is recorded once, by one piece of code;
the dashboard's sign-in, which answers its 401 as a page, records its own through the same function.
The action is the route's name when it names one (service/permissions.py: ACTIONS; the
routes that change something are named so), else ``read``.
"""

import logging

from fastapi import FastAPI, Request
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException

from service import audit
from service.db import get_engine
from service.permissions import ACTIONS

log = logging.getLogger("nclab.audit")

REFUSALS = (401, 403, 429)
# The path parameters that name the target of a route.
TARGETS = ("experiment_id", "sweep_id", "upload_id")


def record_refusal(request: Request, status: int, detail: str) -> None:
    """The refusal's audit row, on a connection of its own: nothing else of the request was written."""
    route = request.scope.get("route")
    name = getattr(route, "name", None)
    action = name if name in ACTIONS else "read"
    target = next((request.path_params[key] for key in TARGETS if key in request.path_params), None)
    actor = audit.Actor(getattr(request.state, "caller", None), request.client.host if request.client else None)
    try:
        with get_engine().begin() as connection:
            audit.record(connection, actor.entry(action, target, status, detail))  # type: ignore[arg-type]
    except SQLAlchemyError:
        # The refusal is answered all the same: an unreachable database must not open the door.
        log.exception("could not record a %d refusal of %s %s", status, request.method, request.url.path)


def install(app: FastAPI) -> None:
    """Record each refusal, then answer it as the problem handlers do (installed before this)."""
    answer = app.exception_handlers[HTTPException]

    def recorded(request: Request, exc: Exception):
        if isinstance(exc, HTTPException) and exc.status_code in REFUSALS:
            record_refusal(request, exc.status_code, str(exc.detail))
        return answer(request, exc)

    app.add_exception_handler(HTTPException, recorded)
