"""Schemathesis against the running API: no 5xx, and only status codes and media types the
OpenAPI document declares, for inputs generated from that same document.

The API runs on PostgreSQL and Redis without a worker: generated specs are stored and
queued, never run. Examples are bounded per operation so the run takes seconds.
"""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from tests.conftest import fresh_pg_database, fresh_redis_broker, make_processes, running
from tests.support import free_port, wait_ready

KEY = "fuzz-key"


@pytest.fixture(scope="module")
def api_schema(pg_admin, tmp_path_factory):
    with (
        fresh_pg_database(pg_admin) as database_url,
        running(make_processes(tmp_path_factory.mktemp("fuzz"))) as processes,
    ):
        processes.env.update(NCLAB_DATABASE_URL=database_url, NCLAB_BROKER_URL=fresh_redis_broker(),
                             NCLAB_API_KEYS=f"fuzzer:{KEY}")
        port = free_port()
        api = processes.start("api", "--port", str(port), name="api")
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url, api)
        # A few experiments, so that reads by id can find one.
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}) as client:
            for seed in range(3):
                client.post("/experiments", json={"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2, "seed": seed})
        document = httpx.get(f"{base_url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
        schema = schemathesis.openapi.from_dict(without_cross_field_rules(document))
        schema.location = f"{base_url}/openapi.json"  # requests go to this server
        yield schema


def without_cross_field_rules(document: dict) -> dict:
    """The document with the specs' if/then rules (which fields each setting uses) left out.

    The generator expands every rule into its branches, and their product over a train
    spec's eight rules is past what it takes. Without them it also sends specs that break
    a rule: the API's 422 for those is a documented answer, and test_hardening checks the
    rules themselves against the API.
    """
    for spec in ("UFMSpec", "TrainSpec"):
        document["components"]["schemas"][spec].pop("allOf", None)
    return document


def test_no_server_error_and_nothing_undocumented(api_schema):
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:

        calls = []

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def conforms(case):
            calls.append(1)
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=checks)

        conforms()
        assert calls, f"no example was generated for {operation.label}"
