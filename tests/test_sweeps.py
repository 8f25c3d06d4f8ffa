"""Sweeps over real HTTP, PostgreSQL, Redis and a Celery worker; their validation in-process,
on SQLite and on PostgreSQL; and how members are built."""

import itertools

import pytest

from service import sweeps
from tests.support import ENDLESS, wait_for_status

BASE = {"kind": "ufm", "d": 6, "n_per_class": 2}
VARIANTS = [{"normalization": "normalized", "logit_scale": 5}, {"normalization": "regularized", "lambda_w": 1e-3}]
GRID = {"seed": [0, 1], "K": [3, 4]}


def _count(client, path: str) -> int:
    return len(client.get(path, params={"limit": 100}).json()["items"])


def test_a_sweep_creates_base_x_variants_x_grid_and_each_member_runs(production):
    client = production.client
    response = client.post("/sweeps", json={"name": "modes", "tags": {"paper": "fig1"}, "base": BASE,
                                            "variants": VARIANTS, "grid": GRID})
    assert response.status_code == 202, response.text
    sweep = response.json()
    assert response.headers["location"] == f"/sweeps/{sweep['id']}"
    assert sweep["size"] == len(sweep["members"]) == 8 and sweep["owner"] == "anonymous"

    members = [client.get(f"/experiments/{i}").json() for i in sweep["members"]]
    varied = sorted((m["spec"]["normalization"], m["spec"]["seed"], m["spec"]["K"]) for m in members)
    assert varied == sorted((v["normalization"], s, k) for v in VARIANTS for s, k in itertools.product(*GRID.values()))
    for member in members:
        assert member["sweep"] == sweep["id"] and member["name"] == "modes" and member["tags"] == {"paper": "fig1"}
        if member["spec"]["normalization"] == "normalized":
            assert member["spec"]["logit_scale"] == 5 and member["spec"]["lambda_w"] == 5e-4
        else:
            assert member["spec"]["lambda_w"] == 1e-3 and member["spec"]["logit_scale"] == 10

    for member_id in sweep["members"]:
        assert wait_for_status(client, member_id, {"succeeded", "failed"}, timeout=120)["status"] == "succeeded"
    done = client.get(f"/sweeps/{sweep['id']}").json()
    assert done["status_counts"]["succeeded"] == 8 and done["progress"] == 1.0
    by_filter = client.get("/experiments", params={"where": f"sweep = '{sweep['id']}'", "limit": 100}).json()
    assert sorted(item["id"] for item in by_filter["items"]) == sorted(sweep["members"])
    assert sweep["id"] in [item["id"] for item in client.get("/sweeps").json()["items"]]


def test_an_invalid_member_is_a_422_naming_it_and_nothing_is_stored(api_each_db):
    client = api_each_db.client
    experiments_before, sweeps_before = _count(client, "/experiments"), _count(client, "/sweeps")
    response = client.post("/sweeps", json={"base": {**BASE, "K": 3}, "grid": {"d": [4, 1, 8]}})
    assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["errors"][0]["field"] == "members[1].d"
    assert "member 1 ({'d': 1})" in problem["detail"] and "at least 2 when normalized" in problem["detail"]
    too_big = client.post("/sweeps", json={"base": {**BASE, "K": 3}, "grid": {"seed": list(range(1001))}})
    assert too_big.status_code == 422 and "NCLAB_MAX_SWEEP" in too_big.json()["detail"]
    assert _count(client, "/experiments") == experiments_before and _count(client, "/sweeps") == sweeps_before


