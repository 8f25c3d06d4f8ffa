"""Response formats beside JSON: CSV (``Accept: text/csv`` or ``format=csv``), streamed, and PNG."""

import hashlib
from typing import Annotated, Any, Literal

import orjson
from fastapi import Query, Request
from fastapi.responses import Response, StreamingResponse

from service.search.queries import DOCUMENT_KEYS

CSV_MEDIA_TYPE = "text/csv; charset=utf-8"
Format = Annotated[Literal["json", "csv"] | None, Query(description="csv: the same as Accept: text/csv")]
PlotWidth = Annotated[int, Query(ge=200, le=4000, description="pixels")]
PlotHeight = Annotated[int, Query(ge=150, le=4000, description="pixels")]
# For the OpenAPI document: what these routes answer besides JSON.
CSV_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {"text/csv": {}}}}
PNG_RESPONSES: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}}}


def wants_csv(request: Request, format: str | None) -> bool:
    if format is not None:
        return format == "csv"
    return "text/csv" in request.headers.get("accept", "")


def csv_response(chunks, filename: str) -> StreamingResponse:
    return StreamingResponse(
        chunks, media_type=CSV_MEDIA_TYPE, headers={"Content-Disposition": f'attachment; filename="{filename}.csv"'}
    )


def json_fragment(text: str | None):
    """JSON text from the database, to be written into a response as it is (null for None)."""
    return None if text is None else orjson.Fragment(text)


def with_documents(item: dict) -> dict:
    """An experiment read as plain columns (queries.RESOURCE_KEYS), its documents' JSON text passed through."""
    for key in DOCUMENT_KEYS:
        item[key] = json_fragment(item[key])
    return item


def json_bytes(body) -> bytes:
    """JSON written by orjson, for experiments read as plain rows (queries.search, queries.resource):
    what pydantic would write for the response model (datetimes in UTC with 'Z'), without
    validating what the database just returned."""
    return orjson.dumps(body, option=orjson.OPT_UTC_Z)


def json_response(body) -> Response:
    return Response(json_bytes(body), media_type="application/json")


def revalidated_json(request: Request, body: bytes, final: bool) -> Response:
    """JSON with a strong ETag (a hash of the body), or a bodiless 304 when If-None-Match names it.

    ``final``: the resource will not change again (a finished experiment's history), so a
    client may keep it without asking; otherwise it must revalidate (``no-cache``).
    """
    etag = f'"{hashlib.blake2b(body, digest_size=16).hexdigest()}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable" if final else "no-cache"}
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110's weak comparison: '*' or any listed tag, with or without its W/ prefix."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags
