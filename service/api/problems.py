"""Errors as ``application/problem+json`` (RFC 9457)."""

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

PROBLEM_JSON = "application/problem+json"


def problem(status: int, detail: str, **extra) -> JSONResponse:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def _field_name(loc: tuple, error_type: str) -> str:
    """'K' rather than ('body', 'ufm', 'K'): drop the body marker and the union tag."""
    if error_type.startswith("union_tag"):
        return "kind"
    parts = [str(part) for part in loc[1:]]
    if parts and parts[0] in {"ufm", "train"}:
        parts = parts[1:]
    return ".".join(parts)


def _validation_problem(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = []
    for error in exc.errors():
        field = _field_name(tuple(error["loc"]), error["type"])
        message = error["msg"].removeprefix("Value error, ")
        errors.append({"field": field or None, "message": message, "type": error["type"]})
    detail = "; ".join(f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in errors)
    return problem(422, detail, errors=errors)


def _http_problem(_request: Request, exc: HTTPException) -> JSONResponse:
    response = problem(exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})
    return response


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_problem)
    app.add_exception_handler(HTTPException, _http_problem)
