"""The client itself: ``Client``, its errors, and the status names it waits on.

Import it as ``from service.client import Client``; service/client/__init__.py tells the
whole story. Needs only httpx: no torch, no server code.
"""

import contextlib
import hashlib
import os
import random
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import EllipsisType
from typing import Any, overload

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
# As the API names them (service.schemas), written out here: the client imports nothing of the server,
# and tests/test_client_extra.py checks that the two lists agree.
STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
TERMINAL_STATUSES = STATUSES[2:]
# Ids per search request while waiting on many experiments (the API's page limit is 500).
WAIT_BATCH = 500
# An artifact's name, as the server's service.artifacts.NAME_PATTERN (tests/test_artifacts_http.py checks that
# they agree): one file name, so that it is one path component in the URL and in the folder it is downloaded to.
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
# The download's ETag is the sha256 of the artifact's bytes, quoted.
SHA256_ETAG = re.compile(r'"([0-9a-f]{64})"')


class NclabError(Exception):
    """An error answer of the API; ``problem`` is its problem+json body (title, status, detail, errors)."""

    def __init__(self, status: int | None, detail: str, problem: dict | None = None):
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status, self.detail, self.problem = status, detail, problem or {}

    @property
    def errors(self) -> list[dict]:
        """The fields at fault, each ``{"field", "message", "type"}`` (422s)."""
        return self.problem.get("errors") or []


class InvalidRequest(NclabError):
    """400, 413 or 422: the request broke a rule; ``errors`` names the field."""


class Unauthorized(NclabError):
    """401: a missing or unknown API key."""


class Forbidden(NclabError):
    """403: the key's role may not do this (a reader only reads; a member changes only its own work)."""


class NotFound(NclabError):
    """404: no such experiment or sweep."""


class Conflict(NclabError):
    """409: e.g. canceling an experiment that has already finished."""


class Unavailable(NclabError):
    """The service could not be reached, or answered 503, after every retry."""


class ChecksumMismatch(NclabError):
    """A download's bytes are not the ones the API states (their sha256 differs): nothing was written."""


class WaitTimeout(TimeoutError):
    """``wait`` or ``wait_sweep`` ran out of time; ``last`` is what the last poll read."""

    def __init__(self, message: str, last: Any):
        super().__init__(message)
        self.last = last


_ERRORS = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    422: InvalidRequest,
    503: Unavailable,
}


# The pieces an upload is sent in.
UPLOAD_PIECE = 1 << 20


def _error(response: httpx.Response) -> NclabError:
    try:
        problem = response.json()
        detail = problem.get("detail") or problem.get("title") or response.reason_phrase
    except ValueError:
        problem, detail = {}, response.text.strip() or response.reason_phrase
    return _ERRORS.get(response.status_code, NclabError)(response.status_code, detail, problem)


def _backoff(attempt: int, retry_after: str | None = None) -> float:
    """Seconds before retry number ``attempt`` (0-based): the server's Retry-After, else exponential with jitter."""
    if retry_after and retry_after.isdigit():
        return min(float(retry_after), 30.0)
    return min(0.25 * 2**attempt, 8.0) * random.uniform(0.5, 1.0)


def _labels(**labels) -> dict:
    return {key: value for key, value in labels.items() if value is not None}


