"""The filter language's limits: nesting, unstorable text, order keys; on every route that filters, in both modes.

Parentheses and ``not`` nest at most 64 levels deep (service/search/language.py). A deeper
filter is a 422 naming ``where`` and the limit, found before anything recurses over it.
Every filter within the limits runs, up to the 20,000 characters ``where`` takes, on
SQLite as on PostgreSQL: SQLite's parser holds at most 100 open parentheses and builds
expression trees at most 1,000 deep, and a flat chain of thousands of comparisons or 64
alternating levels of and/or must fit both. Text no database can store (NUL, a lone
surrogate) is a 422 naming the parameter, and so are more than 16 order_by keys and a
cursor nested too deep to read.
"""

import base64
import json
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy.orm import Session

from service.models import Experiment, result_copies, spec_copies
from service.search import queries, sql
from service.search.fields import lookup
from service.search.language import AnyOf, Compare, FilterError, Not, parse_filter, parse_order_by, render
from tests.conftest import migrated_engine

PROBLEM_JSON = "application/problem+json"
ALICE = "owner = 'alice'"
TOO_DEEP = "nesting deeper than 64 levels (parentheses and not)"


def nested(depth: int, inner: str = ALICE) -> str:
    return "(" * depth + inner + ")" * depth


def alternating(levels: int, innermost: str = "owner = 'bob'") -> str:
    """``a or b and (a or b and (... innermost))``, which selects what ``a or b and innermost`` selects."""
    return "owner = 'alice' or name = 'keep' and (" * levels + innermost + ")" * levels


def doubled(times: int, leaf: str = "name='keep'") -> str:
    """``(leaf) and (leaf)``, then that or itself, and so on: a full binary tree, which selects what ``leaf`` does."""
    text = leaf
    for i in range(times):
        text = f"({text}) {('and', 'or')[i % 2]} ({text})"
    return text


# Deep and long filters within the limits, each with a shallow one that selects the same rows.
WITHIN_THE_LIMITS = {
    "64 parentheses": (nested(64), ALICE),
    "64 nots": ("not " * 64 + ALICE, ALICE),
    "63 nots and a parenthesis": ("not " * 63 + "(owner = 'alice' or name = 'keep')",
                                  "not (owner = 'alice' or name = 'keep')"),
    "62 nots and a parenthesis": ("not " * 62 + "(owner = 'alice' or name = 'keep')",
                                  "owner = 'alice' or name = 'keep'"),
    "32 of not (": ("not (" * 32 + "owner = 'alice' or name = 'keep'" + ")" * 32, "owner = 'alice' or name = 'keep'"),
    "64 alternating levels": (alternating(64), "owner = 'alice' or name = 'keep' and owner = 'bob'"),
    "a binary tree 9 deep under 55 alternating levels": (
        alternating(55, doubled(9)), "owner = 'alice' or name = 'keep' and name = 'keep'"),
    "a chain of 2,000 ors": (" or ".join(["id=''"] * 2000 + ["name = 'keep'"]), "name = 'keep'"),
    "a chain of 1,600 ands": (" and ".join(["id!=''"] * 1600 + ["name = 'keep'"]), "name = 'keep'"),
}


def _refusal(text: str) -> str:
    with pytest.raises(FilterError) as refused:
        parse_filter(text)
    return str(refused.value)


# The parser.

def test_every_filter_within_the_limits_is_within_what_where_takes():
    assert all(len(deep) <= 20_000 for deep, _shallow in WITHIN_THE_LIMITS.values())


def test_64_parentheses_parse_and_the_65th_is_refused_naming_where_and_the_limit():
    assert parse_filter(nested(64)) == parse_filter(ALICE)
    assert _refusal(nested(65)) == f"where, column 65: {TOO_DEEP}"


def test_64_nots_parse_and_the_65th_is_refused():
    tree = parse_filter(ALICE)
    for _ in range(64):
        tree = Not(tree)
    assert parse_filter("not " * 64 + ALICE) == tree
    assert _refusal("not " * 65 + ALICE) == f"where, column 257: {TOO_DEEP}"


