"""Request dependencies: a database session per request and the API-key check."""

from typing import Annotated

from fastapi import Depends, Header, HTTPException
from sqlalchemy.orm import Session

from service.db import get_session
from service.settings import get_settings

SessionDep = Annotated[Session, Depends(get_session)]


def require_api_key(
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    keys = get_settings().api_key_set
    if not keys:
        return
    presented = x_api_key or (authorization or "").removeprefix("Bearer ").strip()
    if presented not in keys:
        raise HTTPException(401, "missing or unknown API key: send 'Authorization: Bearer <key>'",
                            headers={"WWW-Authenticate": "Bearer"})