def test_a_relabel_reaches_the_sweep_and_every_member_or_none(api_each_db):
    client = api_each_db.client
    sweep = client.post("/sweeps", json={"name": "lr", "tags": {"paper": "fig1", "draft": "yes"},
                                         "base": {**BASE, "K": 3}, "grid": {"seed": [0, 1, 2]}}).json()
    first, *others = sweep["members"]
    client.patch(f"/experiments/{first}", json={"name": "the odd one", "tags": {"mine": "1"}})

    relabeled = client.patch(f"/sweeps/{sweep['id']}", json={"name": "lr study", "tags": {"paper": "fig2", "draft": None}})
    assert relabeled.status_code == 200, relabeled.text
    assert (relabeled.json()["name"], relabeled.json()["tags"]) == ("lr study", {"paper": "fig2"})
    members = {i: client.get(f"/experiments/{i}").json() for i in sweep["members"]}
    assert members[first]["name"] == "the odd one" and members[first]["tags"] == {"paper": "fig2", "mine": "1"}
    assert all(members[i]["name"] == "lr study" and members[i]["tags"] == {"paper": "fig2"} for i in others)
    found = client.get("/experiments", params={"where": "tags.paper = 'fig2'", "limit": 100}).json()["items"]
    assert sorted(item["id"] for item in found) == sorted(sweep["members"])

    # One member past the tag limit refuses the whole change: the sweep and every member keep their labels.
    client.patch(f"/experiments/{first}", json={"tags": {f"t{i}": "x" for i in range(30)}})
    refused = client.patch(f"/sweeps/{sweep['id']}", json={"name": "no", "tags": {"a": "1", "b": "2"}})
    assert refused.status_code == 422 and refused.json()["errors"][0]["field"] == "tags"
    assert client.get(f"/sweeps/{sweep['id']}").json()["name"] == "lr study"
    assert [client.get(f"/experiments/{i}").json()["name"] for i in others] == ["lr study"] * len(others)
    assert client.patch("/sweeps/nope", json={"name": "x"}).status_code == 404


def test_cancel_reaches_every_member(production):
    client = production.client
    sweep = client.post("/sweeps", json={"base": ENDLESS, "grid": {"seed": [0, 1, 2]}}).json()
    wait_for_status(client, sweep["members"][0], {"running"}, timeout=60)
    canceled = client.post(f"/sweeps/{sweep['id']}/cancel")
    assert canceled.status_code == 200
    for member_id in sweep["members"]:
        final = wait_for_status(client, member_id, {"canceled", "succeeded", "failed"}, timeout=30)
        assert final["status"] == "canceled"
    assert client.get(f"/sweeps/{sweep['id']}").json()["status_counts"]["canceled"] == 3
    assert client.get("/sweeps/nope").status_code == 404


def test_a_base_may_hold_every_modes_fields_and_each_member_keeps_those_its_mode_uses():
    """One base, "the same budget three ways": the paper's settings for each mode in one file."""
    base = {"kind": "train", "dataset": "digits", "epochs": 3, "logit_scale": 3.0, "weight_decay": 1e-4,
            "weight_decay_scope": "classifier", "feature_decay": 1e-4, "feature_decay_reduction": "sum",
            "lr_schedule": "milestones", "lr_milestones": [2]}
    request = sweeps.SweepRequest(base=base, variants=[{"normalization": n} for n in ("normalized", "regularized",
                                                                                         "none")])
    normalized, regularized, plain = sweeps.members(request)
    assert (normalized["logit_scale"], normalized["weight_decay_scope"]) == (3.0, "classifier")
    assert (normalized["feature_decay"], normalized["feature_decay_reduction"]) == (5e-4, "mean")  # defaults
    assert (regularized["feature_decay"], regularized["feature_decay_reduction"]) == (1e-4, "sum")
    assert (regularized["logit_scale"], regularized["weight_decay"]) == (10.0, 1e-4)
    assert (plain["weight_decay"], plain["weight_decay_scope"], plain["logit_scale"]) == (5e-4, None, 10.0)
    assert all(member["lr_milestones"] == [2] for member in (normalized, regularized, plain))  # used by all three

    # Set by a variant, an unused field is the member's own mistake.
    request = sweeps.SweepRequest(base=base, variants=[{"normalization": "normalized", "feature_decay": 0.1}])
    with pytest.raises(sweeps.InvalidMember) as error:
        sweeps.members(request)
    assert error.value.field == "feature_decay" and "normalization 'regularized'" in error.value.message
