"""The filter language: a lark grammar, the tree it parses into, and its type check.

    spec.dataset = 'fashion_mnist' and spec.logit_scale >= 5
        and (result.nc1 < 0.1 or tags.paper = 'fig2')

Comparisons ``= != < <= > >=``, ``in (...)``, ``not in (...)``, ``is null``,
``is not null``; ``and``, ``or``, ``not`` and parentheses (keywords in any case). Values
are numbers (within a double's range), strings in single quotes (a quote inside doubled:
``'it''s'``), ``true`` and ``false``. Fields are those of service/search/fields.py,
checked with their types here, so that every error is a FilterError naming the position
and the field before any SQL is made. ``order_by`` lists fields, each with ``-`` for
descending, at most MAX_ORDER_KEYS.

Parentheses and ``not`` nest at most MAX_FILTER_DEPTH levels deep, counted as the parser
reads the tokens: every stage after it (the transformer, the compiler to SQL, SQLAlchemy's
compiler, the databases' own parsers) takes stack for each level. A parenthesis (a value
list's too) is a level until it closes, a ``not`` until its operand ends; the ``not`` of
``not in`` and ``is not null`` is part of a comparison, and no level.

A comparison with a missing value (null) is neither true nor false, as in SQL: ``not``
of it is not true either, and the row is not selected.
"""

import math
import re
from collections.abc import Callable, Iterable
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

MAX_FILTER_DEPTH = 64
MAX_ORDER_KEYS = 16

# Characters no text of the databases can hold: NUL (PostgreSQL refuses it in text) and
# the UTF-16 surrogates (a JSON body's lone \ud800), which have no UTF-8 form.
UNSTORABLE_CHARACTERS = re.compile("[\x00\ud800-\udfff]")


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
    items: tuple["Filter", ...]


@dataclass(frozen=True)
class AnyOf:
    items: tuple["Filter", ...]


@dataclass(frozen=True)
class Not:
    item: "Filter"


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


# A field by name, or UnknownField: fields.lookup for the experiments, fields.audit_lookup for the audit.
Lookup = Callable[[str], Field]


def _field(token: Token, parameter: str, lookup: Lookup) -> Field:
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
            raise FilterError(
                f"{field.name} is a datetime: {value!r} is not ISO 8601 "
                "(e.g. '2026-12-01' or '2026-12-01T08:00:00+00:00')",
                parameter,
                column,
                field.name,
            ) from None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    if field.choices and op in ("=", "!=") and value not in field.choices:
        raise FilterError(
            f"{field.name} is one of {', '.join(field.choices)}; {value!r} is none of them",
            parameter,
            column,
            field.name,
        )
    return value


def _number(text: str, parameter: str, column: int) -> int | float:
    """A NUMBER token's value, or a FilterError for one beyond a double's range.

    Numbers are compared as doubles (service/search/sql.py), so an integer is taken as far
    as a double reaches, and a float that overflows to infinity is no more a value than
    the integer of as many digits (which Python will not even read past 4,300 digits).
    """
    try:
        number = float(text) if any(c in text for c in ".eE") else int(text)
        finite = math.isfinite(number)  # OverflowError: an integer beyond the largest double
    except (ValueError, OverflowError):  # ValueError: an integer of over 4,300 digits
        finite = False
    if not finite:
        shown = text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"
        raise FilterError(f"the number {shown} is beyond the range of a double (±1.8e308)", parameter, column)
    return number


class _ToTree(Transformer):
    def __init__(self, parameter: str, lookup: Lookup):
        super().__init__()
        self.parameter, self.lookup = parameter, lookup

    def value(self, children):
        (token,) = children
        if token.type == "NUMBER":
            return _Literal(_number(str(token), self.parameter, token.column), token.column)
        if token.type == "STRING":
            return _Literal(str(token)[1:-1].replace("''", "'"), token.column)
        return _Literal(token.type == "TRUE", token.column)

    def values(self, children):
        return children

    def compare(self, children):
        name, op, literal = children
        field = _field(name, self.parameter, self.lookup)
        return Compare(field, str(op), _typed(field, literal, self.parameter, str(op)))

    def _member(self, children, negated: bool):
        name, literals = children
        field = _field(name, self.parameter, self.lookup)
        return Member(field, tuple(_typed(field, literal, self.parameter) for literal in literals), negated)

    def member(self, children):
        return self._member(children, negated=False)

    def not_member(self, children):
        return self._member(children, negated=True)

    def is_null(self, children):
        return IsNull(_field(children[0], self.parameter, self.lookup), negated=False)

    def is_not_null(self, children):
        return IsNull(_field(children[0], self.parameter, self.lookup), negated=True)

    def all_of(self, children):
        return children[0] if len(children) == 1 else AllOf(tuple(children))

    def any_of(self, children):
        return children[0] if len(children) == 1 else AnyOf(tuple(children))

    def negate(self, children):
        return Not(children[0])

    @v_args(inline=True)
    def order_key(self, *tokens):
        descending = len(tokens) == 2
        return OrderKey(_field(tokens[-1], self.parameter, self.lookup), descending)

    def order_by(self, children):
        return children