def test_parentheses_and_nots_add_up():
    assert parse_filter("not (" * 32 + ALICE + ")" * 32)
    assert _refusal("not (" * 32 + "not " + ALICE + ")" * 32) == f"where, column 161: {TOO_DEEP}"


@pytest.mark.parametrize("text", [
    "not " * 3000 + ALICE,
    nested(10_000),
    "(" * 19_000 + ALICE,  # never closed: refused for its depth, at the 65th
], ids=["3,000 nots", "10,000 parentheses", "19,000 open parentheses"])
def test_thousands_of_levels_are_refused_at_the_65th(text):
    column = 257 if text.startswith("not") else 65
    assert _refusal(text) == f"where, column {column}: {TOO_DEEP}"


def test_parentheses_and_nots_inside_a_string_do_not_nest():
    quoted = "((((not " * 100 + "))))"
    tree = parse_filter(f"name = '{quoted}' and " + nested(64))
    assert tree.items[0] == Compare(lookup("name"), "=", quoted)


def test_the_not_of_not_in_and_is_not_null_is_no_level_but_a_value_list_is():
    assert parse_filter("not " * 64 + "name is not null")
    assert parse_filter("not " * 63 + "owner not in ('alice')")
    assert _refusal("not " * 64 + "owner not in ('alice')") == f"where, column 270: {TOO_DEEP}"


def test_a_negation_ends_with_its_operand():
    assert parse_filter(" and ".join(["not " * 64 + ALICE] * 10))
    assert parse_filter("(" * 63 + f"not {ALICE} or not {ALICE}" + ")" * 63)
    assert _refusal("(" * 63 + f"not {ALICE} or not not {ALICE}" + ")" * 63) == f"where, column 91: {TOO_DEEP}"


def test_a_long_chain_parses_into_one_flat_list():
    tree = parse_filter(WITHIN_THE_LIMITS["a chain of 2,000 ors"][0])
    assert isinstance(tree, AnyOf) and len(tree.items) == 2001


@pytest.mark.parametrize("name", list(WITHIN_THE_LIMITS))
def test_a_filter_renders_as_text_no_deeper_than_it_was_written(name):
    tree = parse_filter(WITHIN_THE_LIMITS[name][0])
    assert parse_filter(render(tree)) == tree


def test_order_by_takes_16_keys_and_refuses_17():
    assert len(parse_order_by(",".join(f"tags.k{i}" for i in range(16)))) == 16
    with pytest.raises(FilterError) as refused:
        parse_order_by(",".join(f"tags.k{i}" for i in range(17)))
    assert str(refused.value) == "order_by: 17 keys; at most 16 are taken"


@pytest.mark.parametrize(("character", "named"), [("\x00", "a NUL character (\\u0000)"),
                                                  ("\ud800", "a lone surrogate ('\\ud800')"),
                                                  ("\udfff", "a lone surrogate ('\\udfff')")])
def test_text_no_database_can_store_is_refused_naming_the_parameter(character, named):
    assert _refusal(f"name = 'a{character}'") == f"where, column 10: contains {named}, which cannot be stored"
    with pytest.raises(FilterError) as refused:
        parse_order_by(f"name,{character}")
    assert str(refused.value) == f"order_by, column 6: contains {named}, which cannot be stored"


# The databases, through the queries the routes run.

T0 = datetime(2026, 12, 1, tzinfo=UTC)
ROWS = [("alice", "keep"), ("alice", "other"), ("bob", "keep"), ("bob", "other"), ("carol", "keep"), ("carol", None)]


