"""The audit: every change (submit, sweep, cancel, relabel) and every refusal (401, 403, 429) is one row.

A change's row is written in the transaction of the change itself (jobs.submit,
jobs.submit_sweep, jobs.cancel, jobs.cancel_sweep, the relabel route), so that neither is
stored without the other. A refusal changes nothing, and its row is written on its own,
where the API answers it (service/api/audit_trail.py). Who and where are the request's
(``Actor``); an unknown key, or none, has no owner and no role.
"""

import uuid
from dataclasses import dataclass

from sqlalchemy import Connection, insert
from sqlalchemy.orm import Session

from service.identity import Caller
from service.models import AuditEntry, utcnow
from service.permissions import Action

# The detail is for people: a long one (a refusal's message) is cut here.
DETAIL_LENGTH = 500


@dataclass(frozen=True)
class Actor:
    """Who made a request, and from where."""

    caller: Caller | None  # None: an unknown key, or none
    client: str | None  # the client's address

    def entry(self, action: Action, target: str | None, status: int, detail: str) -> dict:
        """The audit row of this actor's request."""
        return dict(
            id=str(uuid.uuid4()),
            at=utcnow(),
            owner=self.caller.owner if self.caller else None,
            role=self.caller.role if self.caller else None,
            action=action,
            target=target,
            client=self.client,
            status=status,
            detail=detail[:DETAIL_LENGTH],
        )


# Built once, as jobs.submit's INSERT: a statement made per call costs more to build than to run.
_INSERT = insert(AuditEntry.__table__)


def record(connection: Connection | Session, entry: dict) -> None:
    """Write the row in the connection's transaction; the caller commits it with its change."""
    connection.execute(_INSERT, entry)
