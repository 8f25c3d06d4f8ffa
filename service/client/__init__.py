"""A Python client for the nclab API: submit, sweep, wait, search, compare and download artifacts from a script.

    from service.client import Client

    with Client() as nclab:  # NCLAB_URL and NCLAB_API_KEY, or Client(url, api_key=...)
        sweep = nclab.sweep(**json.load(open("examples/digits-three-modes.json")))
        nclab.wait(sweep["members"])
        print(nclab.aggregate(where=f"sweep = '{sweep['id']}'", group_by="spec.normalization", metrics="nc1"))

Every method returns plain dicts (or lists of them) as the API writes them. Errors are
``NclabError`` subclasses carrying the problem+json body. GETs are retried with backoff
on connection errors and 503s; a POST only when it carries an idempotency key, which
``submit`` and ``sweep`` always send, so that a retried submit never runs twice.

The client and the ``nclab`` lab commands (service/client/cli.py) need only httpx, typer
and rich, which is all that ``pip install 'nclab[client]'`` brings: no FastAPI, Celery,
SQLAlchemy, torch or matplotlib. So nothing in this package imports the rest of
``service``; the server may import from here, never the other way round.
"""

from service.client.core import (
    DEFAULT_URL,
    STATUSES,
    TERMINAL_STATUSES,
    ChecksumMismatch,
    Client,
    Conflict,
    Forbidden,
    InvalidRequest,
    NclabError,
    NotFound,
    Unauthorized,
    Unavailable,
    WaitTimeout,
    to_pandas,
)

__all__ = [
    "DEFAULT_URL",
    "STATUSES",
    "TERMINAL_STATUSES",
    "ChecksumMismatch",
    "Client",
    "Conflict",
    "Forbidden",
    "InvalidRequest",
    "NclabError",
    "NotFound",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "to_pandas",
]