def _experiment(owner: str, name: str | None, minute: int) -> Experiment:
    spec = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2, "normalization": "normalized", "logit_scale": 1.0,
            "seed": 0, "bias": False, "resources": "cpu"}
    result = {"nc1": 0.1 * minute}
    return Experiment(
        id=str(uuid.uuid4()), status="succeeded", spec=spec, **spec_copies(spec), result=result,
        **result_copies(result), progress=1.0, created_at=T0.replace(minute=minute), attempts=1,
        cancel_requested=False, send_count=1, owner=owner, name=name, tags={},
    )


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request, tmp_path_factory):
    """A migrated database of each kind holding ROWS."""
    with migrated_engine(request, tmp_path_factory.mktemp("limits")) as engine:
        with Session(engine) as session:
            session.add_all(_experiment(owner, name, minute) for minute, (owner, name) in enumerate(ROWS))
            session.commit()
        yield engine


def _every_page(session: Session, tree) -> list[str]:
    """The ids of every match, two a page: each page after the first also compares with a cursor."""
    keys = parse_order_by("name,-owner,created_at")
    ids, cursor = [], None
    while True:
        page = queries.search(session, tree, keys, 2, cursor)
        ids += [item["id"] for item in page.items]
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


@pytest.mark.parametrize("name", list(WITHIN_THE_LIMITS))
def test_a_filter_within_the_limits_runs_and_selects_what_its_shallow_equivalent_does(database, name):
    deep, shallow = (parse_filter(text) for text in WITHIN_THE_LIMITS[name])  # parsed once: 0.2 s each, the longest
    owner = [lookup("owner")]
    with Session(database) as session:
        expected = _every_page(session, shallow)
        assert 0 < len(expected) < len(ROWS)
        assert _every_page(session, deep) == expected
        assert queries.aggregate(session, deep, owner, ["nc1"]) == queries.aggregate(session, shallow, owner, ["nc1"])
        assert queries.curves(session, deep, owner, "nc1") == []
        assert len(list(queries.stream(session, deep, None, [Experiment.id]))) == len(expected)


def test_16_order_keys_page_with_a_cursor(database):
    keys = parse_order_by(",".join(("-" if i % 2 else "") + f"tags.k{i}" for i in range(14)) + ",name,-owner")
    cursor = sql.encode_cursor(keys, [None] * 14 + ["keep", "bob"], "")
    with Session(database) as session:
        page = queries.search(session, parse_filter(alternating(64)), keys, 10, cursor)
    assert [(item["owner"], item["name"]) for item in page.items] == [("alice", "keep"), ("alice", "other")]


# Every route that takes a filter, through the API (in-process), on each database.

ROUTES = {
    "list": ("GET", "/experiments", {}),
    "search": ("POST", "/experiments/search", {}),
    "aggregate": ("GET", "/experiments/aggregate", {"group_by": "owner", "metrics": "nc1"}),
    "curves": ("GET", "/experiments/curves", {"group_by": "owner", "metric": "nc1"}),
    "curves.png": ("GET", "/experiments/curves.png", {"metric": "nc1"}),
    "ui": ("GET", "/ui", {}),
    "ui compare": ("GET", "/ui/compare", {"group_by": "owner", "metric": "nc1"}),
}


def _ask(client, route: str, where: str):
    method, path, params = ROUTES[route]
    if method == "POST":
        return client.post(path, json={"where": where, **params})
    return client.get(path, params={"where": where, **params})


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize(("text", "column"), [(nested(65), 65), ("not " * 3000 + ALICE, 257),
                                              ("(" * 19_000 + ALICE, 65)],
                         ids=["65 parentheses", "3,000 nots", "19,000 parentheses"])
def test_a_filter_nested_too_deep_is_a_422_naming_where_and_the_limit(api_each_db, route, text, column):
    response = _ask(api_each_db.client, route, text)
    assert response.status_code == 422, response.text[:500]
    detail = f"where, column {column}: {TOO_DEEP}"
    if route.startswith("ui"):
        # The dashboard shows the error on its page, beside the filter box.
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        assert detail in response.text
        return
    assert response.headers["content-type"] == PROBLEM_JSON
    problem = response.json()
    assert problem["detail"] == detail
    assert [(error["field"], error["parameter"]) for error in problem["errors"]] == [("where", "where")]


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("name", ["64 alternating levels", "63 nots and a parenthesis", "a chain of 2,000 ors"])
def test_a_filter_within_the_limits_is_answered_on_every_route(api_each_db, route, name):
    response = _ask(api_each_db.client, route, WITHIN_THE_LIMITS[name][0])
    assert response.status_code == 200, response.text[:500]


