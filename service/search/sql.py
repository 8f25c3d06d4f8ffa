"""The one compiler from the filter language's tree to SQLAlchemy, on SQLite and PostgreSQL.

Values are always bound parameters. JSON keys are written into the SQL text as literals
(a key sent as a parameter would leave the planner blind to which value is read); every
key has matched fields.KEY_PATTERN before it gets here.

How a field reads:
- columns of the experiment (or of the audit, for its fields) as they are;
- spec fields and result keys with a typed copy (service/models.py: SPEC_COLUMNS,
  RESULT_COLUMNS) from that column: indexed, and narrow to scan;
- other ``spec.<f>``, ``result.<k>``, ``tags.<k>`` and ``environment.<k>`` from the JSON documents, typed:
  PostgreSQL ``CAST((result ->> 'iterations') AS DOUBLE PRECISION)``, SQLite
  ``json_extract(result, '$."iterations"')``. A spec number is read only where it is a
  JSON number (``n_per_class`` may be a list), else it is null.
On PostgreSQL, equality on such a spec field or a tag outside any ``not`` compiles to
containment (``spec @> '{"optimizer": "adam"}'``), which the GIN indexes answer. Under a
``not`` it must not: containment is false where the comparison is unknown (a missing
field), and ``not`` would turn that into true.
"""

import base64
import binascii
import json
import math
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Float,
    Integer,
    String,
    and_,
    bindparam,
    false,
    literal,
    not_,
    or_,
    true,
    tuple_,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import TypeEngine

from service.models import INTEGER_MAX, INTEGER_MIN, RESULT_COLUMNS, SPEC_COLUMNS, AuditEntry, Experiment
from service.search.fields import AUDIT_FIELDS, KEY_PATTERN, Field, FieldType, lookup
from service.search.language import (
    UNSTORABLE_CHARACTERS,
    AllOf,
    AnyOf,
    Compare,
    Filter,
    FilterError,
    IsNull,
    Member,
    Not,
    OrderKey,
)

# "json": the value as JSON writes it (true, 0.5, [2, 3]), for exports; the others compare.
_SQL_TYPES: dict[str, TypeEngine[Any]] = {"number": Float(), "string": String(), "bool": Boolean(), "json": String()}


class JSONValue(ColumnElement):
    """The value at ``key`` of a JSON document column, as a SQL value of ``field_type``."""

    inherit_cache = True
    # Not a ClassVar: SQLAlchemy's HasTraverseInternals declares it an instance attribute, and mypy forbids the change.
    _traverse_internals: list[tuple[str, InternalTraversal]] = [  # noqa: RUF012
        ("document", InternalTraversal.dp_clauseelement),
        ("key", InternalTraversal.dp_string),
        ("field_type", InternalTraversal.dp_string),
        ("numbers_only", InternalTraversal.dp_boolean),
    ]

    def __init__(self, document, key: str, field_type: FieldType | Literal["json"], numbers_only: bool = False):
        if not KEY_PATTERN.fullmatch(key):
            raise ValueError(f"not a JSON key the search accepts: {key!r}")
        self.document, self.key, self.field_type, self.numbers_only = document, key, field_type, numbers_only
        self.type = _SQL_TYPES[field_type]

    @property
    def _from_objects(self):
        return self.document._from_objects


@compiles(JSONValue, "postgresql")
def _json_value_postgresql(element: JSONValue, compiler, **kw) -> str:
    document = compiler.process(element.document, **kw)
    text = f"({document} ->> '{element.key}')"
    if element.field_type == "number":
        text = f"CAST({text} AS DOUBLE PRECISION)"
        if element.numbers_only:
            text = f"CASE WHEN jsonb_typeof({document} -> '{element.key}') = 'number' THEN {text} END"
    elif element.field_type == "bool":
        text = f"CAST({text} AS BOOLEAN)"
    return text


