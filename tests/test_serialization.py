"""The fast read paths (plain rows written by orjson, history JSON spliced from the database's text)
answer exactly what the response models would write from the ORM objects; ETags and 304s.

Run through the API in-process, on SQLite and on PostgreSQL; the jobs run here, by the
worker's task body, or by its steps (claim, history rows) one at a time.
"""

import math

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from service import jobs
from service.db import get_sessionmaker
from service.models import Experiment, MetricRow
from service.schemas import ExperimentOut
from tests.support import ENDLESS

UFM = {"kind": "ufm", "K": 4, "d": 6, "n_per_class": 3, "normalization": "normalized", "logit_scale": 10,
       "tol": 1e-12}


def same(left, right) -> bool:
    """Equal as JSON values, floats to the last bit (1e-10 and 0.0000000001 are one number)."""
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(same(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(same(a, b) for a, b in zip(left, right))
    if isinstance(left, float) or isinstance(right, float):
        return isinstance(left, int | float) and isinstance(right, int | float) and (
            left == right or (math.isnan(left) and math.isnan(right)))
    return left == right


def reference(database_url: str, experiment_id: str) -> tuple[dict, list[dict]]:
    """What the ORM and the pydantic response models make of the experiment and its history."""
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            experiment = ExperimentOut.model_validate(session.get(Experiment, experiment_id)).model_dump(mode="json")
            rows = session.scalars(select(MetricRow).where(MetricRow.experiment_id == experiment_id)
                                   .order_by(MetricRow.step)).all()
            return experiment, [{"step": row.step, **row.values} for row in rows]
    finally:
        engine.dispose()


@pytest.fixture
def finished(api_each_db) -> str:
    client = api_each_db.client
    created = client.post("/experiments", json={"spec": UFM, "name": "quote ' \" \\ and ü ✓",
                                                "tags": {"paper": "fig<1>", "note": "a\nb"}}).json()
    assert api_each_db.run(created["id"])["status"] == "succeeded"
    return created["id"]


def test_status_history_submit_and_pages_write_what_the_models_would(api_each_db, finished):
    client = api_each_db.client
    experiment, history = reference(api_each_db.database_url, finished)
    assert experiment["result"]["optimality_gap"] < 1e-8 and len(history) > 3

    read = client.get(f"/experiments/{finished}")
    assert read.headers["content-type"] == "application/json"
    assert same(read.json(), experiment), (read.json(), experiment)
    assert same(client.get(f"/experiments/{finished}/metrics").json(), {"items": history})
    tail = client.get(f"/experiments/{finished}/metrics", params={"after": history[-3]["step"]}).json()
    assert same(tail, {"items": history[-2:]})
    assert client.get(f"/experiments/{finished}/metrics", params={"after": history[-1]["step"]}).json() == \
        {"items": []}
    page = client.get("/experiments", params={"where": f"id = '{finished}'"}).json()
    assert same(page["items"], [experiment])

    submitted = client.post("/experiments", json={"spec": ENDLESS, "name": "submitted"}).json()
    client.post(f"/experiments/{submitted['id']}/cancel")
    submitted_reference, _ = reference(api_each_db.database_url, submitted["id"])
    assert submitted.keys() == submitted_reference.keys() and submitted["status"] == "queued"
    for key in ("id", "owner", "name", "tags", "sweep", "spec", "created_at", "result", "error"):
        assert same(submitted[key], submitted_reference[key]), key
    missing = client.get("/experiments/00000000-0000-0000-0000-000000000000/metrics")
    assert missing.status_code == 404 and "no experiment with id" in missing.json()["detail"]


def test_etags_give_304s_until_the_experiment_changes(api_each_db, finished):
    client = api_each_db.client
    first = client.get(f"/experiments/{finished}")
    etag = first.headers["etag"]
    assert first.headers["cache-control"] == "no-cache" and etag.startswith('"')
    again = client.get(f"/experiments/{finished}", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert client.get(f"/experiments/{finished}", headers={"If-None-Match": f'"x", W/{etag}'}).status_code == 304
    assert client.get(f"/experiments/{finished}", headers={"If-None-Match": '"other"'}).status_code == 200

    client.patch(f"/experiments/{finished}", json={"name": "renamed"}).raise_for_status()
    changed = client.get(f"/experiments/{finished}", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.json()["name"] == "renamed" and changed.headers["etag"] != etag

    # A finished experiment's history does not change again: a client may keep it.
    history = client.get(f"/experiments/{finished}/metrics")
    assert history.headers["cache-control"] == "private, max-age=31536000, immutable"
    assert client.get(f"/experiments/{finished}/metrics",
                      headers={"If-None-Match": history.headers["etag"]}).status_code == 304


def test_a_running_experiments_history_must_be_revalidated_and_its_etag_moves(api_each_db):
    client = api_each_db.client
    running = client.post("/experiments", json=ENDLESS).json()["id"]
    with get_sessionmaker()() as session:  # a worker's first steps: claim, one epoch's row
        attempt = jobs.claim(session, running, worker="test").attempts
        jobs.record_metrics(session, running, attempt, 1, {"loss": 2.0, "nc1": 1.0})
    try:
        assert client.get(f"/experiments/{running}").json()["status"] == "running"
        first = client.get(f"/experiments/{running}/metrics")
        assert first.headers["cache-control"] == "no-cache"
        assert client.get(f"/experiments/{running}/metrics",
                          headers={"If-None-Match": first.headers["etag"]}).status_code == 304
        with get_sessionmaker()() as session:  # the next epoch's
            jobs.record_metrics(session, running, attempt, 2, {"loss": 1.5, "nc1": 0.5})
        later = client.get(f"/experiments/{running}/metrics", headers={"If-None-Match": first.headers["etag"]})
        assert later.status_code == 200 and len(later.json()["items"]) > len(first.json()["items"])
    finally:
        client.post(f"/experiments/{running}/cancel")
