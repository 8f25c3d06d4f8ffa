"""Faults the hostile-request probe (bench/probe.py) found, each checked where it was fixed and over HTTP.

- CSV rows end in CRLF (RFC 4180), so that a carriage return inside a text cell is quoted:
  a name "x\\r=SUM(2+2)" stays one cell and never starts a row with a formula.
- A filter's number beyond a double's range (an integer of 5,000 digits, 1e999) is a 422
  naming ``where``.
- A cursor's values are checked against the order keys' types (and its id is text): a
  crafted one is a 422 "cursor: not a cursor returned by this API", never a 500.
- Curves take one metric: two are a 422 naming ``metric``.
- A database error is a 503 only when the database cannot be reached; a statement beyond
  its limits is a 422.
- Every 422 names a field: the body as a whole (``body``), a spec as a whole (``spec``),
  the field a model-level cap is about, a key pydantic cannot read (a lone surrogate).
"""

import base64
import csv
import io
import json
import sqlite3
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service import sweeps
from service.models import Experiment, result_copies, spec_copies
from service.search import export, queries
from service.search.language import FilterError, parse_filter, parse_order_by
from tests.conftest import migrated_engine
from tests.support import answer_to_raised, free_port, wait_for_status

PROBLEM_JSON = "application/problem+json"
NOT_A_CURSOR = "cursor: not a cursor returned by this API"
TINY = {"kind": "ufm", "K": 2, "d": 2, "n_per_class": 1, "max_iters": 5}
GAUSSIAN = {"kind": "train", "dataset": "gaussian", "K": 2, "d": 2, "epochs": 1, "batch_size": 4, "mlp_depth": 1,
            "mlp_width": 2, "gaussian_dim": 2, "gaussian_train_per_class": 2, "gaussian_test_per_class": 2}
FORMULA_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
# Text cells holding line breaks, the first two with a formula right after a carriage return.
LINE_BREAKS = ["x\r=SUM(2+2)", "\r=1+1", "x\r\n=1+1", "a\nb"]


def _refused(response: httpx.Response) -> dict:
    assert response.status_code == 422, response.text[:500]
    assert response.headers["content-type"] == PROBLEM_JSON
    return response.json()


def _fields(problem: dict) -> list:
    return [error["field"] for error in problem["errors"]]


def _cursor(state) -> str:
    return base64.urlsafe_b64encode(json.dumps(state).encode()).decode().rstrip("=")


# 1. CSV: a line break inside a cell.

def _formula_cells(rows: list[list[str]]) -> list[str]:
    def number(value: str) -> bool:
        try:
            float(value)
        except ValueError:
            return False
        return True

    return [value for row in rows for value in row if value.startswith(FORMULA_TRIGGERS) and not number(value)]


@pytest.mark.parametrize("name", LINE_BREAKS)
def test_a_line_break_inside_a_text_cell_stays_in_its_cell(name):
    written = "".join(export.lines(["name", "count"], [[name, 1], ["next", 2]]))
    # As RFC 4180 reads it, and as the tests and clients read a response (csv over io.StringIO(text)).
    for reader in (csv.reader(io.StringIO(written, newline="")), csv.reader(io.StringIO(written))):
        rows = list(reader)
        assert rows == [["name", "count"], [export.cell(name), "1"], ["next", "2"]]
        assert not _formula_cells(rows)


@pytest.fixture(scope="module")
def planted(embedded, production):
    """Per stack: finished solves named (and tagged) with text holding line breaks, and the filter for them."""
    stacks = {}
    for stack in (embedded, production):
        batch = uuid.uuid4().hex[:12]
        ids = [stack.client.post("/experiments", json={"spec": TINY, "name": name, "tags": {"batch": batch, "x": name}})
               .raise_for_status().json()["id"] for name in LINE_BREAKS]
        done = [wait_for_status(stack.client, i, {"succeeded", "failed"}, timeout=120) for i in ids]
        assert {e["status"] for e in done} == {"succeeded"}, [e["error"] for e in done]
        stacks[stack.client] = f"tags.batch = '{batch}'"
    return stacks


