"""The audit (issue 24): each change and each refusal (401, 403, 429) is exactly one row with who, role, action,
target, when, from where, outcome and detail; GET /audit filters, orders, pages and exports it, for admins."""

import contextlib
import csv
import io
from datetime import datetime, timedelta

import pytest
from fastapi import Depends, HTTPException

from tests.conftest import fresh_pg_database, in_process_api

SPEC = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}
KEYS = "alice:alice-key, bob:bob-key, wall:wall-key:reader, root:root-key:admin"
ALICE, BOB, WALL, ROOT = ({"Authorization": f"Bearer {key}-key"} for key in ("alice", "bob", "wall", "root"))
FIELDS = ("owner", "role", "action", "target", "client", "status")


@pytest.fixture(params=["sqlite", "postgresql"])
def lab(request, tmp_path):
    """The API in-process with the lab's keys, on SQLite or on a fresh PostgreSQL database."""
    with contextlib.ExitStack() as stack:
        database_url = None
        if request.param == "postgresql":
            database_url = stack.enter_context(fresh_pg_database(request.getfixturevalue("pg_admin")))
        yield stack.enter_context(in_process_api(tmp_path, database_url, NCLAB_API_KEYS=KEYS)).client


def entries(client, **params) -> list[dict]:
    """Every audit row (newest first unless ``order_by`` says otherwise), page by page."""
    rows, cursor = [], None
    while True:
        page = client.get("/audit", params={**params, "limit": 500, **({"cursor": cursor} if cursor else {})},
                          headers=ROOT)
        assert page.status_code == 200, page.text
        rows += page.json()["items"]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return rows


def new_rows(client, before: int) -> list[dict]:
    """The rows written since there were ``before``, oldest first."""
    return entries(client, order_by="at")[before:]


def fields(row: dict) -> tuple:
    return tuple(row[name] for name in FIELDS)


def test_each_change_is_one_row_with_who_what_and_the_outcome(lab):
    start = datetime.now().astimezone() - timedelta(seconds=1)
    submitted = lab.post("/experiments", json=SPEC, headers=ALICE).json()["id"]
    sweep = lab.post("/sweeps", json={"base": SPEC, "grid": {"seed": [0, 1, 2]}}, headers=ALICE).json()["id"]
    assert lab.patch(f"/experiments/{submitted}", json={"name": "n", "tags": {"fig": "2"}}, headers=ALICE).is_success
    assert lab.post(f"/experiments/{submitted}/cancel", headers=ALICE).is_success
    assert lab.patch(f"/sweeps/{sweep}", json={"tags": {"fig": "3"}}, headers=ALICE).is_success
    assert lab.post(f"/sweeps/{sweep}/cancel", headers=ROOT).is_success

    rows = new_rows(lab, 0)
    assert [fields(row) for row in rows] == [
        ("alice", "member", "experiment.submit", submitted, "testclient", 202),
        ("alice", "member", "sweep.submit", sweep, "testclient", 202),
        ("alice", "member", "experiment.relabel", submitted, "testclient", 200),
        ("alice", "member", "experiment.cancel", submitted, "testclient", 200),
        ("alice", "member", "sweep.relabel", sweep, "testclient", 200),
        ("root", "admin", "sweep.cancel", sweep, "testclient", 200),
    ]
    assert [row["detail"] for row in rows] == [
        "ufm on queue cpu", "3 experiments", '{"name": "n", "tags": {"fig": "2"}}', "canceled",
        '{"tags": {"fig": "3"}} on 3 experiments', "3 canceled, 0 asked to stop"]
    assert all(start <= datetime.fromisoformat(row["at"]) <= datetime.now().astimezone() for row in rows)


def test_a_replayed_or_invalid_submit_writes_no_row_and_an_invalid_relabel_changes_nothing(lab):
    key = {**ALICE, "Idempotency-Key": "once"}
    first = lab.post("/experiments", json=SPEC, headers=key).json()["id"]
    assert lab.post("/experiments", json=SPEC, headers=key).headers["Idempotent-Replayed"] == "true"
    assert lab.post("/experiments", json={**SPEC, "K": 0}, headers=ALICE).status_code == 422
    too_many = {f"t{i}": "x" for i in range(40)}
    assert lab.patch(f"/experiments/{first}", json={"name": "x", "tags": too_many}, headers=ALICE).status_code == 422
    assert [fields(row) for row in new_rows(lab, 0)] == [
        ("alice", "member", "experiment.submit", first, "testclient", 202)]
    assert lab.get(f"/experiments/{first}", headers=ALICE).json()["name"] is None


