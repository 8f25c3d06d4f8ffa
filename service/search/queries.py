"""Lab-wide queries over the experiments: search pages, aggregates and curves, in SQL.

Each takes a type-checked filter tree (service/search/language.py) and lets the database
do the work: filtering, ordering, grouping and the statistics (mean, sample std, min,
max, median) all run in one statement. SQLite gets ``stddev_samp`` and ``median`` as
aggregate functions of its own (service/search/sqlite_functions.py).
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Label, Select, Text, bindparam, cast, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.models import HISTORY_COLUMNS, AuditEntry, Experiment, MetricRow
from service.search import sql
from service.search.fields import AUDIT_FIELDS, Field, audit_lookup, lookup
from service.search.language import Filter, OrderKey
from service.search.sql import JSONValue


def _json_text(document) -> Label[Any]:
    return cast(document, Text).label(document.key)


# An experiment as the API shows it (schemas.ExperimentOut), read as plain columns, with
# its tags, spec and result as the database's JSON text: a page of these is passed on
# without parsing its documents, building ORM objects or validating them again.
RESOURCE_COLUMNS: list[InstrumentedAttribute[Any] | Label[Any]] = [
    Experiment.id,
    Experiment.status,
    Experiment.owner,
    Experiment.name,
    _json_text(Experiment.tags),
    Experiment.sweep,
    _json_text(Experiment.spec),
    Experiment.progress,
    _json_text(Experiment.result),
    Experiment.error,
    Experiment.cancel_requested,
    Experiment.attempts,
    Experiment.queue,
    Experiment.priority,
    Experiment.resumed_from_epoch,
    _json_text(Experiment.environment),
    Experiment.created_at,
    Experiment.started_at,
    Experiment.finished_at,
]
RESOURCE_KEYS = [column.key for column in RESOURCE_COLUMNS]
# The keys whose values are JSON text (the documents, read by _json_text): a response passes them
# through, the dashboard parses them.
DOCUMENT_KEYS = tuple(column.key for column in RESOURCE_COLUMNS if isinstance(column, Label))


@dataclass
class Page:
    """Experiments as dicts of RESOURCE_KEYS (tags, spec and result hold JSON text), and the next page's cursor."""

    items: list[dict]
    next_cursor: str | None


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def matching(session: Session, tree: Filter | None) -> Select:
    """SELECT experiments WHERE the filter holds."""
    return select(Experiment).where(sql.compile_filter(tree, _dialect(session)))


def search(
    session: Session, tree: Filter | None, order: list[OrderKey] | None, limit: int, cursor: str | None = None
) -> Page:
    """One page in the given order (newest first by default); its cursor leads to the next."""
    return _page(session, RESOURCE_COLUMNS, tree, order or sql.DEFAULT_ORDER, limit, cursor)


# An audit row as GET /audit shows it: its columns, id first.
AUDIT_COLUMNS = [getattr(AuditEntry, name) for name in AUDIT_FIELDS]
AUDIT_ORDER = [OrderKey(audit_lookup("at"), descending=True)]


def audit(session: Session, tree: Filter | None, order: list[OrderKey] | None, limit: int, cursor: str | None) -> Page:
    """One page of the audit (a filter and an order of its fields), newest first by default."""
    return _page(session, AUDIT_COLUMNS, tree, order or AUDIT_ORDER, limit, cursor)


def audit_stream(session: Session, tree: Filter | None, order: list[OrderKey] | None) -> Iterator[tuple]:
    """Every match of the audit, as AUDIT_COLUMNS, in order, fetched in batches."""
    return stream(session, tree, order or AUDIT_ORDER, AUDIT_COLUMNS)