@pytest.mark.parametrize("request_of", [
    lambda where: ("/experiments", {"where": where, "format": "csv"}, "name"),
    lambda where: ("/experiments/aggregate", {"where": where, "group_by": "name", "metrics": "nc1", "format": "csv"},
                   "name"),
    lambda where: ("/experiments/aggregate", {"where": where, "group_by": "tags.x", "format": "csv"}, "tags.x"),
    lambda where: ("/experiments/curves", {"where": where, "group_by": "name", "metric": "nc1", "format": "csv"},
                   "name"),
], ids=["list", "aggregate by name", "aggregate by tag", "curves by name"])
def test_every_csv_keeps_a_line_break_in_its_cell(stack, planted, request_of):
    path, params, column = request_of(planted[stack.client])
    response = stack.client.get(path, params=params)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv"), response.text
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert {row[column] for row in rows} == {export.cell(name) for name in LINE_BREAKS}
    assert not _formula_cells([list(row.values()) for row in rows])


# 2. A filter's numbers: at most a double's range.

@pytest.mark.parametrize(("where", "column"), [
    ("spec.seed = 1" + "0" * 5000, 13),  # more digits than Python reads into an int
    ("spec.seed in (1, 1" + "0" * 400 + ")", 18),  # read, but beyond the largest double
    ("progress < 1e999", 12),
    ("result.nc1 > -1e400", 14),
])
def test_a_number_beyond_a_double_is_a_filter_error_naming_where(where, column):
    with pytest.raises(FilterError) as refused:
        parse_filter(where)
    assert (refused.value.parameter, refused.value.column) == ("where", column)
    assert "is beyond the range of a double (±1.8e308)" in str(refused.value)


def test_numbers_within_a_double_still_parse():
    assert parse_filter("spec.seed = 9223372036854775808").value == 2**63
    assert parse_filter("progress < 1.7e308").value == 1.7e308
    assert parse_filter("spec.seed < 1" + "0" * 300).value == 10**300


@pytest.mark.parametrize("where", ["spec.seed = 1" + "0" * 5000, "progress < 1e999"])
def test_a_number_beyond_a_double_is_a_422_naming_where_on_every_route(stack, where):
    client = stack.client
    for response in (client.get("/experiments", params={"where": where}),
                     client.post("/experiments/search", json={"where": where}),
                     client.get("/experiments/aggregate", params={"where": where, "metrics": "nc1"}),
                     client.get("/experiments/curves", params={"where": where, "metric": "nc1"})):
        problem = _refused(response)
        assert _fields(problem) == ["where"] and "beyond the range of a double" in problem["detail"]


# 3. Cursors: values of the order keys' types, and an id of text.

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def _experiment(minute: int) -> Experiment:
    spec = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2, "normalization": "normalized", "logit_scale": 1.0,
            "seed": minute % 3, "bias": minute % 2 == 0, "resources": "cpu"}
    result = {"nc1": 0.1 * minute} if minute % 4 else None  # some without a result: null nc1
    return Experiment(
        id=str(uuid.uuid4()), status="succeeded", spec=spec, **spec_copies(spec), result=result,
        **result_copies(result), progress=1.0, created_at=T0.replace(minute=minute), attempts=1,
        cancel_requested=False, send_count=1, owner="alice", name=None if minute % 5 == 0 else f"run {minute % 3}",
        tags={},
    )


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request, tmp_path_factory):
    """A migrated database of each kind holding 12 experiments."""
    with migrated_engine(request, tmp_path_factory.mktemp("cursors")) as engine:
        with Session(engine) as session:
            session.add_all(_experiment(minute) for minute in range(12))
            session.commit()
        yield engine


