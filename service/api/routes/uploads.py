"""/uploads: files of features for analysis, streamed to the artifact store and checked before they are kept;
listed newest first, and deleted by their owner (or an admin) once no unfinished analysis reads them.

The body is the file itself (``application/octet-stream``), written to the store as it
arrives, under a partial name, and hashed on the way. Then its header is checked
(service/feature_files.py) from the stored copy; a file that passes is renamed and its
row and audit row committed together, a refused or broken-off one is removed: nothing of
a refusal is kept.
"""

import asyncio
import hashlib
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import HTTPException, Query, Request, Response
from sqlalchemy import delete as sql_delete
from starlette.concurrency import run_in_threadpool

from service import analysis, audit, permissions
from service.api.deps import ActorDep, CallerDep, SessionDep, api_router, get_or_404, not_found
from service.api.formats import json_bytes
from service.api.problems import InvalidField, problem_responses
from service.artifacts import ArtifactStore, get_store
from service.db import rowcount
from service.feature_files import BadFeatureFile, count_classes, inspect
from service.models import Upload, utcnow
from service.schemas import UploadList, UploadOut
from service.search import newest_first
from service.settings import get_settings

router = api_router("/uploads", "uploads")
# The body arrives in the server's pieces (64 KiB); each write to the store is a hop to a thread and back,
# so they are gathered to this size first.
WRITE_SIZE = 4 << 20
# Pieces received but not yet hashed and written: the hash is the slowest stage for a moment now and then,
# and a queue this deep keeps the receiving going meanwhile (one piece deep, 1 GB took a third longer).
# An upload holds at most this many pieces plus one in memory.
PIECES_IN_FLIGHT = 8
FILE_BODY = {
    "requestBody": {
        "required": True,
        "description": "the file: safetensors or npz holding features, labels and optionally classifier, bias, "
        "test_features, test_labels (docs/api.md)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.post(
    "",
    name="upload.submit",
    status_code=201,
    response_model=UploadOut,
    responses=problem_responses(403, 413, 422),
    openapi_extra=FILE_BODY,
)
async def upload(request: Request, session: SessionDep, caller: CallerDep, actor: ActorDep) -> Response:
    """Store a file of features; ``201`` with its id, size and sha256 (and what its header shows).

    Over NCLAB_MAX_UPLOAD_BYTES is a 413; a file whose header breaks a rule is a 422 naming the
    tensor (``features``, ``labels``, ...) and the rule. Neither keeps anything.
    """
    permissions.check(caller, "upload.submit")
    # Any body is taken as the file's bytes (curl --data-binary says application/x-www-form-urlencoded), but a
    # form's: its bytes are the form's envelope, not the file.
    content_type = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if content_type.startswith("multipart/"):
        raise InvalidField(
            "Content-Type", f"{content_type!r}: send the file itself as the body (application/octet-stream)"
        )
    upload_id = str(uuid.uuid4())
    store = get_store()
    try:
        size, sha256 = await _receive(request, store, upload_id, get_settings().max_upload_bytes)
        layout, classes = await run_in_threadpool(_check, store, upload_id, size)
        await run_in_threadpool(store.keep_upload, upload_id)
        row = Upload(
            id=upload_id,
            owner=caller.owner,
            bytes=size,
            sha256=sha256,
            layout=layout,
            classes=classes,
            created_at=utcnow(),
        )
        session.add(row)
        audit.record(session, actor.entry("upload.submit", upload_id, 201, f"{size} bytes, {layout['format']}"))
        await run_in_threadpool(session.commit)
    except BaseException:
        await run_in_threadpool(store.discard_upload, upload_id)
        raise
    body = json_bytes(UploadOut.model_validate(row).model_dump(mode="json"))
    return Response(body, status_code=201, headers={"Location": f"/uploads/{upload_id}"}, media_type="application/json")


@router.get("/{upload_id}", response_model=UploadOut, responses=problem_responses(404))
def read(upload_id: str, session: SessionDep) -> Upload:
    return get_or_404(session, Upload, upload_id)


@router.get("", response_model=UploadList)
def list_uploads(
    session: SessionDep,
    owner: Annotated[str | None, Query(description="only this owner's uploads")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> UploadList:
    """Newest first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    where = [] if owner is None else [Upload.owner == owner]
    try:
        rows, next_cursor = newest_first.page(session, Upload, limit, cursor, *where)
    except newest_first.UnknownCursor as exc:
        raise InvalidField("cursor", str(exc)) from None
    return UploadList(items=[UploadOut.model_validate(row) for row in rows], next_cursor=next_cursor)


@router.delete("/{upload_id}", name="upload.delete", status_code=204, responses=problem_responses(403, 404, 409))
def delete(upload_id: str, session: SessionDep, caller: CallerDep, actor: ActorDep) -> Response:
    """Delete the file and its record. Its owner's members and the admins may; an unfinished analysis that
    reads it is a 409 (cancel it first). Finished analyses keep their results; they cannot be re-run."""
    upload = get_or_404(session, Upload, upload_id)
    permissions.check(caller, "upload.delete", upload_id, upload.owner)
    size = upload.bytes
    # The row goes before the readers are looked for: a concurrent analysis submit then either committed first
    # and is found here, or waits for this transaction and finds the upload gone (analysis.hold_uploads). A
    # concurrent delete that went first leaves nothing to delete.
    if rowcount(session.execute(sql_delete(Upload).where(Upload.id == upload_id))) == 0:
        session.rollback()
        raise not_found(Upload, upload_id)
    readers = analysis.unfinished_readers(session, upload_id)
    if readers:
        session.rollback()
        raise HTTPException(409, f"upload {upload_id} is read by the unfinished analyses {', '.join(readers)}")
    audit.record(session, actor.entry("upload.delete", upload_id, 204, f"{size} bytes"))
    session.commit()
    # After the commit: a file without its row is never analysed, whereas a row without its file would be.
    get_store().discard_upload(upload_id)
    return Response(status_code=204)


async def _receive(request: Request, store: ArtifactStore, upload_id: str, cap: int) -> tuple[int, str]:
    """Write the body into the store's partial file as it arrives: its size and sha256; 413 past ``cap``.

    Pipelined: one thread hashes and another writes (hashlib and the write both let go of the GIL) while
    the event loop receives; each thread takes the pieces in order. The loop waits only when
    PIECES_IN_FLIGHT pieces are queued, which bounds the memory an upload holds. A piece is the server's
    chunks as they came, never joined: no byte is copied on the way.
    """
    digest = hashlib.sha256()
    size, pending, pending_size = 0, [], 0
    in_flight: deque[asyncio.Future] = deque()  # pieces handed to the threads, oldest first
    file = await run_in_threadpool(store.receive_upload, upload_id)
    with ThreadPoolExecutor(1, "upload-hash") as hasher, ThreadPoolExecutor(1, "upload-write") as writer:

        def hand_over(chunks: list[bytes]) -> None:
            hashed = asyncio.wrap_future(hasher.submit(_hash, digest, chunks))
            written = asyncio.wrap_future(writer.submit(file.writelines, chunks))
            in_flight.append(asyncio.gather(hashed, written))

        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    raise HTTPException(413, f"the file passed {cap} bytes, the most taken (NCLAB_MAX_UPLOAD_BYTES)")
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= WRITE_SIZE:
                    hand_over(pending)
                    pending, pending_size = [], 0
                    if len(in_flight) > PIECES_IN_FLIGHT:
                        await in_flight.popleft()
            hand_over(pending)
            while in_flight:
                await in_flight.popleft()
        finally:
            await asyncio.gather(*in_flight, return_exceptions=True)  # the file is not closed under a write
            await run_in_threadpool(file.close)
    return size, digest.hexdigest()


def _hash(digest, chunks: list[bytes]) -> None:
    for chunk in chunks:
        digest.update(chunk)


def _check(store: ArtifactStore, upload_id: str, size: int) -> tuple[dict, int]:
    """The stored file's layout and number of classes, or a 422 naming the tensor and the rule."""
    try:
        with store.open_upload(upload_id, partial=True) as file:
            layout = inspect(file, size)
            return layout.describe(), count_classes(file, layout)
    except BadFeatureFile as exc:
        raise InvalidField(exc.tensor or "body", exc.message) from None