def test_each_refusal_is_one_row(lab):
    experiment = lab.post("/experiments", json=SPEC, headers=ALICE).json()["id"]
    before = len(entries(lab))
    assert lab.post(f"/experiments/{experiment}/cancel", headers={"Authorization": "Bearer guess"}).status_code == 401
    assert lab.get("/experiments").status_code == 401
    assert lab.post(f"/experiments/{experiment}/cancel", headers=BOB).status_code == 403
    assert lab.post("/experiments", json=SPEC, headers=WALL).status_code == 403
    assert lab.get("/audit", headers=BOB).status_code == 403

    rows = new_rows(lab, before)
    assert [fields(row) for row in rows] == [
        (None, None, "experiment.cancel", experiment, "testclient", 401),
        (None, None, "read", None, "testclient", 401),
        ("bob", "member", "experiment.cancel", experiment, "testclient", 403),
        ("wall", "reader", "experiment.submit", None, "testclient", 403),
        ("bob", "member", "audit.read", None, "testclient", 403),
    ]
    assert rows[0]["detail"].startswith("missing or unknown API key")
    assert rows[2]["detail"] == f"bob (member) may not cancel experiment {experiment}: it is alice's"
    assert lab.get(f"/experiments/{experiment}", headers=BOB).json()["status"] == "queued"


def test_a_429_raised_by_any_route_is_recorded_and_answered_with_its_retry_after(lab):
    """A quota's refusal (raised in the submit routes as an HTTPException) goes through the same handler."""
    from service.api.deps import require_api_key

    def over_quota():
        raise HTTPException(429, "alice has 5 queued jobs, the most allowed", headers={"Retry-After": "7"})

    lab.app.add_api_route("/quota-probe", over_quota, methods=["POST"], name="experiment.submit",
                          dependencies=[Depends(require_api_key)])
    before = len(entries(lab))
    answer = lab.post("/quota-probe", headers=ALICE)
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "7"
    assert answer.headers["content-type"] == "application/problem+json"
    (row,) = new_rows(lab, before)
    assert fields(row) == ("alice", "member", "experiment.submit", None, "testclient", 429)
    assert row["detail"] == "alice has 5 queued jobs, the most allowed"


def test_the_audit_filters_orders_pages_and_exports_for_admins_only(lab):
    for headers in (ALICE, BOB, ALICE):
        lab.post("/experiments", json=SPEC, headers=headers)
    lab.post("/experiments", json=SPEC, headers=WALL)  # 403
    lab.get("/experiments", headers={"X-API-Key": "wrong"})  # 401

    assert [row["owner"] for row in entries(lab, where="action = 'experiment.submit' and status = 202")] \
        == ["alice", "bob", "alice"]
    assert [fields(row)[:3] for row in entries(lab, where="status >= 400 and status < 500", order_by="status")] == [
        (None, None, "read"), ("wall", "reader", "experiment.submit")]
    assert [row["owner"] for row in entries(lab, where="owner is null")] == [None]
    assert [row["owner"] for row in entries(lab, where="role in ('member', 'reader')", order_by="owner,-at")] == [
        "alice", "alice", "bob", "wall"]

    everything = entries(lab)
    assert len(everything) == 5 and everything == sorted(everything, key=lambda row: row["at"], reverse=True)
    paged, cursor = [], None
    while True:
        page = lab.get("/audit", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=ROOT).json()
        paged += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert paged == everything

    for asked in ({"params": {"format": "csv"}, "headers": ROOT}, {"headers": {**ROOT, "Accept": "text/csv"}}):
        answer = lab.get("/audit", **asked)
        assert answer.headers["content-type"].startswith("text/csv")
        table = list(csv.DictReader(io.StringIO(answer.text)))
        assert list(table[0]) == ["id", "at", "owner", "role", "action", "target", "client", "status", "detail"]
        assert [row["id"] for row in table] == [row["id"] for row in everything]
        assert table[-1]["owner"] == "alice" and table[-1]["status"] == "202"

    unknown = lab.get("/audit", params={"where": "spec.K = 3"}, headers=ROOT)
    assert unknown.status_code == 422 and "the audit's fields are id, at, owner" in unknown.json()["detail"]
    assert lab.get("/audit", params={"where": "action = 'delete'"}, headers=ROOT).status_code == 422
    for member in (ALICE, WALL):
        assert lab.get("/audit", headers=member).status_code == 403
