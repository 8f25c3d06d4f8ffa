"""ASGI guards that answer before routing: request bodies over the size cap, NUL characters.

Both would otherwise reach the database or the parser as they are: PostgreSQL rejects a
NUL in text with an error, and an unbounded body is read into memory whole. A file upload
(``POST /uploads``) has a cap of its own, and its body is streamed by the route, which counts it.
"""

from urllib.parse import parse_qsl

from service.api.problems import problem


def _refusal(status: int, detail: str, field: str | None = None):
    """The problem+json answer, an ASGI app of its own."""
    return problem(status, detail, errors=[{"field": field, "message": detail, "type": "invalid"}] if field else [])


UPLOAD_PATH = "/uploads"


class RequestGuard:
    def __init__(self, app, max_body_bytes: int, max_upload_bytes: int):
        self.app, self.max_body_bytes, self.max_upload_bytes = app, max_body_bytes, max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        uploading = scope["method"] == "POST" and scope["path"] == UPLOAD_PATH
        refusal = self._refusal_before_body(scope, length, uploading)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if length is not None or uploading:
            return await self.app(scope, receive, send)
        # No length given (a chunked body): read it here, up to the cap, and hand it on.
        messages, received = [], 0
        while True:
            message = await receive()
            messages.append(message)
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                refusal = _refusal(
                    413, f"the body passed {self.max_body_bytes} bytes, the most taken (NCLAB_MAX_BODY_BYTES)"
                )
                return await refusal(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    def _refusal_before_body(self, scope, length: int | None, uploading: bool):
        """A NUL character in the path or the query, or a declared ``length`` over the cap."""
        if "\x00" in scope["path"]:
            return _refusal(422, "the path contains a NUL character", "path")
        for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if "\x00" in name or "\x00" in value:
                return _refusal(422, f"{name.strip(chr(0))}: contains a NUL character", name)
        if uploading and length is not None and length > self.max_upload_bytes:
            return _refusal(
                413, f"the file is {length} bytes; at most {self.max_upload_bytes} are taken (NCLAB_MAX_UPLOAD_BYTES)"
            )
        if not uploading and length is not None and length > self.max_body_bytes:
            return _refusal(
                413, f"the body is {length} bytes; at most {self.max_body_bytes} are taken (NCLAB_MAX_BODY_BYTES)"
            )
        return None
