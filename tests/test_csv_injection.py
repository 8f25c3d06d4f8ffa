"""CSV exports neutralise spreadsheet formulas (OWASP's "CSV Injection" page).

A text cell that starts with =, +, -, @, tab or carriage return gets a leading single quote;
numbers stay numbers. Checked on export.cell() itself, on the experiment export read from
SQLite and from PostgreSQL (which gives spec and result numbers as text), through the API
(in-process): the list, search, aggregate and curves CSV and the dashboard's CSV links; and
over real HTTP, from ``nclab ... --csv`` against ``nclab serve``.
"""

import csv
import html
import io
import json
import re
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy.orm import Session

from service import migrate
from service.db import make_engine
from service.models import Experiment, result_copies, spec_copies
from service.search import export, queries
from service.search.fields import RESULT_FIELDS, SPEC_FIELDS
from service.search.language import parse_order_by
from tests.support import wait_for_status
from tests.test_cli import nclab

HYPERLINK = '=HYPERLINK("http://x.example")'
UFM = {"kind": "ufm", "K": 4, "d": 6, "n_per_class": 3, "resources": "cpu"}
# The columns of the experiment export that hold numbers: none of their cells may be quoted.
NUMBER_COLUMNS = ["progress", "attempts"] + [name for name, field in (SPEC_FIELDS | RESULT_FIELDS).items()
                                             if field.type == "number"]


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def _assert_numbers_unquoted(rows: list[dict]) -> None:
    for row in rows:
        for column in NUMBER_COLUMNS:
            if row[column] and not row[column].startswith("["):  # n_per_class may be a list of counts
                float(row[column])


# export.cell(), the one function every export formats a value with.

@pytest.mark.parametrize("text", [HYPERLINK, "=1+2", "+1", "-2+3", "-5", "@SUM(1)", "\t=1", "\r=1", "-", "=",
                                  "=cmd|' /C calc'!A0"])
def test_text_starting_with_a_formula_trigger_gets_a_single_quote(text):
    assert export.cell(text) == "'" + text


@pytest.mark.parametrize("text", ["", "run 1", "fig2", "a=b", "5", "1e-3", "'=1", "normalized"])
def test_other_text_is_written_as_it_is(text):
    assert export.cell(text) == text


@pytest.mark.parametrize(("value", "written"), [
    (-0.5, "-0.5"), (-1e-19, "-1e-19"), (-3, "-3"), (0.1, "0.1"), (2, "2"), (None, ""), (True, "true"),
    (False, "false"), ([-1, 2], "[-1,2]"), ({"fig": "@SUM(1)"}, '{"fig":"@SUM(1)"}'),
    (datetime(2026, 1, 2, tzinfo=UTC), "2026-01-02T00:00:00+00:00"),
])
def test_values_that_are_not_text_are_written_by_their_type(value, written):
    assert export.cell(value) == written


# The experiment export as each database reads it.

@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'csv.sqlite'}"
        return
    from tests.conftest import fresh_pg_database

    with fresh_pg_database(request.getfixturevalue("pg_admin")) as url:
        yield url


def test_the_experiment_export_quotes_text_columns_and_leaves_negative_numbers(database_url):
    # Values no submission would pass (a negative decay, a formula for a data set), stored
    # directly: the export must decide by the field's type whatever the stored value.
    spec = {**UFM, "normalization": "regularized", "lambda_w": -0.5, "seed": -3, "dataset": "+cmd",
            "lr_milestones": [-1, 2]}
    result = {"nc1": 0.25, "optimality_gap": -1e-19, "iterations": -7, "converged": False, "stop_reason": "-x"}
    experiment = Experiment(
        id=str(uuid.uuid4()), status="failed", spec=spec, **spec_copies(spec), result=result, **result_copies(result),
        progress=-0.5, error="=1+1", created_at=datetime(2026, 1, 2, tzinfo=UTC), attempts=1,
        cancel_requested=False, send_count=1, owner="@owner", name="-5", tags={"fig": "@SUM(1)"},
    )
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            session.add(experiment)
            session.commit()
            text = "".join(export.experiments(
                queries.stream(session, None, parse_order_by("id"), export.EXPORT_COLUMNS)))
    finally:
        engine.dispose()
    (row,) = _rows(text)
    assert (row["name"], row["owner"], row["error"]) == ("'-5", "'@owner", "'=1+1")
    assert (row["spec.dataset"], row["result.stop_reason"]) == ("'+cmd", "'-x")
    assert json.loads(row["tags"]) == {"fig": "@SUM(1)"}  # JSON starts with {: never a formula
    assert json.loads(row["spec.lr_milestones"]) == [-1, 2]
    assert (row["spec.normalization"], row["spec.K"], row["result.converged"]) == ("regularized", "4", "false")
    assert float(row["spec.lambda_w"]) == -0.5 and int(row["spec.seed"]) == -3
    assert float(row["result.optimality_gap"]) == -1e-19 and int(row["result.iterations"]) == -7
    assert float(row["progress"]) == -0.5
    _assert_numbers_unquoted([row])


