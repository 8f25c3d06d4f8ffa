"""Response formats beside JSON: CSV (``Accept: text/csv`` or ``format=csv``), streamed, and PNG."""

from typing import Annotated, Literal

import orjson
from fastapi import Query, Request
from fastapi.responses import Response, StreamingResponse

CSV_MEDIA_TYPE = "text/csv; charset=utf-8"
Format = Annotated[Literal["json", "csv"] | None, Query(description="csv: the same as Accept: text/csv")]
PlotWidth = Annotated[int, Query(ge=200, le=4000, description="pixels")]
PlotHeight = Annotated[int, Query(ge=150, le=4000, description="pixels")]
# For the OpenAPI document: what these routes answer besides JSON.
CSV_RESPONSES = {200: {"content": {"text/csv": {}}}}
PNG_RESPONSES = {200: {"content": {"image/png": {}}}}


def wants_csv(request: Request, format: str | None) -> bool:
    if format is not None:
        return format == "csv"
    return "text/csv" in request.headers.get("accept", "")


def csv_response(chunks, filename: str) -> StreamingResponse:
    return StreamingResponse(chunks, media_type=CSV_MEDIA_TYPE,
                             headers={"Content-Disposition": f'attachment; filename="{filename}.csv"'})


def json_fragment(text: str | None):
    """JSON text from the database, to be written into a response as it is (null for None)."""
    return None if text is None else orjson.Fragment(text)


def json_response(body) -> Response:
    """JSON written by orjson, for pages of experiments read as plain rows (queries.search):
    what pydantic would write for the response model (datetimes in UTC with 'Z'), without
    validating what the database just returned."""
    return Response(orjson.dumps(body, option=orjson.OPT_UTC_Z), media_type="application/json")
