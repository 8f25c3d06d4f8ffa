"""The filter language: a lark grammar, the tree it parses into, and its type check.

    spec.dataset = 'fashion_mnist' and spec.logit_scale >= 5
        and (result.nc1 < 0.1 or tags.paper = 'fig2')

Comparisons ``= != < <= > >=``, ``in (...)``, ``not in (...)``, ``is null``,
``is not null``; ``and``, ``or``, ``not`` and parentheses (keywords in any case). Values
are numbers, strings in single quotes (a quote inside doubled: ``'it''s'``), ``true`` and
``false``. Fields are those of service/search/fields.py, checked with their types here,
so that every error is a FilterError naming the position and the field before any SQL is
made. ``order_by`` lists fields, each with ``-`` for descending.

A comparison with a missing value (null) is neither true nor false, as in SQL: ``not``
of it is not true either, and the row is not selected.
"""

from dataclasses import dataclass
from datetime import UTC, datetime

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, VisitError

from service.search.fields import Field, UnknownField, lookup, names

GRAMMAR = r"""
?start: disjunction

?disjunction: conjunction (_OR conjunction)*   -> any_of
?conjunction: negation (_AND negation)*        -> all_of
?negation: _NOT negation                       -> negate
         | atom
?atom: comparison | "(" disjunction ")"

comparison: FIELD OP value                     -> compare
          | FIELD _IN "(" values ")"           -> member
          | FIELD _NOT _IN "(" values ")"      -> not_member
          | FIELD _IS _NULL                    -> is_null
          | FIELD _IS _NOT _NULL               -> is_not_null

values: value ("," value)*
value: NUMBER | STRING | TRUE | FALSE

order_by: order_key ("," order_key)*
order_key: DESCENDING? FIELD

FIELD.-1: /[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?/
OP: "<=" | ">=" | "!=" | "=" | "<" | ">"
NUMBER: /[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?/
STRING: /'([^']|'')*'/
DESCENDING: "-"
TRUE.2: /true\b/i
FALSE.2: /false\b/i
_AND.2: /and\b/i
_OR.2: /or\b/i
_NOT.2: /not\b/i
_IN.2: /in\b/i
_IS.2: /is\b/i
_NULL.2: /null\b/i

%import common.WS
%ignore WS
"""

_PARSER = Lark(GRAMMAR, start=["start", "order_by"], parser="lalr", propagate_positions=True)


class FilterError(ValueError):
    """A filter or order_by that cannot be run: where it is, which field, and why."""

    def __init__(self, message: str, parameter: str, column: int | None = None, field: str | None = None):
        where = f"{parameter}, column {column}" if column is not None else parameter
        super().__init__(f"{where}: {message}")
        self.parameter, self.column, self.field = parameter, column, field


# The tree. Values are Python values of the field's type (datetimes for datetime fields).
@dataclass(frozen=True)
class Compare:
    field: Field
    op: str  # one of = != < <= > >=
    value: object


@dataclass(frozen=True)
class Member:
    field: Field
    values: tuple
    negated: bool


@dataclass(frozen=True)
class IsNull:
    field: Field
    negated: bool


@dataclass(frozen=True)
class AllOf:
    items: tuple


@dataclass(frozen=True)
class AnyOf:
    items: tuple


@dataclass(frozen=True)
class Not:
    item: object


Filter = Compare | Member | IsNull | AllOf | AnyOf | Not


@dataclass(frozen=True)
class OrderKey:
    field: Field
    descending: bool


@dataclass(frozen=True)
class _Literal:
    """A value as written, with its column, before it is checked against its field."""

    value: object
    column: int


def _field(token: Token, parameter: str) -> Field:
    try:
        return lookup(str(token))
    except UnknownField as exc:
        raise FilterError(str(exc), parameter, token.column, exc.name) from None


def _typed(field: Field, literal: _Literal, parameter: str, op: str = "=") -> object:
    """The literal as a value of the field's type, or a FilterError naming both."""
    value, column = literal.value, literal.column

    def mismatch(expected: str) -> FilterError:
        return FilterError(f"{field.name} is a {field.type}; {expected}, not {value!r}", parameter, column, field.name)

    if field.type == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise mismatch("compare it with a number")
        return value
    if field.type == "bool":
        if not isinstance(value, bool):
            raise mismatch("compare it with true or false")
        if op not in ("=", "!="):
            raise FilterError(f"{field.name} is a bool: use = or !=, not {op}", parameter, column, field.name)
        return value
    if not isinstance(value, str):
        raise mismatch("compare it with a string in single quotes")
    if field.type == "datetime":
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise FilterError(f"{field.name} is a datetime: {value!r} is not ISO 8601 "
                              "(e.g. '2026-12-01' or '2026-12-01T08:00:00+00:00')",
                              parameter, column, field.name) from None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    if field.choices and op in ("=", "!=") and value not in field.choices:
        raise FilterError(f"{field.name} is one of {', '.join(field.choices)}; {value!r} is none of them",
                          parameter, column, field.name)
    return value