def _page(session: Session, columns: list, tree: Filter | None, keys: list[OrderKey], limit: int, cursor: str | None):
    """A page of ``columns`` (the row's id first) where the filter holds, in the keys' order, after the cursor."""
    width = len(columns)
    query = select(*columns, *sql.sort_values(keys)).where(sql.compile_filter(tree, _dialect(session)))
    if cursor is not None:
        query = query.where(sql.after_cursor(keys, cursor))
    rows = session.connection().execute(query.order_by(*sql.order_clauses(keys)).limit(limit + 1)).all()
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = sql.encode_cursor(keys, list(last[width:]), last[0])
    names = [column.key for column in columns]  # zip stops before the sort values
    return Page([dict(zip(names, row)) for row in rows[:limit]], next_cursor)


def stream(
    session: Session, tree: Filter | None, order: list[OrderKey] | None, columns: list, batch: int = 1000
) -> Iterator[tuple]:
    """``columns`` of every match in order, fetched ``batch`` rows at a time (a server-side cursor on PostgreSQL)."""
    keys = order or sql.DEFAULT_ORDER
    query = select(*columns).where(sql.compile_filter(tree, _dialect(session))).order_by(*sql.order_clauses(keys))
    # On the session's connection, not through the ORM: plain rows, without its per-row bookkeeping.
    yield from session.connection().execute(query.execution_options(yield_per=batch))


def _median(dialect: str, value):
    if dialect == "postgresql":
        return func.percentile_cont(0.5).within_group(value)
    return func.median(value)


STATISTICS = ("n", "mean", "std", "min", "max", "median")


def _statistics(dialect: str, value) -> list:
    return [
        func.count(value),
        func.avg(value),
        func.stddev_samp(value),
        func.min(value),
        func.max(value),
        _median(dialect, value),
    ]


def _group_value(value):
    return value.isoformat() if hasattr(value, "isoformat") else value


def aggregate(session: Session, tree: Filter | None, group_by: list[Field], metrics: list[str]) -> list[dict]:
    """Per group of equal ``group_by`` values: the count, and n/mean/std/min/max/median per metric.

    Groups come in ascending order of their values (nulls last). ``std`` is the sample
    standard deviation (null for a group of one).
    """
    dialect = _dialect(session)
    groups = [sql.expression(field) for field in group_by]
    columns = [func.count()]
    for key in metrics:
        columns += _statistics(dialect, sql.expression(lookup(f"result.{key}")))
    query = (
        select(*groups, *columns)
        .select_from(Experiment)
        .where(sql.compile_filter(tree, dialect))
        .group_by(*groups)
        .order_by(*(group.asc().nulls_last() for group in groups))
    )
    items = []
    for row in session.execute(query):
        group, count, figures = row[: len(groups)], row[len(groups)], row[len(groups) + 1 :]
        items.append(
            {
                "group": {field.name: _group_value(value) for field, value in zip(group_by, group)},
                "count": count,
                "metrics": {
                    key: dict(zip(STATISTICS, _floats(figures[i * len(STATISTICS) : (i + 1) * len(STATISTICS)])))
                    for i, key in enumerate(metrics)
                },
            }
        )
    return items


def _floats(figures) -> list:
    """n as an int, the rest as floats (PostgreSQL's avg of integers is a Decimal)."""
    n, *rest = figures
    return [n, *(None if value is None else float(value) for value in rest)]


