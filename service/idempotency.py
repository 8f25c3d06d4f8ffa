"""Idempotent submits: a POST retried with the same Idempotency-Key creates nothing new.

The key's row is written in the same transaction as what the request creates
(jobs.submit, jobs.submit_sweep). Under concurrent retries the table's primary key lets
exactly one transaction through; the others fail on the key and answer with what it
created.
"""

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection, delete, select
from sqlalchemy.orm import Session

from service.db import rowcount
from service.models import IdempotencyKey, utcnow

KEY_LIFETIME = timedelta(hours=24)


class KeyReused(Exception):
    """The key was used, within its lifetime, for another request."""


@dataclass(frozen=True)
class Keyed:
    """A request's Idempotency-Key, scoped to its owner, and the request's fingerprint."""

    owner: str
    key: str
    fingerprint: str

    def record(self, resource_id: str) -> dict:
        """The key's row, naming what the request created."""
        return dict(
            owner=self.owner, key=self.key, fingerprint=self.fingerprint, resource_id=resource_id, created_at=utcnow()
        )


def keyed(owner: str, key: str | None, route: str, request: dict) -> Keyed | None:
    """The request's key with its fingerprint: the route and the validated request, canonically
    (whitespace and key order do not matter); None without a key."""
    if key is None:
        return None
    canonical = json.dumps([route, request], sort_keys=True, separators=(",", ":"))
    return Keyed(owner, key, hashlib.sha256(canonical.encode()).hexdigest())


def earlier(connection: Connection | Session, request: Keyed) -> str | None:
    """The id this key created, if it is still live; an expired key is forgotten here."""
    record = connection.execute(
        select(IdempotencyKey.fingerprint, IdempotencyKey.resource_id, IdempotencyKey.created_at).where(
            IdempotencyKey.owner == request.owner, IdempotencyKey.key == request.key
        )
    ).one_or_none()
    if record is None:
        return None
    if utcnow() - record.created_at > KEY_LIFETIME:
        connection.execute(
            delete(IdempotencyKey).where(IdempotencyKey.owner == request.owner, IdempotencyKey.key == request.key)
        )
        connection.commit()
        return None
    if record.fingerprint != request.fingerprint:
        raise KeyReused(
            f"Idempotency-Key {request.key!r} was used within the last 24 h for a different request; "
            "send a new key for a new request"
        )
    return record.resource_id


def forget_expired(session: Session) -> int:
    """Delete the keys past their lifetime; the number deleted."""
    count = rowcount(session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - KEY_LIFETIME)))
    session.commit()
    return count
