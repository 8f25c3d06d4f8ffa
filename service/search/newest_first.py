"""Pages of rows newest first, by (created_at, id): the listings of sweeps and uploads.

A page's cursor is the id of its last row; the next page is what comes after that row in
the order, so rows created meanwhile never shift a page.
"""

from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

Row = TypeVar("Row", bound=Any)


class UnknownCursor(ValueError):
    """A cursor that no page returned."""


def page(session: Session, model: type[Row], limit: int, cursor: str | None, *where) -> tuple[list[Row], str | None]:
    """Up to ``limit`` rows of ``model`` (that meet ``where``) after the row ``cursor`` names, and the cursor of
    the next page (None on the last)."""
    query: Select = select(model).where(*where).order_by(model.created_at.desc(), model.id.desc())
    if cursor is not None:
        last = session.get(model, cursor)
        if last is None:
            raise UnknownCursor("not a cursor returned by this API")
        query = query.where(
            (model.created_at < last.created_at) | ((model.created_at == last.created_at) & (model.id < last.id))
        )
    rows = session.scalars(query.limit(limit + 1)).all()
    return list(rows[:limit]), rows[limit - 1].id if len(rows) > limit else None
