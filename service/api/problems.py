"""Errors as ``application/problem+json`` (RFC 9457)."""

import json
import sqlite3
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

from service.idempotency import KeyReused
from service.schemas import SOURCE_FORMS, SPEC_KINDS
from service.search.language import FilterError

PROBLEM_JSON = "application/problem+json"


class FieldProblem(BaseModel):
    field: str | None = Field(description="the field, query parameter or filter field at fault")
    message: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details, as every error of this API is written."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[FieldProblem] | None = None


def problem_responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` for the given error statuses, each a problem+json."""
    reasons = {
        400: "the request body could not be read",
        401: "no API key, or an unknown one (when API keys are set)",
        403: "the caller's role may not do this: the problem names the owner, the role and the rule",
        404: "no such experiment or sweep",
        409: "the experiment has already finished",
        413: "the request body is over NCLAB_MAX_BODY_BYTES",
        422: "invalid input: the problem names the field and the rule",
        429: "the owner's queued experiments would pass NCLAB_MAX_QUEUED_PER_OWNER; retry after Retry-After seconds",
        503: "the database is unreachable; retry after Retry-After seconds",
    }
    schema = Problem.model_json_schema()
    return {
        status: {"description": reasons[status], "content": {PROBLEM_JSON: {"schema": schema}}} for status in statuses
    }


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON

    def render(self, content) -> bytes:
        # A field's name may be a key the client sent with a lone surrogate in it (JSON's
        # \ud800 escape), which has no UTF-8 form: it goes back escaped, as it came.
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode(
            "utf-8", "backslashreplace"
        )


def problem(status: int, detail: str, **extra) -> JSONResponse:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail, **extra}
    return ProblemResponse(body, status_code=status)


def _field_name(loc: tuple, error_type: str) -> str:
    """'K' rather than ('body', 'bare', 'ufm', 'K'): drop the body marker and the union tags.

    A bare spec's fields are named as they are (``K``); a labelled submission's as
    ``spec.K``, ``name``, ``tags``. A spec as a whole (its memory estimate over the cap) is
    ``spec`` in both forms, and a body as a whole (empty, or not an object) ``body``.
    """
    in_body = bool(loc) and loc[0] == "body"
    parts = [str(part) for part in loc[1:]] if loc and loc[0] in {"body", "query", "path", "header"} else list(loc)
    spec_at: int | None  # where the spec's union tag may be, in parts; None: no spec there
    if parts[:1] == ["bare"]:
        parts = parts[1:]
        spec_at = 0
    elif parts[:1] == ["labelled"]:
        parts = parts[1:]
        spec_at = 1 if parts[:1] == ["spec"] else None
    else:
        spec_at = 0 if in_body else None
    if spec_at is not None and len(parts) > spec_at and parts[spec_at] in SPEC_KINDS:
        kind = parts.pop(spec_at)
        parts = parts or ["spec"]  # a bare spec's own error (a labelled one's is at "spec" already)
        # An analysis's source is a union too, tagged by its form: source.upload, not source.upload.upload.
        source_at = spec_at if spec_at < len(parts) and parts[spec_at] == "source" else None
        if kind == "analysis" and source_at is not None and parts[source_at + 1 : source_at + 2] in SOURCE_FORMS:
            del parts[source_at + 1]
    if error_type.startswith("union_tag"):
        parts.append("kind")
    return ".".join(parts) or ("body" if in_body else "")


def _unreadable_key(body, error: dict) -> tuple:
    """The key of the body that pydantic could not read as text (a lone surrogate), as a location's last part.

    pydantic leaves a model's such key out of the error's location: the error
    (string_unicode) is at the model, with the key as its input. (A dict's key it names,
    ending the location with "[key]".)
    """
    key, loc = error.get("input"), error["loc"]
    if error["type"] != "string_unicode" or not isinstance(key, str) or loc[:1] != ("body",) or loc[-1] == "[key]":
        return ()
    node = body
    for part in loc[1:]:  # what is no place in the body is a union's tag ('bare', 'ufm')
        in_object = isinstance(node, dict) and part in node
        in_array = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_object or in_array:
            node = node[part]
    return (key,) if isinstance(node, dict) and key in node else ()


def _validation_problem(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for error in exc.errors():
        field = _field_name(tuple(error["loc"]) + _unreadable_key(exc.body, error), error["type"])
        message = error["msg"].removeprefix("Value error, ")
        errors.append({"field": field or None, "message": message, "type": error["type"]})
    detail = "; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors)
    return problem(422, detail, errors=errors)


class InvalidField(Exception):
    """A 422 naming the field (a query parameter, a body field, a filter's field) and the rule."""

    def __init__(self, field: str | None, message: str, column: int | None = None):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message, self.column = field, message, column


def _invalid_field_problem(_request: Request, exc: InvalidField) -> JSONResponse:
    error: dict[str, str | int | None] = {"field": exc.field, "message": exc.message, "type": "invalid"}
    if exc.column is not None:
        error["column"] = exc.column
    return problem(422, str(exc), errors=[error])


def _key_reused_problem(request: Request, exc: KeyReused) -> JSONResponse:
    return _invalid_field_problem(request, InvalidField("Idempotency-Key", str(exc)))


def _filter_problem(_request: Request, exc: FilterError) -> JSONResponse:
    """A filter that cannot run: which parameter, where in it, which field."""
    error = {
        "field": exc.field or exc.parameter,
        "message": str(exc),
        "type": "invalid_filter",
        "parameter": exc.parameter,
        "column": exc.column,
    }
    return problem(422, str(exc), errors=[error])


def _http_problem(_request: Request, exc: HTTPException) -> JSONResponse:
    response = problem(exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})
    return response


# How long a client should wait before it asks again while the database is unreachable.
RETRY_AFTER_SECONDS = 5


def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
    """The database is down or unreachable: a 503 to retry, not a 500 to report."""
    response = problem(503, f"the database is unavailable ({exc.__class__.__name__}); retry in a few seconds")
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


# PostgreSQL's SQLSTATEs that say the server is out of reach rather than the statement at
# fault: connection exceptions (08), the server shutting down or starting (57P), and a
# statement canceled (57014): by an administrator, or by the statement timeout that keeps
# a stuck database from holding the API's event loop (service/db.py).
POSTGRESQL_UNREACHABLE = ("08", "57P", "57014")
# SQLite's: the database file locked by another writer beyond the busy timeout, or not to be opened.
SQLITE_UNREACHABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN")


def _unreachable(exc: OperationalError) -> bool:
    """Whether a database error means that the database cannot be reached, not that it refused the statement."""
    if exc.connection_invalidated or exc.statement is None:  # the connection was lost, or never made
        return True
    cause = exc.orig
    if isinstance(cause, sqlite3.Error):
        return getattr(cause, "sqlite_errorname", "").startswith(SQLITE_UNREACHABLE)
    # A PostgreSQL server's error carries a SQLSTATE; psycopg's own, without one, is a failed connection.
    sqlstate = getattr(cause, "sqlstate", None)
    return sqlstate is None or sqlstate.startswith(POSTGRESQL_UNREACHABLE)


def _first_line(error: BaseException) -> str:
    """A driver's message without its detail lines (which may quote the statement), or the error's type."""
    return str(error).partition("\n")[0] or error.__class__.__name__


# The parameters the search routes build their statements from: a statement beyond the
# database's limits is named by those of them the request gave.
STATEMENT_PARAMETERS = ("where", "order_by", "group_by", "metrics", "metric")


def _database_error(request: Request, exc: OperationalError) -> JSONResponse:
    """A 503 for a database out of reach; else a 422: the statement is beyond what the database takes.

    Such a statement (too many columns, an expression too deep) is a request that asks too
    much, and asking again will not help. Validation bounds every request the API knows
    to reach a limit; this is the line behind it, never the first.
    """
    if _unreachable(exc):
        return _database_unavailable(request, exc)
    detail = f"the request is beyond what the database takes: {_first_line(exc.orig or exc)}"
    named: list[str | None] = [name for name in STATEMENT_PARAMETERS if name in request.query_params] or [None]
    return problem(
        422, detail, errors=[{"field": name, "message": detail, "type": "beyond_the_database"} for name in named]
    )


# A value that passed validation but not the database: refused by the database (DataError:
# out of range, NUL in text), or by the driver as it encodes the value (sqlite3's integers
# beyond 64 bits, text with a lone surrogate), which SQLAlchemy passes on unwrapped.
UNSTORABLE = (DataError, OverflowError, UnicodeEncodeError)


def _unstorable_value(_request: Request, exc: Exception) -> JSONResponse:
    """A 422, never a 500: the last line of defence behind validation, which names the field.

    This one cannot: neither database says which column refused the value.
    """
    cause = exc.orig if isinstance(exc, DataError) and exc.orig is not None else exc
    return problem(422, f"a value the database cannot take: {_first_line(cause)}")


def install(app: FastAPI) -> None:
    for unstorable in UNSTORABLE:
        app.add_exception_handler(unstorable, _unstorable_value)
    for outage in (InterfaceError, PoolTimeout):
        app.add_exception_handler(outage, _database_unavailable)
    handlers_of_one_exception = (
        (OperationalError, _database_error),
        (RequestValidationError, _validation_problem),
        (HTTPException, _http_problem),
        (InvalidField, _invalid_field_problem),
        (KeyReused, _key_reused_problem),
        (FilterError, _filter_problem),
    )
    for exception, handler in handlers_of_one_exception:
        # Starlette types a handler as taking any Exception; each of these is registered for the one it takes.
        app.add_exception_handler(exception, handler)  # type: ignore[arg-type]