class Client:
    """One kept-alive connection to an nclab service.

    ``base_url`` defaults to ``NCLAB_URL`` (else http://127.0.0.1:8000), ``api_key`` to
    ``NCLAB_API_KEY``. ``retries`` bounds the retries of one call on connection errors and 503s.
    """

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, timeout: float = 30.0, retries: int = 5
    ):
        base_url = base_url or os.environ.get("NCLAB_URL") or DEFAULT_URL
        api_key = api_key or os.environ.get("NCLAB_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries = retries
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- transport

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict | None = None,
        json: Any = None,
        content: Iterator[bytes] | None = None,
        idempotency_key: str | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """The response, retried on connection errors and 503s when that is safe; an NclabError for an error.

        ``content``: a file to stream as the body (never retried: it is read once). ``stream``: the body is
        left unread, for the caller to read and close (``download``).
        """
        retryable = (method in ("GET", "PATCH") or idempotency_key is not None) and content is None
        headers = {**(headers or {}), **({"Idempotency-Key": idempotency_key} if idempotency_key else {})}
        request = self._http.build_request(
            method, path, params=_labels(**(params or {})), json=json, content=content, headers=headers
        )
        for attempt in range(self.retries + 1):
            last_try = not retryable or attempt == self.retries
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if last_try:
                    raise Unavailable(None, f"{self.base_url} unreachable: {exc.__class__.__name__}: {exc}") from exc
                time.sleep(_backoff(attempt))
                continue
            if response.status_code == 503 and not last_try:
                response.close()
                time.sleep(_backoff(attempt, response.headers.get("retry-after")))
                continue
            if response.is_error:
                response.read()  # a streamed error's problem body
                response.close()
                raise _error(response)
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _get(self, path: str, **params) -> Any:
        return self._request("GET", path, params=params).json()

    def _post(self, path: str, body: Any, idempotency_key: str | None = None) -> Any:
        return self._request("POST", path, json=body, idempotency_key=idempotency_key).json()

    # -- experiments

    def submit(
        self,
        spec: dict,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        priority: int | None = None,
    ) -> dict:
        """Queue one experiment; the experiment as stored (``id``, ``status``: queued, the spec with defaults).

        ``priority``: -10..10 (default 0), above 0 for admins only (else an NclabError, status 403)."""
        body = _labels(spec=spec, name=name, tags=tags, priority=priority)
        return self._post("/experiments", body, idempotency_key or str(uuid.uuid4()))

    def get(self, experiment_id: str) -> dict:
        return self._get(f"/experiments/{experiment_id}")

    def cancel(self, experiment_id: str) -> dict:
        """Cancel a queued or running experiment (a running one stops within seconds); Conflict if finished."""
        return self._post(f"/experiments/{experiment_id}/cancel", None)

    def relabel(
        self, experiment_id: str, name: str | EllipsisType | None = ..., tags: dict[str, str | None] | None = None
    ) -> dict:
        """Rename (``name=None`` clears the name; left out, it stays) and retag: ``tags`` are merged in, a None
        value removes that tag. The experiment as it is now."""
        return self._patch(f"/experiments/{experiment_id}", name, tags)

    def _patch(self, path: str, name: str | EllipsisType | None, tags: dict[str, str | None] | None) -> dict:
        body: dict[str, Any] = {} if name is ... else {"name": name}
        if tags:
            body["tags"] = tags
        return self._request("PATCH", path, json=body).json()

    def history(self, experiment_id: str, after: int | None = None) -> list[dict]:
        """The metric rows in step order, ``{"step", "loss", "nc1", ...}``; ``after``: only later steps."""
        return self._get(f"/experiments/{experiment_id}/metrics", after=after)["items"]

    def history_csv(self, experiment_id: str) -> str:
        return self._request("GET", f"/experiments/{experiment_id}/metrics", params={"format": "csv"}).text

    def history_png(self, experiment_id: str, metrics: str = "nc1", width: int = 800, height: int = 500) -> bytes:
        return self._request(
            "GET",
            f"/experiments/{experiment_id}/metrics.png",
            params={"metric": metrics, "width": width, "height": height},
        ).content

    # -- artifacts

    def artifacts(self, experiment_id: str) -> list[dict]:
        """The files the experiment kept, by name: ``{"name", "bytes", "sha256", "media_type", "created_at"}``."""
        return self._get(f"/experiments/{experiment_id}/artifacts")["items"]

    def download(self, experiment_id: str, name: str, path: str | os.PathLike[str]) -> Path:
        """Stream an artifact into ``path`` (a file, or a directory to put ``name`` in); the file written.

        The bytes go to a hidden file beside the target, which takes the target's name only
        once their sha256 equals the one the API states for them (the response's ETag, as
        in the listing). A download cut short (Unavailable) or bytes that differ
        (ChecksumMismatch) leave nothing behind, and a file already at ``path`` as it was.
        """
        if not ARTIFACT_NAME.fullmatch(name):
            raise InvalidRequest(
                None, f"{name!r} is not an artifact name: a file name of letters, digits, '.', '_', '-'"
            )
        target = Path(path)
        if target.is_dir():
            target = target / name
        # "identity": the bytes as stored, which the ETag's sha256 is of, not a compressed form of them.
        response = self._request(
            "GET",
            f"/experiments/{experiment_id}/artifacts/{name}",
            headers={"Accept-Encoding": "identity"},
            stream=True,
        )
        with contextlib.closing(response):
            expected = _sha256_etag(response, name)
            partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")
            try:
                received = _write_hashed(response, partial)
                if received != expected:
                    raise ChecksumMismatch(
                        None, f"{name}: the bytes received have sha256 {received}, the API states {expected}"
                    )
                partial.replace(target)
            except httpx.TransportError as exc:
                raise Unavailable(None, f"{name}: the download broke off: {exc.__class__.__name__}: {exc}") from exc
            finally:
                partial.unlink(missing_ok=True)
        return target

    # -- analyses of features trained elsewhere

    def upload(self, path: str | os.PathLike[str]) -> dict:
        """Upload a file of features (safetensors or npz: features, labels, optionally classifier, bias,
        test_features, test_labels), streamed from disk; ``{"id", "bytes", "sha256", "layout", ...}``."""
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            # 1 MiB at a time: httpx reads a file 64 KiB at a time, a send (and its framing) each.
            pieces = iter(lambda: file.read(UPLOAD_PIECE), b"")
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            return self._request("POST", "/uploads", content=pieces, headers=headers).json()

    def uploads(self, owner: str | None = None) -> Iterator[dict]:
        """Every upload (only ``owner``'s, if given), newest first."""
        return self._pages("/uploads", {"limit": 100, "owner": owner})

    def delete_upload(self, upload_id: str) -> None:
        """Delete an upload (its owner or an admin); Conflict while an unfinished analysis reads it. Not retried:
        a second try after a lost answer would read 404 for a delete that happened."""
        self._request("DELETE", f"/uploads/{upload_id}")

    def analyze(
        self,
        features,
        labels,
        classifier=None,
        bias=None,
        test_features=None,
        test_labels=None,
        *,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        **spec,
    ) -> dict:
        """Queue the metric catalogue of features (N x d, or S x N x d for S checkpoints) with their labels (N),
        numpy arrays or torch tensors; the experiment as stored. ``spec``: the analysis's other fields
        (``model``, ``dataset``, ``epoch``, ``logit_scale``, ``steps``, ...).

        The tensors are written to a temporary safetensors file, which is uploaded (``upload``). Needs numpy
        and safetensors (``pip install 'nclab[analyze]'``).
        """
        arrays = {
            "features": features,
            "labels": labels,
            "classifier": classifier,
            "bias": bias,
            "test_features": test_features,
            "test_labels": test_labels,
        }
        with tempfile.TemporaryDirectory(prefix="nclab-") as folder:
            path = Path(folder) / "features.safetensors"
            _write_safetensors(path, {key: value for key, value in arrays.items() if value is not None})
            upload = self.upload(path)
        return self.submit({"kind": "analysis", "source": {"upload": upload["id"]}, **spec}, name=name, tags=tags)

    # -- sweeps

    def sweep(
        self,
        base: dict,
        grid: dict[str, list] | None = None,
        variants: list[dict] | None = None,
        name: str | None = None,
        tags: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        priority: int | None = None,
    ) -> dict:
        """Queue base x each variant x the grid's product; the sweep (``id``, ``size``, ``members``); ``priority``
        is every member's."""
        body = _labels(base=base, grid=grid, variants=variants, name=name, tags=tags, priority=priority)
        return self._post("/sweeps", body, idempotency_key or str(uuid.uuid4()))

    def get_sweep(self, sweep_id: str) -> dict:
        """The sweep with ``status_counts``, ``progress`` and its ``members``' ids."""
        return self._get(f"/sweeps/{sweep_id}")

    def relabel_sweep(
        self, sweep_id: str, name: str | EllipsisType | None = ..., tags: dict[str, str | None] | None = None
    ) -> dict:
        """Relabel a sweep and its members (``relabel``'s arguments): its tags are merged into every member's, and
        a member still named as the sweep was takes the new name. The sweep as it is now."""
        return self._patch(f"/sweeps/{sweep_id}", name, tags)

    def cancel_sweep(self, sweep_id: str) -> dict:
        return self._post(f"/sweeps/{sweep_id}/cancel", None)

    def sweeps(self) -> Iterator[dict]:
        """Every sweep, newest first."""
        return self._pages("/sweeps", {"limit": 100})

    # -- waiting

    # A str is an Iterable[str] too: the first overload, which wins, is the one meant for it.
    @overload
    def wait(  # type: ignore[overload-overlap]
        self,
        ids: str,
        timeout: float | None = None,
        on_progress: Callable[[list[dict]], None] | None = None,
        max_interval: float = 2.0,
    ) -> dict: ...

    @overload
    def wait(
        self,
        ids: Iterable[str],
        timeout: float | None = None,
        on_progress: Callable[[list[dict]], None] | None = None,
        max_interval: float = 2.0,
    ) -> list[dict]: ...

    def wait(
        self,
        ids: str | Iterable[str],
        timeout: float | None = None,
        on_progress: Callable[[list[dict]], None] | None = None,
        max_interval: float = 2.0,
    ) -> dict | list[dict]:
        """Poll until every experiment has finished (succeeded, failed or canceled); their final states.

        One id gives one dict, several a list in the same order. ``on_progress`` gets the
        latest states of all of them after every round. Polls start 0.1 s apart and back
        off to ``max_interval``; many ids are read a few hundred per request.
        Raises WaitTimeout after ``timeout`` seconds.
        """
        single = isinstance(ids, str)
        order = [ids] if isinstance(ids, str) else list(dict.fromkeys(ids))
        latest: dict[str, dict] = {}

        def read() -> list[dict]:
            pending = [i for i in order if latest.get(i, {}).get("status") not in TERMINAL_STATUSES]
            for experiment in self._states(pending):
                latest[experiment["id"]] = experiment
            missing = [i for i in pending if i not in latest]
            if missing:
                raise NotFound(404, f"no experiment with id {missing[0]!r}")
            return [latest[i] for i in order]

        def finished(states: list[dict]) -> bool:
            return all(state["status"] in TERMINAL_STATUSES for state in states)

        def unfinished(states: list[dict]) -> str:
            return f"{sum(s['status'] not in TERMINAL_STATUSES for s in states)} of {len(states)} experiments"

        states = _poll(read, finished, unfinished, timeout, on_progress, max_interval)
        return states[0] if single else states

    def wait_sweep(
        self,
        sweep_id: str,
        timeout: float | None = None,
        on_progress: Callable[[dict], None] | None = None,
        max_interval: float = 2.0,
    ) -> dict:
        """Poll the sweep until every member has finished; the sweep (``status_counts`` says how they ended)."""

        def finished(sweep: dict) -> bool:
            return sum(sweep["status_counts"][status] for status in TERMINAL_STATUSES) == sweep["size"]

        def unfinished(sweep: dict) -> str:
            counts = sweep["status_counts"]
            return f"{counts['queued'] + counts['running']} of {sweep['size']} members"

        return _poll(lambda: self.get_sweep(sweep_id), finished, unfinished, timeout, on_progress, max_interval)

    def _states(self, ids: list[str]) -> list[dict]:
        if len(ids) == 1:
            return [self.get(ids[0])]
        states = []
        for start in range(0, len(ids), WAIT_BATCH):
            batch = ids[start : start + WAIT_BATCH]
            where = f"id in ({', '.join(repr(i) for i in batch)})"
            states += self._request("POST", "/experiments/search", json={"where": where, "limit": WAIT_BATCH}).json()[
                "items"
            ]
        return states

    # -- identity and audit

    def me(self) -> dict:
        """Who the key names: ``{"owner", "role"}`` (the anonymous admin where the service has no keys)."""
        return self._get("/me")

    def audit(self, where: str | None = None, order_by: str | None = None, page_size: int = 500) -> Iterator[dict]:
        """Every matching audit row (the audit's fields: id, at, owner, role, action, target, client, status,
        detail), page after page; newest first by default. Admins only (else Forbidden)."""
        return self._pages("/audit", {"where": where, "order_by": order_by, "limit": page_size})

    def audit_csv(self, where: str | None = None, order_by: str | None = None) -> str:
        """Every matching audit row as CSV."""
        return self._request("GET", "/audit", params={"where": where, "order_by": order_by, "format": "csv"}).text

    # -- comparison

    def search(self, where: str | None = None, order_by: str | None = None, page_size: int = 500) -> Iterator[dict]:
        """Every matching experiment (filter language), page after page; newest first by default."""
        return self._pages("/experiments", {"where": where, "order_by": order_by, "limit": page_size})

    def _pages(self, path: str, params: dict) -> Iterator[dict]:
        cursor = None
        while True:
            page = self._get(path, **params, cursor=cursor)
            yield from page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def search_csv(self, where: str | None = None, order_by: str | None = None) -> str:
        """Every match as CSV (the whole match, not a page)."""
        return self._request("GET", "/experiments", params={"where": where, "order_by": order_by, "format": "csv"}).text

    def aggregate(
        self, where: str | None = None, group_by: str | None = None, metrics: str | None = None
    ) -> list[dict]:
        """Per group: ``count`` and, per metric, ``{"n", "mean", "std", "min", "max", "median"}``."""
        return self._get("/experiments/aggregate", where=where, group_by=group_by, metrics=metrics)["items"]

    def aggregate_csv(self, where: str | None = None, group_by: str | None = None, metrics: str | None = None) -> str:
        return self._request(
            "GET",
            "/experiments/aggregate",
            params={"where": where, "group_by": group_by, "metrics": metrics, "format": "csv"},
        ).text

    def curves(self, where: str | None = None, group_by: str | None = None, metric: str = "nc1") -> list[dict]:
        """Per group, ``{"group", "points": [{"step", "n", "mean", "std", "min", "max"}, ...]}``."""
        return self._get("/experiments/curves", where=where, group_by=group_by, metric=metric)["items"]

    def curves_png(
        self,
        where: str | None = None,
        group_by: str | None = None,
        metric: str = "nc1",
        width: int = 800,
        height: int = 500,
    ) -> bytes:
        """The curves as a PNG: mean per group over the steps, a band of one standard deviation."""
        return self._request(
            "GET",
            "/experiments/curves.png",
            params={"where": where, "group_by": group_by, "metric": metric, "width": width, "height": height},
        ).content


def _write_safetensors(path: Path, arrays: dict) -> None:
    """numpy arrays or torch tensors (read through their numpy view, on the CPU) as a safetensors file."""
    try:
        import numpy as np
        from safetensors.numpy import save_file
    except ImportError as exc:
        raise ImportError(f"Client.analyze needs numpy and safetensors: pip install 'nclab[analyze]' ({exc})") from exc

    def as_numpy(value):
        if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy type
            value = value.detach().cpu()
            value = value.float() if str(value.dtype) == "torch.bfloat16" else value
            value = value.numpy()
        return np.ascontiguousarray(value)

    save_file({key: as_numpy(value) for key, value in arrays.items()}, str(path))


def _sha256_etag(response: httpx.Response, name: str) -> str:
    found = SHA256_ETAG.fullmatch(response.headers.get("etag", ""))
    if found is None:
        raise NclabError(None, f"{name}: the response states no sha256 (ETag {response.headers.get('etag')!r})")
    return found.group(1)


def _write_hashed(response: httpx.Response, path: Path) -> str:
    """Write a streamed body to a new file at ``path``; the sha256 of what was written."""
    digest = hashlib.sha256()
    with path.open("xb") as file:  # created with the usual permissions (not a temporary file's 0600)
        for chunk in response.iter_bytes():
            digest.update(chunk)
            file.write(chunk)
    return digest.hexdigest()


def _poll(
    read: Callable[[], Any],
    finished: Callable[[Any], bool],
    unfinished: Callable[[Any], str],
    timeout: float | None,
    on_progress: Callable[[Any], None] | None,
    max_interval: float,
) -> Any:
    """Call ``read`` until ``finished`` says so, 0.1 s apart at first, backing off to ``max_interval``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    interval = 0.1
    while True:
        state = read()
        if on_progress is not None:
            on_progress(state)
        if finished(state):
            return state
        if deadline is not None and time.monotonic() + interval > deadline:
            raise WaitTimeout(f"{unfinished(state)} unfinished after {timeout} s", state)
        time.sleep(interval)
        interval = min(interval * 1.5, max_interval)


def to_pandas(rows: list[dict]):
    """A pandas DataFrame of rows from the client (nested dicts flattened as ``spec.K``); needs pandas."""
    try:
        import pandas
    except ImportError:
        raise ImportError("to_pandas needs pandas: pip install pandas") from None
    return pandas.json_normalize(rows)