# Through the API: in-process (the routes), and the CLI against `nclab serve`.

def _label(client, finish) -> tuple[str, dict]:
    """Two finished solves whose name and tags are formulas, in a batch of their own: the filter, and them by id."""
    batch = uuid.uuid4().hex[:12]
    labels = [(HYPERLINK, {"batch": batch, "fig": "@SUM(1)", "note": "-2+3"}),
              ("-5", {"batch": batch, "fig": "+1", "note": "\tx"})]
    ids = []
    for seed, (name, tags) in enumerate(labels):
        response = client.post("/experiments", json={"spec": {**UFM, "seed": seed}, "name": name, "tags": tags})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    done = [finish(i) for i in ids]
    assert [e["status"] for e in done] == ["succeeded", "succeeded"], [e["error"] for e in done]
    return f"tags.batch = '{batch}'", {e["id"]: e for e in done}


@pytest.fixture(scope="module")
def labelled(api):
    return api, *_label(api.client, api.run)


@pytest.fixture(scope="module")
def labelled_on_serve(embedded):
    def finish(experiment_id: str) -> dict:
        return wait_for_status(embedded.client, experiment_id, {"succeeded", "failed"}, timeout=120)

    return embedded, *_label(embedded.client, finish)


def _csv(response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    return _rows(response.text)


def _assert_experiment_rows(rows: list[dict], done: dict) -> None:
    assert sorted(row["id"] for row in rows) == sorted(done)
    for row in rows:
        experiment = done[row["id"]]
        assert row["name"] == "'" + experiment["name"]
        assert json.loads(row["tags"]) == experiment["tags"] and row["tags"].startswith("{")
        assert (row["status"], row["kind"], row["spec.normalization"]) == ("succeeded", "ufm", "normalized")
        assert int(row["spec.K"]) == 4 and float(row["result.nc1"]) == experiment["result"]["nc1"]
        assert float(row["result.optimality_gap"]) == experiment["result"]["optimality_gap"]
    _assert_numbers_unquoted(rows)


def test_list_and_search_csv_quote_names_and_keep_numbers(labelled):
    stack, where, done = labelled
    client = stack.client
    listed = _csv(client.get("/experiments", params={"where": where, "format": "csv"}))
    _assert_experiment_rows(listed, done)
    assert _csv(client.get("/experiments", params={"where": where}, headers={"Accept": "text/csv"})) == listed
    searched = _csv(client.post("/experiments/search", params={"format": "csv"}, json={"where": where}))
    assert searched == listed


def test_aggregate_and_curves_csv_quote_group_values(labelled):
    stack, where, done = labelled
    client = stack.client
    aggregated = _csv(client.get("/experiments/aggregate", params={
        "where": where, "group_by": "tags.fig,tags.note", "metrics": "nc1", "format": "csv"}))
    assert sorted((r["tags.fig"], r["tags.note"]) for r in aggregated) == [("'+1", "'\tx"), ("'@SUM(1)", "'-2+3")]
    assert [int(r["count"]) for r in aggregated] == [1, 1]
    assert all(float(r["nc1.mean"]) > 0 for r in aggregated)

    curves = _csv(client.get("/experiments/curves", params={
        "where": where, "group_by": "name", "metric": "nc1", "format": "csv"}))
    assert {r["name"] for r in curves} == {"'" + HYPERLINK, "'-5"}
    assert all(int(r["step"]) >= 0 and float(r["mean"]) > 0 for r in curves)


def _csv_link(page, pattern: str) -> str:
    assert page.status_code == 200, page.text
    return html.unescape(re.search(pattern, page.text).group(1))


def test_the_dashboard_csv_links_are_neutralised(labelled):
    stack, where, done = labelled
    client = stack.client
    link = _csv_link(client.get("/ui", params={"where": where}), r'id="csv" href="([^"]+)"')
    _assert_experiment_rows(_csv(client.get(link)), done)

    compare = client.get("/ui/compare", params={"where": where, "group_by": "tags.fig", "metric": "nc1"})
    link = _csv_link(compare, r'href="(/experiments/aggregate\?[^"]+)"')
    assert sorted(r["tags.fig"] for r in _csv(client.get(link))) == ["'+1", "'@SUM(1)"]


def test_the_cli_csv_keeps_the_quotes(labelled_on_serve):
    stack, where, done = labelled_on_serve
    for limit in ("0", "2"):  # the server's text as it is, and the rows the CLI writes itself
        listed = nclab(stack, "ls", "--where", where, "--csv", "--limit", limit)
        assert listed.returncode == 0, listed.stderr
        _assert_experiment_rows(_rows(listed.stdout), done)
    compared = nclab(stack, "compare", "--where", where, "--group-by", "tags.fig", "--metric", "nc1", "--csv")
    assert compared.returncode == 0, compared.stderr
    assert sorted(r["tags.fig"] for r in _rows(compared.stdout)) == ["'+1", "'@SUM(1)"]