class _ToTree(Transformer):
    def __init__(self, parameter: str):
        super().__init__()
        self.parameter = parameter

    def value(self, children):
        (token,) = children
        if token.type == "NUMBER":
            text = str(token)
            number = float(text) if any(c in text for c in ".eE") else int(text)
            return _Literal(number, token.column)
        if token.type == "STRING":
            return _Literal(str(token)[1:-1].replace("''", "'"), token.column)
        return _Literal(token.type == "TRUE", token.column)

    def values(self, children):
        return children

    def compare(self, children):
        name, op, literal = children
        field = _field(name, self.parameter)
        return Compare(field, str(op), _typed(field, literal, self.parameter, str(op)))

    def _member(self, children, negated: bool):
        name, literals = children
        field = _field(name, self.parameter)
        return Member(field, tuple(_typed(field, literal, self.parameter) for literal in literals), negated)

    def member(self, children):
        return self._member(children, negated=False)

    def not_member(self, children):
        return self._member(children, negated=True)

    def is_null(self, children):
        return IsNull(_field(children[0], self.parameter), negated=False)

    def is_not_null(self, children):
        return IsNull(_field(children[0], self.parameter), negated=True)

    def all_of(self, children):
        return children[0] if len(children) == 1 else AllOf(tuple(children))

    def any_of(self, children):
        return children[0] if len(children) == 1 else AnyOf(tuple(children))

    def negate(self, children):
        return Not(children[0])

    @v_args(inline=True)
    def order_key(self, *tokens):
        descending = len(tokens) == 2
        return OrderKey(_field(tokens[-1], self.parameter), descending)

    def order_by(self, children):
        return children


def _parse(text: str, start: str, parameter: str):
    try:
        tree = _PARSER.parse(text, start=start)
        return _ToTree(parameter).transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, FilterError):
            raise exc.orig_exc from None
        raise
    except UnexpectedEOF:
        raise FilterError("unexpected end: the expression is incomplete", parameter, len(text) + 1) from None
    except UnexpectedCharacters as exc:
        raise FilterError(f"unexpected character {text[exc.pos_in_stream]!r}", parameter, exc.column) from None
    except UnexpectedInput as exc:
        token = getattr(exc, "token", None)
        if token is not None and token.type == "$END":
            raise FilterError("unexpected end: the expression is incomplete", parameter, len(text) + 1) from None
        found = repr(str(token)) if token is not None else "input"
        raise FilterError(f"unexpected {found}", parameter, exc.column) from None


def parse_filter(text: str, parameter: str = "where") -> Filter:
    """The tree of a filter, type-checked; FilterError says where and why it is not one."""
    if "\x00" in text:
        raise FilterError("contains a NUL character", parameter)
    return _parse(text, "start", parameter)


def parse_order_by(text: str, parameter: str = "order_by") -> list[OrderKey]:
    """'result.nc1,-created_at' as order keys; FilterError for a bad field or syntax."""
    if "\x00" in text:
        raise FilterError("contains a NUL character", parameter)
    return _parse(text, "order_by", parameter)


def parse_optional_filter(text: str | None, parameter: str = "where") -> Filter | None:
    """parse_filter, or None (every experiment) for no text or only blanks."""
    return parse_filter(text, parameter) if text and text.strip() else None


def parse_optional_order_by(text: str | None, parameter: str = "order_by") -> list[OrderKey] | None:
    """parse_order_by, or None (the default order) for no text or only blanks."""
    return parse_order_by(text, parameter) if text and text.strip() else None


def parse_fields(text: str | None, parameter: str) -> list[Field]:
    """Comma-separated field names (a group_by), each looked up; FilterError naming the unknown one."""
    try:
        return [lookup(name) for name in names(text)]
    except UnknownField as exc:
        raise FilterError(str(exc), parameter, field=exc.name) from None


def conjunction(filters: list[Filter]) -> Filter | None:
    """All of the filters (None for none)."""
    if not filters:
        return None
    return filters[0] if len(filters) == 1 else AllOf(tuple(filters))


def render(tree: Filter) -> str:
    """The filter as text that parses back into the same tree (for tests and clients)."""

    def literal(value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, datetime):
            return "'" + value.isoformat() + "'"
        if isinstance(value, str):
            return "'" + value.replace("'", "''") + "'"
        return repr(value)

    match tree:
        case Compare(field, op, value):
            return f"{field.name} {op} {literal(value)}"
        case Member(field, values, negated):
            return f"{field.name} {'not in' if negated else 'in'} ({', '.join(map(literal, values))})"
        case IsNull(field, negated):
            return f"{field.name} is {'not null' if negated else 'null'}"
        case AllOf(items):
            return " and ".join(f"({render(item)})" for item in items)
        case AnyOf(items):
            return " or ".join(f"({render(item)})" for item in items)
        case Not(item):
            return f"not ({render(item)})"
    raise TypeError(tree)