CRAFTED = {
    "text for a number": ("result.nc1", ["abc"], "x"),
    "an object for a number": ("result.nc1", [{"a": 1}], "x"),
    "true for a number": ("result.nc1", [True], "x"),
    "an integer beyond a double": ("result.nc1", [10**400], "x"),
    "Infinity for a number": ("result.nc1", [float("inf")], "x"),
    "2^70 for an integer column": ("spec.seed", [2**70], "x"),
    "a fraction for an integer column": ("spec.seed", [1.5], "x"),
    "a naive datetime": ("-created_at", ["2020-01-01T00:00:00"], "x"),
    "a number for a datetime": ("-created_at", [5], "x"),
    "a number for text": ("name", [5], "x"),
    "a list for text": ("tags.a", [[1]], "x"),
    "text with NUL": ("name", ["a\x00"], "x"),
    "text with a lone surrogate": ("name", ["a\ud800"], "x"),
    "text for a bool": ("spec.bias", ["x"], "x"),
    "a number for a bool": ("spec.bias", [1], "x"),
    "an object for the id": ("-created_at", ["2020-01-01T00:00:00+00:00"], {"a": 1}),
    "a number for the id": ("name", [None], 5),
    "an id with NUL": ("name", ["x"], "\x00"),
    "after not a list": ("name", "x", "x"),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_a_crafted_cursor_is_refused_before_the_database(database, name):
    order, after, last_id = CRAFTED[name]
    cursor = _cursor({"order": order, "after": after, "id": last_id})
    with Session(database) as session, pytest.raises(FilterError) as refused:
        queries.search(session, None, parse_order_by(order), 5, cursor)
    assert str(refused.value) == NOT_A_CURSOR


@pytest.mark.parametrize("order", ["result.nc1", "-result.nc1,name", "spec.seed,-spec.bias", "-created_at", "name",
                                   "progress,-spec.K"])
def test_the_cursors_a_page_gives_lead_through_every_match(database, order):
    keys = parse_order_by(order)
    with Session(database) as session:
        expected = [item["id"] for item in queries.search(session, None, keys, 100, None).items]
        ids, cursor = [], None
        while True:
            page = queries.search(session, None, keys, 5, cursor)
            ids += [item["id"] for item in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    assert ids == expected and len(ids) == 12


@pytest.mark.parametrize("name", ["text for a number", "an object for a number", "a naive datetime",
                                  "an object for the id"])
def test_a_crafted_cursor_is_a_422_naming_it(stack, name):
    order, after, last_id = CRAFTED[name]
    params = {"order_by": order, "cursor": _cursor({"order": order, "after": after, "id": last_id})}
    problem = _refused(stack.client.get("/experiments", params=params))
    assert problem["detail"] == NOT_A_CURSOR and _fields(problem) == ["cursor"]
    assert _refused(stack.client.post("/experiments/search", json=params))["detail"] == NOT_A_CURSOR
    page = stack.client.get("/ui", params=params)  # the dashboard shows the error on its page
    assert page.status_code == 422 and NOT_A_CURSOR in page.text


# 4. Curves: one metric.

@pytest.mark.parametrize("path", ["/experiments/curves", "/experiments/curves.png"])
@pytest.mark.parametrize(("metric", "given"), [("nc1,loss", 2), ("", 0), (" , ", 0)])
def test_curves_take_one_metric(stack, path, metric, given):
    problem = _refused(stack.client.get(path, params={"metric": metric}))
    assert _fields(problem) == ["metric"]
    assert problem["detail"] == f"metric: curves take one history metric, e.g. nc1; {given} given"


# 5. Database errors: a 503 only for a database out of reach.

def _raised(url: str, statement: str, **connect_args) -> OperationalError:
    """The OperationalError that running ``statement`` on ``url`` raises, as SQLAlchemy gives it to the API."""
    engine = create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            connection.execute(text(statement))
    except OperationalError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError(f"{statement[:40]} ran")


def _sqlite_locked(tmp_path) -> OperationalError:
    path = tmp_path / "locked.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        return _raised(f"sqlite:///{path}", "SELECT * FROM t", timeout=0.1)
    finally:
        holder.close()


def test_a_statement_beyond_sqlites_limits_is_a_422_naming_the_parameters_given():
    error = _raised("sqlite://", "SELECT " + ",".join(["1"] * 2001))  # at most 2,000 columns
    problem = _refused(answer_to_raised(error, "?group_by=tags.a&metrics=nc1&limit=5"))
    assert problem["detail"] == "the request is beyond what the database takes: too many columns in result set"
    assert _fields(problem) == ["group_by", "metrics"]


def test_a_statement_beyond_postgresqls_limits_is_a_422(pg_admin):
    error = _raised(pg_admin.replace("postgresql://", "postgresql+psycopg://"),
                    "SELECT " + ",".join(["1"] * 1665))
    problem = _refused(answer_to_raised(error, "?where=x"))
    assert problem["detail"] == "the request is beyond what the database takes: " \
                                "target lists can have at most 1664 entries"
    assert _fields(problem) == ["where"]


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == PROBLEM_JSON and response.headers["retry-after"] == "5"


def test_sqlite_locked_or_not_to_be_opened_is_a_503(tmp_path):
    _assert_unavailable(answer_to_raised(_sqlite_locked(tmp_path)))
    _assert_unavailable(answer_to_raised(_raised(f"sqlite:///{tmp_path}/missing/dir/x.sqlite", "SELECT 1")))


def test_postgresql_out_of_reach_is_a_503(pg_admin):
    url = pg_admin.replace("postgresql://", "postgresql+psycopg://")
    refused = url.replace(":5432/", f":{free_port()}/")
    for error in (_raised(refused, "SELECT 1", connect_timeout=3),  # nothing listening
                  _raised(url.rsplit("/", 1)[0] + "/no_such_database_here", "SELECT 1"),  # FATAL while connecting
                  _raised(url, "SELECT pg_terminate_backend(pg_backend_pid())"),  # 57P01, the connection lost
                  _raised(url, "SELECT pg_sleep(5)", options="-c statement_timeout=50")):  # 57014, a stuck database
        _assert_unavailable(answer_to_raised(error))


# 6. Every 422 names a field.

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(("content", "headers"), [
    ("", JSON),
    ("[]", JSON),
    ('"a spec"', JSON),
    (json.dumps(TINY), {"Content-Type": "text/plain"}),
    ("kind=ufm&K=2&d=2&n_per_class=1", {"Content-Type": "application/x-www-form-urlencoded"}),
    ('--b\r\nContent-Disposition: form-data; name="kind"\r\n\r\nufm\r\n--b--\r\n',
     {"Content-Type": "multipart/form-data; boundary=b"}),
    (json.dumps(TINY), {}),
], ids=["empty", "an array", "a string", "text/plain", "form-urlencoded", "multipart", "no content type"])
def test_a_body_that_is_no_object_is_a_422_naming_body(stack, content, headers):
    client = stack.client
    assert _fields(_refused(client.post("/experiments", content=content, headers=headers))) == ["body"]
    assert _fields(_refused(client.post("/experiments/search", content=content, headers=headers))) == ["body"]


def test_a_patch_with_an_array_is_a_422_naming_body(stack):
    created = stack.client.post("/experiments", json={"spec": TINY, "name": "patched"}).raise_for_status().json()
    problem = _refused(stack.client.patch(f"/experiments/{created['id']}", json=[]))
    assert _fields(problem) == ["body"]


def _post(client: httpx.Client, body: dict) -> dict:
    """The body as JSON text with escapes: a lone surrogate can only travel as "\\ud800"."""
    return _refused(client.post("/experiments", content=json.dumps(body), headers=JSON))


def test_a_spec_field_named_by_a_lone_surrogate_is_named_as_it_came(stack):
    problem = _post(stack.client, {**TINY, "\ud800": 2})
    assert _fields(problem) == ["\ud800"]  # the response's JSON writes it \ud800, as the request did
    assert _fields(_post(stack.client, {"spec": {**TINY, "\ud800": 2}, "name": "x"})) == ["spec.\ud800"]
    assert _fields(_post(stack.client, {"spec": TINY, "\udc00": 1})) == ["\udc00"]


def test_a_gaussian_mixture_over_the_cap_names_gaussian_train_per_class(stack):
    huge = {**GAUSSIAN, "K": 1000, "gaussian_train_per_class": 2**31 - 1}  # within the integer range, over the cap
    problem = _post(stack.client, huge)
    assert _fields(problem) == ["gaussian_train_per_class"] and "NCLAB_MAX_TRAIN_SAMPLES" in problem["detail"]
    assert _fields(_post(stack.client, {"spec": huge})) == ["spec.gaussian_train_per_class"]


def test_a_job_over_the_memory_cap_names_the_spec(stack):
    wide = {**GAUSSIAN, "K": 1000, "d": 16384, "mlp_width": 16384, "mlp_depth": 32, "gaussian_train_per_class": 1000}
    for body in (wide, {"spec": wide, "name": "wide"}):
        problem = _post(stack.client, body)
        assert _fields(problem) == ["spec"] and "NCLAB_MAX_JOB_BYTES" in problem["detail"]


@pytest.mark.parametrize("kind", [["ufm"], {"a": 1}])
def test_a_sweep_whose_kind_is_no_string_is_refused_naming_kind(kind):
    """A list or an object as the base's kind used to raise TypeError (unhashable) in the expansion: a 500."""
    request = sweeps.SweepRequest(base={"kind": kind, "K": 3, "d": 4, "n_per_class": 2})
    with pytest.raises(sweeps.InvalidMember) as refused:
        sweeps.members(request)
    assert (refused.value.index, refused.value.field) == (0, "kind")