@compiles(JSONValue, "sqlite")
def _json_value_sqlite(element: JSONValue, compiler, **kw) -> str:
    document = compiler.process(element.document, **kw)
    path = f"'$.\"{element.key}\"'"
    text = f"json_extract({document}, {path})"
    if element.field_type == "json":
        # json_extract gives 1 and 0 for true and false (numbers and text as themselves).
        return f"CASE json_type({document}, {path}) WHEN 'true' THEN 'true' WHEN 'false' THEN 'false' ELSE {text} END"
    if element.numbers_only:
        text = f"CASE WHEN json_type({document}, {path}) IN ('integer', 'real') THEN {text} END"
    return text


_DOCUMENTS = {
    "spec": Experiment.spec,
    "result": Experiment.result,
    "tags": Experiment.tags,
    "environment": Experiment.environment,
}
_COLUMNS = {
    "id": Experiment.id,
    "status": Experiment.status,
    "kind": Experiment.kind,
    "owner": Experiment.owner,
    "name": Experiment.name,
    "sweep": Experiment.sweep,
    "progress": Experiment.progress,
    "priority": Experiment.priority,
    "created_at": Experiment.created_at,
    "started_at": Experiment.started_at,
    "finished_at": Experiment.finished_at,
}
_AUDIT_COLUMNS = {name: getattr(AuditEntry, name) for name in AUDIT_FIELDS}
# Each table's id: the last key of every order, so that a cursor names one row.
_IDS = {"experiments": Experiment.id, "audit": AuditEntry.id}
# Typed copies of spec fields and result keys (service/models.py), read instead of the documents.
_COPIES = {f"spec.{field}": getattr(Experiment, attribute) for field, attribute in SPEC_COLUMNS.items()}
_COPIES |= {f"result.{key}": getattr(Experiment, attribute) for key, attribute in RESULT_COLUMNS.items()}


# What a field reads from: a column of the experiment (its ORM attribute) or an SQL expression.
Readable = ColumnElement[Any] | InstrumentedAttribute[Any]


def expression(field: Field) -> Readable:
    """How the database reads a field of an experiment, or of an audit row."""
    if field.table == "audit":
        return _AUDIT_COLUMNS[field.name]
    if field.scope == "column":
        return _COLUMNS[field.name]
    if field.name in _COPIES:
        return _COPIES[field.name]
    return JSONValue(
        _DOCUMENTS[field.scope], field.key, field.type, numbers_only=field.scope == "spec" and field.type == "number"
    )


def _nullable(expr: Readable) -> bool:
    return not isinstance(expr, InstrumentedAttribute) or expr.property.columns[0].nullable


def _containable(field: Field, dialect: str, negated: bool) -> bool:
    """Whether equality on the field compiles to containment (_containment): right and indexed for a JSON field."""
    return not (
        dialect != "postgresql"
        or negated
        or field.scope not in ("spec", "tags")
        or field.type == "number"
        or field.name in _COPIES
    )


def _containment(field: Field, value) -> ColumnElement:
    """Containment for equality on a JSON field (where _containable)."""
    return _DOCUMENTS[field.scope].op("@>", is_comparison=True)(bindparam(None, {field.key: value}, type_=JSONB))


def _bound(field: Field, value):
    """A number is compared as a double, so that no integer column meets a value beyond its range."""
    return bindparam(None, value, type_=Float()) if field.type == "number" else value


def _compare(expr: Readable, op: str, value) -> ColumnElement:
    match op:
        case "=":
            return expr == value
        case "!=":
            return expr != value
        case "<":
            return expr < value
        case "<=":
            return expr <= value
        case ">":
            return expr > value
        case ">=":
            return expr >= value
    raise ValueError(op)


def _comparison(tree: Compare | Member | IsNull, dialect: str, negated: bool) -> ColumnElement:
    """A comparison as SQL, without the ``not`` that ``negated`` says is over it (and rules out containment)."""
    match tree:
        case Compare(field, "=", value) if _containable(field, dialect, negated):
            return _containment(field, value)
        case Compare(field, op, value):
            return _compare(expression(field), op, _bound(field, value))
        case Member(field, values, False) if _containable(field, dialect, negated):
            return or_(*(_containment(field, value) for value in values))
        case Member(field, values, negated_member):
            expr, bound = expression(field), [_bound(field, value) for value in values]
            return expr.not_in(bound) if negated_member else expr.in_(bound)
        case IsNull(field, is_not):
            expr = expression(field)
            return expr.is_not(None) if is_not else expr.is_(None)
    raise TypeError(tree)


