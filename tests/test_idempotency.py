"""Idempotency-Key on POST /experiments and POST /sweeps, on SQLite and on PostgreSQL (the API in-process)."""

import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, update

from service.models import IdempotencyKey, utcnow

SPEC = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2, "seed": 0}
SWEEP = {"name": "keyed", "base": SPEC, "grid": {"seed": [0, 1, 2]}}


def _count(client, path: str, where: str) -> int:
    return len(client.get(path, params={"where": where, "limit": 100}).json()["items"])


def test_a_retry_with_the_same_key_and_body_returns_the_first_experiment(api_each_db):
    client = api_each_db.client
    key = str(uuid.uuid4())
    name = f"once-{key}"
    first = client.post("/experiments", json={"spec": SPEC, "name": name}, headers={"Idempotency-Key": key})
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    # The same request written differently (key order, whitespace) is the same request.
    reordered = json.dumps({"name": name, "spec": dict(reversed(SPEC.items()))}, indent=3)
    again = client.post("/experiments", content=reordered,
                        headers={"Idempotency-Key": key, "Content-Type": "application/json"})
    assert again.status_code == 202, again.text
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert _count(client, "/experiments", f"name = '{name}'") == 1

    other = client.post("/experiments", json={"spec": {**SPEC, "seed": 1}, "name": name},
                        headers={"Idempotency-Key": key})
    assert other.status_code == 422 and other.json()["errors"][0]["field"] == "Idempotency-Key"
    assert "different request" in other.json()["detail"]
    assert _count(client, "/experiments", f"name = '{name}'") == 1
    # A key names one request on one route: reused for a sweep, it is refused too.
    assert client.post("/sweeps", json=SWEEP, headers={"Idempotency-Key": key}).status_code == 422
    # Without a key, the same body creates another experiment.
    assert client.post("/experiments", json={"spec": SPEC, "name": name}).json()["id"] != first.json()["id"]


def test_eight_concurrent_retries_with_one_key_create_one_sweep(api_each_db):
    client = api_each_db.client
    key = str(uuid.uuid4())
    # Big enough that the first transaction is still open when the others arrive.
    body = {**SWEEP, "name": f"concurrent-{key}", "grid": {"seed": list(range(200))}}
    ready = threading.Barrier(8)

    def post(_):
        ready.wait()  # the app serves each in a thread of its own: eight transactions at once
        return client.post("/sweeps", json=body, headers={"Idempotency-Key": key})

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert [r.status_code for r in responses] == [202] * 8, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    assert len({tuple(r.json()["members"]) for r in responses}) == 1 and len(responses[0].json()["members"]) == 200
    assert client.get(f"/sweeps/{responses[0].json()['id']}").json()["size"] == 200
    assert _count(client, "/experiments", f"name = '{body['name']}'") == 100  # a full page: limit 100
    total = client.get("/experiments/aggregate", params={"where": f"name = '{body['name']}'"}).json()
    assert total["items"][0]["count"] == 200
    client.post(f"/sweeps/{responses[0].json()['id']}/cancel").raise_for_status()


def test_a_key_expires_after_24_hours(api_each_db):
    client, database_url = api_each_db.client, api_each_db.database_url
    key = str(uuid.uuid4())
    first = client.post("/experiments", json=SPEC, headers={"Idempotency-Key": key}).json()
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(update(IdempotencyKey).where(IdempotencyKey.key == key)
                           .values(created_at=utcnow() - timedelta(hours=24, minutes=1)))
    engine.dispose()
    later = client.post("/experiments", json=SPEC, headers={"Idempotency-Key": key})
    assert later.status_code == 202 and later.json()["id"] != first["id"]
    assert client.post("/experiments", json=SPEC, headers={"Idempotency-Key": key}).json()["id"] == later.json()["id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "caf\u00e9"])
def test_a_malformed_key_is_a_422_naming_the_header(api_each_db, key):
    client = api_each_db.client
    response = client.post("/experiments", json=SPEC, headers={"Idempotency-Key": key.encode("utf-8")})
    assert response.status_code == 422, response.text
    assert "Idempotency-Key" in response.json()["detail"]
