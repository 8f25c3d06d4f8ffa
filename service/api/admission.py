"""What a submit (an experiment or a sweep) must pass before anything is stored, beside the roles' rule
(service/permissions.py): the owner's queued quota. Its refusal is an HTTPException, so that it is answered (and
audited) as problem+json."""

from fastapi import HTTPException
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from service import scheduler
from service.settings import Settings

# A full queue frees as its owner's jobs start: no time can be promised, this is how soon asking again is reasonable.
QUEUE_FULL_RETRY_SECONDS = 30


def check_queued_quota(connection: Connection | Session, owner: str, adding: int, settings: Settings) -> None:
    """A 429 with Retry-After when ``adding`` more queued jobs would take the owner past NCLAB_MAX_QUEUED_PER_OWNER.

    Checked against what is stored: two submits of one owner at the same instant may each pass.
    """
    cap = settings.max_queued_per_owner
    if cap is None:
        return
    queued = scheduler.queued_of_owner(connection, owner)
    if queued + adding > cap:
        raise HTTPException(
            429,
            f"owner {owner!r} has {queued} queued experiments; {adding} more would pass "
            f"NCLAB_MAX_QUEUED_PER_OWNER = {cap}: wait for some to start, or cancel some",
            headers={"Retry-After": str(QUEUE_FULL_RETRY_SECONDS)},
        )