def curves(session: Session, tree: Filter | None, group_by: list[Field], metric: str) -> list[dict]:
    """Per group and per history step: n, mean, std, min, max of ``metric`` over the experiments.

    The metric comes from its typed copy where it has one (models.HISTORY_COLUMNS), else
    from the history document, once per row in a materialized CTE: written straight
    into the five aggregates, the database would read the document five times. (The CTE
    would only cost a typed copy: it stops PostgreSQL from aggregating in parallel.)
    """
    dialect = _dialect(session)
    typed = metric in HISTORY_COLUMNS
    value = getattr(MetricRow, metric) if typed else JSONValue(MetricRow.values, metric, "number")
    rows = (
        select(
            *(sql.expression(field).label(f"group_{i}") for i, field in enumerate(group_by)),
            MetricRow.step.label("step"),
            value.label("value"),
        )
        .select_from(Experiment)
        .join(MetricRow, MetricRow.experiment_id == Experiment.id)
        .where(sql.compile_filter(tree, dialect), value.is_not(None))
    )
    history_rows = rows.subquery("history") if typed else rows.cte("history").prefix_with("MATERIALIZED")
    groups = [history_rows.c[f"group_{i}"] for i in range(len(group_by))]
    query = (
        select(
            *groups,
            history_rows.c.step,
            func.count(history_rows.c.value),
            func.avg(history_rows.c.value),
            func.stddev_samp(history_rows.c.value),
            func.min(history_rows.c.value),
            func.max(history_rows.c.value),
        )
        .group_by(*groups, history_rows.c.step)
        .order_by(*(group.asc().nulls_last() for group in groups), history_rows.c.step)
    )
    items: list[dict] = []
    for row in session.execute(query):
        group = {field.name: _group_value(v) for field, v in zip(group_by, row[: len(groups)])}
        step, *figures = row[len(groups) :]
        if not items or items[-1]["group"] != group:
            items.append({"group": group, "points": []})
        items[-1]["points"].append({"step": step, **dict(zip(("n", "mean", "std", "min", "max"), _floats(figures)))})
    return items


def step_units(session: Session, tree: Filter | None) -> set[str]:
    """The kinds among the matches, for naming the step axis of a plot."""
    query = matching(session, tree).with_only_columns(Experiment.kind).group_by(Experiment.kind)
    return set(session.scalars(query))


def history(connection: Connection | Session, experiment_id: str, after_step: int = -1) -> list[dict]:
    """The experiment's metric rows after ``after_step`` (a live tail; by default all), in step order."""
    query = (
        select(MetricRow.step, MetricRow.values)
        .where(MetricRow.experiment_id == experiment_id, MetricRow.step > after_step)
        .order_by(MetricRow.step)
    )
    return [{"step": step, **values} for step, values in connection.execute(query)]


# Built once: a status poll should not pay for building and hashing its statement again.
_STATUS = select(Experiment.status).where(Experiment.id == bindparam("experiment_id"))
_RESOURCE = select(*RESOURCE_COLUMNS).where(Experiment.id == bindparam("experiment_id"))
# The experiment's status and its history's rows after a step, in one statement: an
# experiment without rows (yet) still gives one row, its step null.
_HISTORY = (
    select(Experiment.status, MetricRow.step, cast(MetricRow.values, Text))
    .select_from(Experiment)
    .outerjoin(MetricRow, (MetricRow.experiment_id == Experiment.id) & (MetricRow.step > bindparam("after_step")))
    .where(Experiment.id == bindparam("experiment_id"))
    .order_by(MetricRow.step)
)


def status(connection: Connection, experiment_id: str) -> str | None:
    """The experiment's status, or None if there is no such experiment."""
    return connection.execute(_STATUS, {"experiment_id": experiment_id}).scalar()


def history_json(connection: Connection, experiment_id: str, after_step: int = -1) -> tuple[str, bytes] | None:
    """The experiment's status and its history as the API's JSON ``{"items": [...]}``; None if there is no such
    experiment.

    The rows' JSON text is spliced, not parsed and written again: a 100-step history holds
    some 1,700 numbers, and re-encoding them would cost more than the query.
    """
    rows = connection.execute(_HISTORY, {"experiment_id": experiment_id, "after_step": after_step}).all()
    if not rows:
        return None
    items = [_with_step(step, document) for _status, step, document in rows if step is not None]
    return rows[0][0], f'{{"items":[{",".join(items)}]}}'.encode()


def _with_step(step: int, document: str) -> str:
    """``{"step": step, **document}`` written into the document's own JSON text (an object)."""
    rest = document.strip()[1:].lstrip()
    return f'{{"step":{step}}}' if rest == "}" else f'{{"step":{step},{rest}'


def resource(connection: Connection, experiment_id: str) -> dict | None:
    """One experiment as RESOURCE_KEYS (its documents as JSON text), or None: one indexed SELECT."""
    row = connection.execute(_RESOURCE, {"experiment_id": experiment_id}).first()
    return None if row is None else dict(zip(RESOURCE_KEYS, row))