def _depth(tree: Filter) -> int:
    """How deep and and or nest in the tree (a ``not`` compiles into its comparisons)."""
    match tree:
        case AllOf(items) | AnyOf(items):
            return 1 + max(map(_depth, items))
        case Not(item):
            return _depth(item)
    return 0


class _Parenthesised(ColumnElement):
    """A condition in parentheses of its own, which SQLAlchemy keeps.

    SQLAlchemy merges an and (or) within another into one chain, even from inside a Grouping.
    """

    inherit_cache = True
    # Not a ClassVar: SQLAlchemy's HasTraverseInternals declares it an instance attribute, and mypy forbids the change.
    _traverse_internals: list[tuple[str, InternalTraversal]] = [("condition", InternalTraversal.dp_clauseelement)]  # noqa: RUF012
    type = Boolean()

    def __init__(self, condition: ColumnElement):
        self.condition = condition

    def self_group(self, against=None):
        return self  # already in parentheses

    @property
    def _from_objects(self):
        return self.condition._from_objects


@compiles(_Parenthesised)
def _parenthesised(element: _Parenthesised, compiler, **kw) -> str:
    return f"({compiler.process(element.condition, **kw)})"


# SQLite parses a chain ``a AND b AND c ...`` into a tree as tall as the chain is long and
# refuses one taller than 1,000; and its parser's stack, of 100 entries, holds every open
# parenthesis together with what came before it inside the enclosing one. So each and/or
# puts its deepest operand first, where nothing comes before its parenthesis, and the
# others after it in parenthesised runs of at most _RUN. (PostgreSQL flattens either form.)
_RUN = 32


def _chain(combine, clauses: list[ColumnElement]) -> ColumnElement:
    if len(clauses) <= _RUN:
        return combine(*clauses)
    first, rest = clauses[0], clauses[1:]
    return combine(first, *(_Parenthesised(combine(*rest[i : i + _RUN])) for i in range(0, len(rest), _RUN)))


def compile_filter(tree: Filter | None, dialect: str, negated: bool = False) -> ColumnElement:
    """The tree as a WHERE clause for ``dialect`` ('postgresql' or 'sqlite'); ``negated``: under an odd number of nots.

    A ``not`` goes down to the comparisons, all of them becoming any of their negations and
    vice versa (De Morgan's laws, and not not x = x, hold in SQL's three-valued logic): the
    SQL nests only where and and or alternate.
    """
    match tree:
        case None:
            return true()
        case Not(item):
            return compile_filter(item, dialect, not negated)
        case AllOf(items) | AnyOf(items):
            combine = and_ if isinstance(tree, AllOf) != negated else or_
            deepest_first = sorted(items, key=_depth, reverse=True)
            return _chain(combine, [compile_filter(item, dialect, negated) for item in deepest_first])
    comparison = _comparison(tree, dialect, negated)
    return not_(comparison) if negated else comparison


# Ordering and keyset pagination.

DEFAULT_ORDER = [OrderKey(lookup("created_at"), descending=True)]


def order_clauses(keys: list[OrderKey]) -> list:
    """ORDER BY each key with nulls last, then id (in the last key's direction) to break ties.

    NULLS LAST is left out for columns that hold no nulls: PostgreSQL then walks an index
    backwards for a descending order (its descending order puts nulls first).
    """
    clauses = []
    for key in keys:
        expr = expression(key.field)
        clause = expr.desc() if key.descending else expr.asc()
        clauses.append(clause.nulls_last() if _nullable(expr) else clause)
    row_id = _IDS[keys[-1].field.table]
    clauses.append(row_id.desc() if keys[-1].descending else row_id.asc())
    return clauses


