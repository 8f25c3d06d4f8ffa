"""Idempotent submits: a POST retried with the same Idempotency-Key creates nothing new.

The key's row is written in the same transaction as what the request creates. Under
concurrent retries the table's primary key lets exactly one transaction through; the
others wait for it to commit, fail on the key, and answer with what it created.
"""

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import Connection, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.models import IdempotencyKey, utcnow

KEY_LIFETIME = timedelta(hours=24)


class KeyReused(Exception):
    """The key was used, within its lifetime, for another request."""


def fingerprint(route: str, request: dict) -> str:
    """The route and the validated request, canonically: whitespace and key order do not matter."""
    canonical = json.dumps([route, request], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _earlier(connection: Connection | Session, owner: str, key: str, request_fingerprint: str) -> str | None:
    """The id this key created, if it is still live; an expired key is forgotten here."""
    record = connection.execute(
        select(IdempotencyKey.fingerprint, IdempotencyKey.resource_id, IdempotencyKey.created_at)
        .where(IdempotencyKey.owner == owner, IdempotencyKey.key == key)
    ).one_or_none()
    if record is None:
        return None
    if utcnow() - record.created_at > KEY_LIFETIME:
        connection.execute(delete(IdempotencyKey).where(IdempotencyKey.owner == owner, IdempotencyKey.key == key))
        connection.commit()
        return None
    if record.fingerprint != request_fingerprint:
        raise KeyReused(f"Idempotency-Key {key!r} was used within the last 24 h for a different request; "
                        "send a new key for a new request")
    return record.resource_id


def create_once(connection: Connection | Session, owner: str, key: str, request_fingerprint: str,
                create: Callable[[dict], str]) -> tuple[str, bool]:
    """The id of what this request created, and whether it was created now.

    ``create`` stores the resource and the key's record (its columns but the resource's
    id) in one commit, and returns the resource's id.
    """
    earlier = _earlier(connection, owner, key, request_fingerprint)
    if earlier is not None:
        return earlier, False
    record = dict(owner=owner, key=key, fingerprint=request_fingerprint, created_at=utcnow())
    try:
        return create(record), True
    except IntegrityError:
        # A concurrent request with this key committed first.
        connection.rollback()
        earlier = _earlier(connection, owner, key, request_fingerprint)
        if earlier is None:
            raise
        return earlier, False


def forget_expired(session: Session) -> int:
    """Delete the keys past their lifetime; the number deleted."""
    count = session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - KEY_LIFETIME)
    ).rowcount
    session.commit()
    return count