def _refuse_unstorable(text: str, parameter: str) -> None:
    found = UNSTORABLE_CHARACTERS.search(text)
    if found is None:
        return
    what = "a NUL character (\\u0000)" if found.group() == "\x00" else f"a lone surrogate ({found.group()!a})"
    raise FilterError(f"contains {what}, which cannot be stored", parameter, found.start() + 1)


def _refuse_deep_nesting(tokens: Iterable[Token], parameter: str) -> None:
    """Read the tokens, refusing the one that nests deeper than MAX_FILTER_DEPTH."""
    negations = [0]  # per open parenthesis (the first: outside all), the `not`s before the operand being read
    previous = None
    for token in tokens:
        if token.type == "LPAR":
            negations.append(0)
        elif token.type == "RPAR" and len(negations) > 1:  # an unmatched one is the parser's to refuse
            negations.pop()
        elif token.type in ("_AND", "_OR"):
            negations[-1] = 0
        elif token.type == "_NOT" and previous not in ("FIELD", "_IS"):
            negations[-1] += 1
        if len(negations) - 1 + sum(negations) > MAX_FILTER_DEPTH:
            raise FilterError(
                f"nesting deeper than {MAX_FILTER_DEPTH} levels (parentheses and not)", parameter, token.column
            )
        previous = token.type


def _parse(text: str, start: str, parameter: str, lookup: Lookup):
    _refuse_unstorable(text, parameter)
    try:
        parser = _PARSER.parse_interactive(text, start=start)
        # iter_parse hands each token to the parser once the check has seen it: the depth is
        # counted on exactly the tokens the parser reads (a parenthesis or `not` inside a
        # string is part of a STRING), and the parser, which keeps its stack in a list,
        # stops at the first token too deep, before the transformer recurses over the tree.
        _refuse_deep_nesting(parser.iter_parse(), parameter)
        tree = parser.resume_parse()  # the end of the text
        return _ToTree(parameter, lookup).transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, FilterError):
            raise exc.orig_exc from None
        raise
    except UnexpectedEOF:
        raise FilterError("unexpected end: the expression is incomplete", parameter, len(text) + 1) from None
    except UnexpectedCharacters as exc:
        raise FilterError(f"unexpected character {exc.char!r}", parameter, exc.column) from None
    except UnexpectedInput as exc:
        token = getattr(exc, "token", None)
        if token is not None and token.type == "$END":
            raise FilterError("unexpected end: the expression is incomplete", parameter, len(text) + 1) from None
        found = repr(str(token)) if token is not None else "input"
        raise FilterError(f"unexpected {found}", parameter, exc.column) from None


def parse_filter(text: str, parameter: str = "where", lookup: Lookup = lookup) -> Filter:
    """The tree of a filter, type-checked; FilterError says where and why it is not one."""
    return _parse(text, "start", parameter, lookup)


def parse_order_by(text: str, parameter: str = "order_by", lookup: Lookup = lookup) -> list[OrderKey]:
    """'result.nc1,-created_at' as order keys; FilterError for a bad field or syntax, or too many keys.

    A cursor compares a row with its page's last row key by key, one nested level each.
    """
    keys = _parse(text, "order_by", parameter, lookup)
    if len(keys) > MAX_ORDER_KEYS:
        raise FilterError(f"{len(keys)} keys; at most {MAX_ORDER_KEYS} are taken", parameter)
    return keys


def parse_optional_filter(text: str | None, parameter: str = "where", lookup: Lookup = lookup) -> Filter | None:
    """parse_filter, or None (every row) for no text or only blanks."""
    return parse_filter(text, parameter, lookup) if text and text.strip() else None


def parse_optional_order_by(
    text: str | None, parameter: str = "order_by", lookup: Lookup = lookup
) -> list[OrderKey] | None:
    """parse_order_by, or None (the default order) for no text or only blanks."""
    return parse_order_by(text, parameter, lookup) if text and text.strip() else None


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
    """The filter as text that parses back into the same tree (for tests and clients).

    Parenthesised only where the grammar needs it, so that the text nests no deeper than
    the one the tree was parsed from.
    """

    def literal(value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, datetime):
            return "'" + value.isoformat() + "'"
        if isinstance(value, str):
            return "'" + value.replace("'", "''") + "'"
        return repr(value)

    def operand(item: Filter, within: type) -> str:
        # not binds tighter than and, and tighter than or; a list within one of its own
        # kind keeps its parentheses, or it would parse as one longer list.
        bare = isinstance(item, Compare | Member | IsNull | Not) or (isinstance(item, AllOf) and within is AnyOf)
        return render(item) if bare else f"({render(item)})"

    match tree:
        case Compare(field, op, value):
            return f"{field.name} {op} {literal(value)}"
        case Member(field, values, negated):
            return f"{field.name} {'not in' if negated else 'in'} ({', '.join(map(literal, values))})"
        case IsNull(field, negated):
            return f"{field.name} is {'not null' if negated else 'null'}"
        case AllOf(items):
            return " and ".join(operand(item, AllOf) for item in items)
        case AnyOf(items):
            return " or ".join(operand(item, AnyOf) for item in items)
        case Not(item):
            return f"not {operand(item, Not)}"
    raise TypeError(tree)