@pytest.mark.parametrize(("body", "detail"), [
    ({"where": "name = 'a\x00'"}, "where, column 10: contains a NUL character (\\u0000), which cannot be stored"),
    ({"order_by": ["name", "-tags.a\x00"]},
     "order_by, column 13: contains a NUL character (\\u0000), which cannot be stored"),
    # A lone surrogate in a string field does not pass validation; in a list's item it does, to the parser.
    ({"where": "name = 'a\ud800'"},
     "where: Input should be a valid string, unable to parse raw data as a unicode string"),
    ({"order_by": ["name", "-tags.a\ud800"]},
     "order_by, column 13: contains a lone surrogate ('\\ud800'), which cannot be stored"),
], ids=["NUL in where", "NUL in order_by", "surrogate in where", "surrogate in order_by"])
def test_a_searched_filter_or_order_the_databases_cannot_store_is_a_422_naming_it(api_each_db, body, detail):
    # As JSON text with escapes: a lone surrogate can only travel as "\ud800".
    response = api_each_db.client.post("/experiments/search", content=json.dumps(body),
                                 headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["detail"] == detail


def test_order_by_beyond_16_keys_and_a_cursor_nested_too_deep_are_422s_naming_them(api_each_db):
    client = api_each_db.client
    seventeen = ",".join(f"tags.k{i}" for i in range(17))
    for response in (client.get("/experiments", params={"order_by": seventeen}),
                     client.post("/experiments/search", json={"order_by": [f"tags.k{i}" for i in range(5000)]}),
                     client.get("/ui", params={"order_by": seventeen})):
        assert response.status_code == 422, response.text[:500]
    assert client.get("/experiments", params={"order_by": seventeen}).json()["detail"] == \
        "order_by: 17 keys; at most 16 are taken"

    nested_cursor = base64.urlsafe_b64encode(b"[" * 1500).decode()
    for response in (client.get("/experiments", params={"cursor": nested_cursor}),
                     client.post("/experiments/search", json={"cursor": nested_cursor}),
                     client.get("/ui", params={"cursor": nested_cursor})):
        assert response.status_code == 422, response.text[:500]
    assert client.get("/experiments", params={"cursor": nested_cursor}).json()["detail"] == \
        "cursor: not a cursor returned by this API"


def test_16_order_keys_with_a_cursor_are_answered(api_each_db):
    order_by = ",".join(f"-tags.k{i}" for i in range(15)) + ",name"
    cursor = sql.encode_cursor(parse_order_by(order_by), [None] * 15 + ["keep"], "")
    for response in (api_each_db.client.get("/experiments", params={"order_by": order_by, "cursor": cursor}),
                     api_each_db.client.get("/ui", params={"order_by": order_by, "cursor": cursor})):
        assert response.status_code == 200, response.text[:500]


def test_the_longest_group_by_and_metrics_lists_are_answered(api_each_db):
    client = api_each_db.client
    group_by = ",".join(f"tags.k{i}" for i in range(210))  # 1,989 of the 2,000 characters taken
    metrics = ",".join(["result.nc1"] + ["nc1"] * 497)  # 1,998: one metric, named 498 times
    response = client.get("/experiments/aggregate", params={"group_by": group_by, "metrics": metrics})
    assert response.status_code == 200, response.text[:500]
    assert all(list(item["metrics"]) == ["nc1"] for item in response.json()["items"])
    response = client.get("/experiments/curves", params={"group_by": group_by, "metric": "nc1"})
    assert response.status_code == 200, response.text[:500]