def sort_values(keys: list[OrderKey]) -> list[ColumnElement]:
    """The expressions whose values on a page's last row make its cursor."""
    return [expression(key.field).label(f"sort_{i}") for i, key in enumerate(keys)]


def _canonical(keys: list[OrderKey]) -> str:
    return ",".join(("-" if k.descending else "") + k.field.name for k in keys)


def encode_cursor(keys: list[OrderKey], values: list, row_id: str) -> str:
    encoded = [value.isoformat() if isinstance(value, datetime) else value for value in values]
    raw = json.dumps({"order": _canonical(keys), "after": encoded, "id": row_id}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor_value(field: Field, expr: Readable, value):
    """A value of a cursor's ``after`` as the bound to compare ``expr`` with; ValueError for one this API never writes.

    A cursor is anyone's text. The one a page gives holds its last row's values of the order
    keys: null where the row has none, else a value of the key's type that its column can
    hold (a datetime as ISO 8601 with its offset). Anything else would reach the database
    as a value of another type, and fail there.
    """
    if value is None:
        return None
    match field.type:
        case "number":
            valid = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if isinstance(expr.type, Integer):  # a typed copy in an integer column
                valid = valid and isinstance(value, int) and INTEGER_MIN <= value <= INTEGER_MAX
        case "bool":
            valid = isinstance(value, bool)
        case "string":
            valid = isinstance(value, str) and not UNSTORABLE_CHARACTERS.search(value)
        case "datetime":
            value = datetime.fromisoformat(value)  # TypeError for anything but text
            valid = value.tzinfo is not None
    if not valid:
        raise ValueError(f"not a value of {field.name}")
    return value


def after_cursor(keys: list[OrderKey], cursor: str) -> ColumnElement:
    """Rows strictly after the cursor's row in the order of ``keys`` (nulls last)."""
    exprs = [expression(key.field) for key in keys]
    row_id = _IDS[keys[-1].field.table]
    try:
        state = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        order, after, last_id = state["order"], state["after"], state["id"]
        if not isinstance(after, list) or not isinstance(last_id, str) or UNSTORABLE_CHARACTERS.search(last_id):
            raise ValueError("not a cursor's values or id")
        if order != _canonical(keys) or len(after) != len(keys):
            raise FilterError("this cursor belongs to another order_by; start again without it", "cursor")
        values = [_cursor_value(key.field, expr, value) for key, expr, value in zip(keys, exprs, after)]
    # json.loads recurses once per nested array or object; math.isfinite overflows on an integer beyond a double.
    except (binascii.Error, ValueError, TypeError, KeyError, AttributeError, RecursionError, OverflowError) as exc:
        if isinstance(exc, FilterError):
            raise
        raise FilterError("not a cursor returned by this API", "cursor") from None

    descending = keys[-1].descending
    if (
        all(key.descending == descending for key in keys)
        and None not in values
        and not any(_nullable(expr) for expr in exprs)
    ):
        # One row comparison, (k0, k1, id) < (v0, v1, last id): an index on those columns
        # starts the page's scan at the cursor instead of filtering every earlier row.
        row = tuple_(*exprs, row_id)
        row_bound = tuple_(*(literal(value, expr.type) for expr, value in zip(exprs, values)), literal(last_id))
        return row < row_bound if descending else row > row_bound
    after = row_id < last_id if descending else row_id > last_id
    # Built from the last key outwards: (k0 after v0) or (k0 = v0 and ((k1 after v1) or ...)).
    for key, expr, value in reversed(list(zip(keys, exprs, values))):
        beyond: ColumnElement[bool]
        if value is None:
            beyond, same = false(), expr.is_(None)
        else:
            bound = literal(value, expr.type)  # a bool too is compared, not tested with IS
            beyond = expr < bound if key.descending else expr > bound
            if _nullable(expr):
                beyond = or_(beyond, expr.is_(None))
            same = expr == bound
        after = or_(beyond, and_(same, after))
    return after
