"""/experiments/{id}/artifacts: the files an experiment kept, listed from the database and served from the store.

The ``artifacts`` table is the list: a file the worker is still writing has no row yet, so
it is never offered (service/artifacts.py). From a local store a download is Starlette's
FileResponse, which streams the file in chunks and answers single and multiple ``Range``
requests and ``If-Range``; from a remote store (an fsspec URL) the file is streamed
through, and a single range is answered (several are answered with the whole file, as
RFC 9110 allows). This module adds the sha256 as a strong ETag with ``If-None-Match``, and
range errors as problem+json.
"""

from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from sqlalchemy import select
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from service.api.deps import SessionDep, api_router, get_or_404
from service.api.formats import etag_matches
from service.api.problems import PROBLEM_JSON, InvalidField, Problem, problem_responses
from service.artifacts import ArtifactStore, get_store
from service.models import Artifact, Experiment
from service.schemas import ArtifactList

router = api_router("/experiments", "artifacts")
NOT_FOUND = problem_responses(404)
FILE_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {**NOT_FOUND[404], "description": "no such experiment or artifact, or its file is missing"}
}
DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the file, as its media_type says (application/octet-stream for safetensors)",
        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
    },
    206: {
        "description": "the part that a Range header asked for, with Content-Range",
        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
    },
    304: {"description": "If-None-Match names the ETag: the copy the client holds is this file"},
    416: {
        "description": "the Range starts past the end of the file; Content-Range: bytes */size",
        "content": {PROBLEM_JSON: {"schema": Problem.model_json_schema()}},
    },
    **FILE_NOT_FOUND,
}


class ArtifactFile(FileResponse):
    # Starlette reads 64 KiB at a time, each read a hop to a worker thread and back. With 1 MiB reads
    # a large file is served about twice as fast (256 MiB over loopback, to curl or httpx), in 1 MiB of memory.
    chunk_size = 1 << 20


@router.get("/{experiment_id}/artifacts", response_model=ArtifactList, responses=NOT_FOUND)
def list_artifacts(experiment_id: str, session: SessionDep) -> dict:
    """The files the experiment kept, by name: size, sha256, media type. None yet is an empty list."""
    get_or_404(session, Experiment, experiment_id)
    rows = session.scalars(select(Artifact).where(Artifact.experiment_id == experiment_id).order_by(Artifact.name))
    return {"items": rows.all()}


@router.get("/{experiment_id}/artifacts/{name}", response_class=ArtifactFile, responses=DOWNLOAD_RESPONSES)
def download_artifact(experiment_id: str, name: str, request: Request, session: SessionDep) -> Response:
    """The file, streamed; ``Range: bytes=first-last``, ``first-`` or ``-suffix`` for a part of it (206).

    ``ETag`` is the sha256 of the bytes: a client checks what it received against it, and
    ``If-None-Match`` with it answers a bodiless 304.
    """
    artifact = session.get(Artifact, (experiment_id, name))
    if artifact is None:
        get_or_404(session, Experiment, experiment_id)
        raise HTTPException(404, f"experiment {experiment_id} has no artifact named {name!r}")
    store = get_store()
    local_file = store.local_file(experiment_id, name)
    try:
        # One look at a local file: its stat gives the size and serves the response.
        stat_result = local_file.stat() if local_file is not None else None
        size = stat_result.st_size if stat_result is not None else store.size(experiment_id, name)
    except FileNotFoundError:
        raise HTTPException(404, f"the file of artifact {name!r} is missing from the artifact store") from None
    headers = {"ETag": f'"{artifact.sha256}"', "Cache-Control": "no-cache"}
    # RFC 9110 (13.2.2): If-None-Match is decided before Range.
    if etag_matches(request.headers.get("if-none-match"), headers["ETag"]):
        return Response(status_code=304, headers=headers)
    range_header, if_range = request.headers.get("range"), request.headers.get("if-range")
    if local_file is not None:
        response = ArtifactFile(
            local_file, stat_result=stat_result, media_type=artifact.media_type, filename=name, headers=headers
        )
        # As FileResponse does: an If-Range naming another version of the file makes the Range void (the whole file).
        if range_header is not None and if_range in (None, headers["ETag"], response.headers["last-modified"]):
            _check_range(range_header, size)
        return response
    ranges = []
    if range_header is not None and if_range in (None, headers["ETag"]):
        ranges = _check_range(range_header, size)
    return _streamed(store, experiment_id, name, size, artifact.media_type, headers, ranges)


def _streamed(
    store: ArtifactStore,
    experiment_id: str,
    name: str,
    size: int,
    media_type: str,
    headers: dict[str, str],
    ranges: list[tuple[int, int]],
) -> Response:
    """A remote store's file streamed through: whole (200), or the one range asked for (206)."""
    headers = {**headers, "Accept-Ranges": "bytes", "Content-Disposition": f'attachment; filename="{name}"'}
    start, end, status = 0, size, 200
    if len(ranges) == 1:
        (start, end), status = ranges[0], 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    chunks = store.read_range(experiment_id, name, start, end)
    return StreamingResponse(chunks, status_code=status, media_type=media_type, headers=headers)


def _check_range(header: str, size: int) -> list[tuple[int, int]]:
    """The ranges a Range header asks for, as (start, end exclusive); one that FileResponse would refuse is
    refused here as problem+json (it answers in plain text).

    Its own parser decides, the one that then serves the range, so that the two never disagree.
    """
    try:
        return FileResponse._parse_range_header(header, size)
    except RangeNotSatisfiable:
        raise HTTPException(
            416,
            f"Range {header!r} starts past the end of the file ({size} bytes)",
            headers={"Content-Range": f"bytes */{size}"},
        ) from None
    except MalformedRangeHeader as exc:
        reason = exc.content.removeprefix("Range header: ").rstrip(".")
        raise InvalidField(
            "Range", f"{header!r} is not a byte range ({reason}): write bytes=first-last, bytes=first- or bytes=-suffix"
        ) from None
