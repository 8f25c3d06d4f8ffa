"""Schemathesis against the API: no 5xx, and only status codes and media types the
OpenAPI document declares, for inputs generated from that same document.

The API runs in-process (schemathesis calls the ASGI app), on SQLite and on PostgreSQL,
with no worker: generated specs are stored and queued, never run. Examples are bounded
per operation so the run takes seconds.
"""

import contextlib

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from tests.conftest import fresh_pg_database, in_process_api

KEY = "fuzz-key"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api_schema(request, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("fuzz")
    with contextlib.ExitStack() as stack:
        database_url = None
        if request.param == "postgresql":
            database_url = stack.enter_context(fresh_pg_database(request.getfixturevalue("pg_admin")))
        api = stack.enter_context(in_process_api(data_dir, database_url, NCLAB_API_KEYS=f"fuzzer:{KEY}"))
        headers = {"Authorization": f"Bearer {KEY}"}
        # A few experiments, so that reads by id can find one.
        for seed in range(3):
            api.client.post("/experiments", json={"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2, "seed": seed},
                            headers=headers).raise_for_status()
        document = api.client.get("/openapi.json", headers=headers).json()
        schema = schemathesis.openapi.from_dict(without_cross_field_rules(document))
        schema.app = api.client.app  # requests go to the app, in this process
        try:
            yield schema
        finally:
            shutdown_lifespans()  # schemathesis keeps the app's lifespan running until asked


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
