"""Errors as ``application/problem+json`` (RFC 9457)."""

import json
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException

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
        401: "no API key, or an unknown one (when NCLAB_API_KEYS is set)",
        404: "no such experiment or sweep",
        409: "the experiment has already finished",
        413: "the request body is over NCLAB_MAX_BODY_BYTES",
        422: "invalid input: the problem names the field and the rule",
        503: "the database is unreachable; retry after Retry-After seconds",
    }
    schema = Problem.model_json_schema()
    return {status: {"description": reasons[status], "content": {PROBLEM_JSON: {"schema": schema}}}
            for status in statuses}


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON

    def render(self, content) -> bytes:
        # A field's name may be a key the client sent with a lone surrogate in it (JSON's
        # \ud800 escape), which has no UTF-8 form: it goes back escaped, as it came.
        return json.dumps(content, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8", "backslashreplace")


def problem(status: int, detail: str, **extra) -> JSONResponse:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail, **extra}
    return ProblemResponse(body, status_code=status)


def _field_name(loc: tuple, error_type: str) -> str:
    """'K' rather than ('body', 'bare', 'ufm', 'K'): drop the body marker and the union tags.

    A bare spec's fields are named as they are (``K``); a labelled submission's as
    ``spec.K``, ``name``, ``tags``.
    """
    in_body = bool(loc) and loc[0] == "body"
    parts = [str(part) for part in loc[1:]] if loc and loc[0] in {"body", "query", "path", "header"} else list(loc)
    if parts[:1] == ["bare"]:
        parts = parts[1:]
        spec_at = 0
    elif parts[:1] == ["labelled"]:
        parts = parts[1:]
        spec_at = 1 if parts[:1] == ["spec"] else None
    else:
        spec_at = 0 if in_body else None
    if spec_at is not None and len(parts) > spec_at and parts[spec_at] in {"ufm", "train"}:
        del parts[spec_at]
    if error_type.startswith("union_tag"):
        parts.append("kind")
    return ".".join(parts)


def _validation_problem(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for error in exc.errors():
        field = _field_name(tuple(error["loc"]), error["type"])
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
    error = {"field": exc.field, "message": exc.message, "type": "invalid"}
    if exc.column is not None:
        error["column"] = exc.column
    return problem(422, str(exc), errors=[error])


def _filter_problem(_request: Request, exc: FilterError) -> JSONResponse:
    """A filter that cannot run: which parameter, where in it, which field."""
    error = {"field": exc.field or exc.parameter, "message": str(exc), "type": "invalid_filter",
             "parameter": exc.parameter, "column": exc.column}
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


# A value that passed validation but not the database: refused by the database (DataError:
# out of range, NUL in text), or by the driver as it encodes the value (sqlite3's integers
# beyond 64 bits, text with a lone surrogate), which SQLAlchemy passes on unwrapped.
UNSTORABLE = (DataError, OverflowError, UnicodeEncodeError)


def _unstorable_value(_request: Request, exc: Exception) -> JSONResponse:
    """A 422, never a 500: the last line of defence behind validation, which names the field.

    This one cannot: neither database says which column refused the value.
    """
    cause = exc.orig if isinstance(exc, DataError) and exc.orig is not None else exc
    reason = str(cause).partition("\n")[0] or cause.__class__.__name__
    return problem(422, f"a value the database cannot take: {reason}")


def install(app: FastAPI) -> None:
    for unstorable in UNSTORABLE:
        app.add_exception_handler(unstorable, _unstorable_value)
    for outage in (OperationalError, InterfaceError, PoolTimeout):
        app.add_exception_handler(outage, _database_unavailable)
    app.add_exception_handler(RequestValidationError, _validation_problem)
    app.add_exception_handler(HTTPException, _http_problem)
    app.add_exception_handler(InvalidField, _invalid_field_problem)
    app.add_exception_handler(FilterError, _filter_problem)
