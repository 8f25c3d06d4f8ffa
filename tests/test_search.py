"""The filter language, ordering, pagination, aggregates and curves, on SQLite and PostgreSQL.

Each filter runs in the database and, independently, through a plain-Python evaluation
of the same tree over the same experiments (SQL's three-valued logic: a comparison with
a missing value is unknown, and only rows where the filter is true are selected).
Random experiments take their values from small sets, so that ties, nulls and repeated
values are the rule rather than the exception.
"""

import csv
import io
import json
import math
import random
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.orm import Session

from service import migrate
from service.db import make_engine
from service.models import Experiment, MetricRow, history_copies, result_copies, spec_copies
from service.search import export, queries
from service.search.fields import lookup
from service.search.language import (
    AllOf, AnyOf, Compare, IsNull, Member, Not, OrderKey, parse_filter, parse_order_by, render,
)

T0 = datetime(2026, 12, 1, tzinfo=UTC)
TIMES = [T0 + timedelta(hours=h) for h in range(4)]
OWNERS = ["alice", "bob", "anonymous"]
NC1_VALUES = [None, 1e-3, 0.1, 0.1, 0.5, 2.0]
SCALES = [1.0, 5.0, 10.0]


def _random_experiment(rng: random.Random, created_at: datetime | None = None) -> Experiment:
    kind = rng.choice(["ufm", "train"])
    normalization = rng.choice(["normalized", "regularized"] + (["none"] if kind == "train" else []))
    spec = {"kind": kind, "K": rng.choice([2, 3, 5]), "d": rng.choice([4, 8]), "normalization": normalization,
            "logit_scale": rng.choice(SCALES), "seed": rng.randrange(3), "resources": "cpu" if kind == "ufm" else "gpu"}
    if kind == "ufm":
        spec["n_per_class"] = rng.choice([2, 3, [2, 3]])
        spec["bias"] = rng.choice([True, False])
    else:
        spec["dataset"] = rng.choice(["mnist", "digits"])
        spec["lr"] = rng.choice([0.01, 0.05])
    status = rng.choice(["succeeded", "succeeded", "failed", "queued"])
    result = None
    if status == "succeeded":
        result = {"nc1": rng.choice(NC1_VALUES), "accuracy": rng.choice([0.5, 1.0]),
                  "converged": rng.choice([True, False])}
    tags = {key: rng.choice(["fig2", "fig3"]) for key in rng.sample(["paper", "run"], rng.randrange(3))}
    return Experiment(
        id=str(uuid.UUID(int=rng.getrandbits(128))), status=status, spec=spec, **spec_copies(spec),
        **result_copies(result), progress=rng.choice([0.0, 0.5, 1.0]), result=result,
        created_at=created_at or rng.choice(TIMES),
        finished_at=rng.choice([None, *TIMES]), attempts=1, cancel_requested=False, send_count=1,
        owner=rng.choice(OWNERS), name=rng.choice([None, "alpha", "beta", "it's"]), tags=tags,
    )


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request, tmp_path_factory):
    """A migrated database of each kind with 80 random experiments; the experiments as Python sees them."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('search') / 'search.sqlite'}"
        context = None
    else:
        from tests.conftest import fresh_pg_database

        context = fresh_pg_database(request.getfixturevalue("pg_admin"))
        url = context.__enter__()
    migrate.upgrade(url)
    engine = make_engine(url)
    rng = random.Random(7)
    experiments = [_random_experiment(rng) for _ in range(80)]
    with Session(engine, expire_on_commit=False) as session:
        session.add_all(experiments)
        session.commit()
    yield engine, {e.id: e for e in experiments}
    engine.dispose()
    if context is not None:
        context.__exit__(None, None, None)


# The plain-Python reading of a field, and three-valued logic (None is unknown).

def _value(experiment: Experiment, name: str):
    scope, _, key = name.partition(".")
    if not key:
        return getattr(experiment, name)
    document = {"spec": experiment.spec, "result": experiment.result or {}, "tags": experiment.tags}[scope]
    value = document.get(key)
    if scope == "spec" and lookup(name).type == "number" and not isinstance(value, int | float):
        return None  # a list of counts is not a number
    return value


def _compare(value, op: str, literal):
    if value is None:
        return None
    return {"=": value == literal, "!=": value != literal, "<": value < literal, "<=": value <= literal,
            ">": value > literal, ">=": value >= literal}[op]


def evaluate(tree, experiment: Experiment):
    match tree:
        case Compare(field, op, literal):
            return _compare(_value(experiment, field.name), op, literal)
        case Member(field, values, negated):
            value = _value(experiment, field.name)
            if value is None:
                return None
            return (value in values) != negated
        case IsNull(field, negated):
            return (_value(experiment, field.name) is None) == (not negated)
        case AllOf(items):
            results = [evaluate(item, experiment) for item in items]
            return False if False in results else (None if None in results else True)
        case AnyOf(items):
            results = [evaluate(item, experiment) for item in items]
            return True if True in results else (None if None in results else False)
        case Not(item):
            result = evaluate(item, experiment)
            return None if result is None else not result
    raise TypeError(tree)


# Random filters over fields of every type and scope.

LEAF_VALUES = {
    "status": st.sampled_from(["succeeded", "failed", "queued"]),
    "kind": st.sampled_from(["ufm", "train"]),
    "owner": st.sampled_from(OWNERS),
    "name": st.sampled_from(["alpha", "beta", "it's"]),
    "progress": st.sampled_from([0.0, 0.5, 1.0]),
    "created_at": st.sampled_from(TIMES),
    "finished_at": st.sampled_from(TIMES),
    "tags.paper": st.sampled_from(["fig2", "fig3"]),
    "tags.run": st.sampled_from(["fig2", "fig3"]),
    "spec.K": st.sampled_from([2, 3, 4, 5]),
    "spec.d": st.sampled_from([4, 8]),
    "spec.n_per_class": st.sampled_from([2, 3]),
    "spec.normalization": st.sampled_from(["normalized", "regularized", "none"]),
    "spec.logit_scale": st.sampled_from(SCALES + [7.5]),
    "spec.dataset": st.sampled_from(["mnist", "digits"]),
    "spec.lr": st.sampled_from([0.01, 0.05]),
    "spec.bias": st.booleans(),
    "result.nc1": st.sampled_from([v for v in NC1_VALUES if v is not None] + [0.05]),
    "result.accuracy": st.sampled_from([0.5, 1.0]),
    "result.converged": st.booleans(),
}


@st.composite
def leaves(draw):
    name = draw(st.sampled_from(sorted(LEAF_VALUES)))
    field = lookup(name)
    values = LEAF_VALUES[name]
    shape = draw(st.sampled_from(["compare", "compare", "member", "null"]))
    if shape == "null":
        return IsNull(field, draw(st.booleans()))
    if shape == "member":
        return Member(field, tuple(draw(st.lists(values, min_size=1, max_size=3))), draw(st.booleans()))
    ops = ["=", "!="] if field.type == "bool" else ["=", "!=", "<", "<=", ">", ">="]
    return Compare(field, draw(st.sampled_from(ops)), draw(values))


filters = st.recursive(
    leaves(),
    lambda children: st.one_of(
        st.lists(children, min_size=2, max_size=3).map(lambda items: AllOf(tuple(items))),
        st.lists(children, min_size=2, max_size=3).map(lambda items: AnyOf(tuple(items))),
        children.map(Not),
    ),
    max_leaves=6,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(tree=filters)
def test_a_filter_selects_exactly_what_its_python_evaluation_selects(database, tree):
    engine, experiments = database
    parsed = parse_filter(render(tree))
    assert parsed == tree  # the text form round-trips
    expected = {i for i, e in experiments.items() if evaluate(tree, e) is True}
    with Session(engine) as session:
        found = {e.id for e in session.scalars(queries.matching(session, parsed))}
    assert found == expected, render(tree)


ORDER_FIELDS = ["result.nc1", "spec.logit_scale", "owner", "created_at", "name", "spec.n_per_class", "progress",
                "result.converged"]


def python_order(experiments: list[Experiment], keys: list[OrderKey]) -> list[str]:
    """Stable sorts from the last key to the first; nulls last either way; id breaks ties."""
    ordered = sorted(experiments, key=lambda e: e.id, reverse=keys[-1].descending)
    for key in reversed(keys):
        present = [e for e in ordered if _value(e, key.field.name) is not None]
        missing = [e for e in ordered if _value(e, key.field.name) is None]
        present.sort(key=lambda e: _value(e, key.field.name), reverse=key.descending)
        ordered = present + missing
    return [e.id for e in ordered]


def all_pages(session, tree, keys, page_size: int) -> list[str]:
    ids, cursor = [], None
    while True:
        page = queries.search(session, tree, keys, page_size, cursor)
        ids += [e["id"] for e in page.items]
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


@PROPERTY
@given(tree=st.none() | filters,
       order=st.lists(st.tuples(st.sampled_from(ORDER_FIELDS), st.booleans()), min_size=1, max_size=3,
                      unique_by=lambda key: key[0]),
       page_size=st.integers(1, 9))
def test_pages_in_any_order_are_the_python_order_with_nulls_last_and_ties_by_id(database, tree, order, page_size):
    engine, experiments = database
    keys = parse_order_by(",".join(("-" if descending else "") + name for name, descending in order))
    matches = [e for e in experiments.values() if tree is None or evaluate(tree, e) is True]
    with Session(engine) as session:
        assert all_pages(session, tree, keys, page_size) == python_order(matches, keys)


def test_pagination_stays_exact_when_rows_arrive_between_pages(database):
    engine, experiments = database
    keys = parse_order_by("result.nc1,-created_at")
    rng = random.Random(11)
    seen, cursor, added = [], None, []
    with Session(engine, expire_on_commit=False) as session:
        while True:
            page = queries.search(session, None, keys, 7, cursor)
            seen += [e["id"] for e in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
            new = [_random_experiment(rng, created_at=T0 + timedelta(days=1)) for _ in range(3)]
            session.add_all(new)
            session.commit()
            added += new
        everything = list(experiments.values()) + added
        final_order = python_order(everything, keys)
        try:
            # Every row that was there from the start comes exactly once, and what came is in order.
            assert len(seen) == len(set(seen))
            assert set(experiments) <= set(seen)
            assert seen == [i for i in final_order if i in set(seen)]
        finally:
            for experiment in added:
                session.delete(experiment)
            session.commit()


def test_aggregates_equal_numpy_on_the_same_rows(database):
    engine, experiments = database
    tree = parse_filter("status = 'succeeded'")
    groups = [lookup("spec.normalization"), lookup("spec.logit_scale")]
    with Session(engine) as session:
        items = queries.aggregate(session, tree, groups, ["nc1", "accuracy"])
    expected_groups = {}
    for e in experiments.values():
        if e.status == "succeeded":
            expected_groups.setdefault((e.spec["normalization"], e.spec["logit_scale"]), []).append(e)
    assert [tuple(item["group"].values()) for item in items] == sorted(expected_groups)
    for item in items:
        members = expected_groups[tuple(item["group"].values())]
        assert item["count"] == len(members)
        for key in ("nc1", "accuracy"):
            values = np.array([e.result[key] for e in members if e.result[key] is not None])
            figures = item["metrics"][key]
            assert figures["n"] == len(values)
            if len(values) == 0:
                assert figures["mean"] is None and figures["median"] is None
                continue
            for name, reference in [("mean", values.mean()), ("min", values.min()), ("max", values.max()),
                                    ("median", np.median(values))]:
                assert math.isclose(figures[name], reference, rel_tol=1e-12), (name, figures, values)
            if len(values) > 1:
                assert math.isclose(figures["std"], values.std(ddof=1), rel_tol=1e-12, abs_tol=1e-15)
            else:
                assert figures["std"] is None


@pytest.mark.parametrize("metric", ["nc1", "lr"])  # a typed copy, and a key read from the document
def test_curves_equal_numpy_per_group_and_step(database, metric):
    engine, experiments = database
    rng = np.random.default_rng(3)
    with_history = sorted(experiments)[:30]
    histories = {i: rng.lognormal(-3, 2, size=6) for i in with_history}
    with Session(engine) as session:
        for experiment_id, values in histories.items():
            for step, value in enumerate(values):
                row = {metric: float(value), "loss": 1.0} if step != 4 else {"loss": 1.0}  # step 4 lacks it
                session.add(MetricRow(experiment_id=experiment_id, step=step, values=row, recorded_at=T0,
                                      **history_copies(row)))
        session.commit()
        try:
            tree = parse_filter("spec.d = 8")
            items = queries.curves(session, tree, [lookup("kind")], metric)
        finally:
            session.query(MetricRow).delete()
            session.commit()
    members = {}
    for experiment_id in with_history:
        if experiments[experiment_id].spec["d"] == 8:
            members.setdefault(experiments[experiment_id].kind, []).append(histories[experiment_id])
    assert [item["group"]["kind"] for item in items] == sorted(members)
    for item in items:
        stacked = np.array(members[item["group"]["kind"]])
        assert [p["step"] for p in item["points"]] == [0, 1, 2, 3, 5]
        for point in item["points"]:
            column = stacked[:, point["step"]]
            assert point["n"] == len(column)
            assert math.isclose(point["mean"], column.mean(), rel_tol=1e-12)
            assert point["min"] == column.min() and point["max"] == column.max()
            if len(column) > 1:
                assert math.isclose(point["std"], column.std(ddof=1), rel_tol=1e-12)


def test_csv_export_parses_back_to_the_same_values(database):
    engine, experiments = database
    with Session(engine) as session:
        text = "".join(export.experiments(queries.stream(session, None, parse_order_by("id"), export.EXPORT_COLUMNS,
                                                         batch=7)))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [row["id"] for row in rows] == sorted(experiments)

    def parsed(cell: str):
        if cell == "":
            return None
        if cell in ("true", "false"):
            return cell == "true"
        try:
            return json.loads(cell)  # numbers, and lists
        except ValueError:
            return cell  # strings are written as they are

    for row in rows:
        experiment = experiments[row["id"]]
        assert (row["owner"], row["name"] or None) == (experiment.owner, experiment.name)
        assert row["status"] == experiment.status
        assert json.loads(row["tags"]) == experiment.tags
        assert datetime.fromisoformat(row["created_at"]) == experiment.created_at
        for key in export.SPEC_KEYS:
            assert parsed(row[f"spec.{key}"]) == experiment.spec.get(key), key
        for key in export.RESULT_KEYS:
            assert parsed(row[f"result.{key}"]) == (experiment.result or {}).get(key), key
