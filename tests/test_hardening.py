"""Hostile input and outages get problems, never a bare 500 (issue 12's first findings)."""

import ctypes
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import typing

import httpx
import jsonschema_rs
import psycopg
import pydantic
import pytest

from tests.conftest import fresh_pg_database
from service.lifetime import children
from service.schemas import TrainSpec, UFMSpec
from tests.support import ENDLESS, eventually, free_port, queued_messages, redis_server, wait_ready, wait_for_status

PROBLEM_JSON = "application/problem+json"
SPEC = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}


def _problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    return response.json()


@pytest.mark.parametrize(("body", "field"), [
    ('{"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2, "tol": Infinity}', "tol"),
    ('{"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2, "logit_scale": NaN}', "logit_scale"),
    ('{"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2, "normalization": "regularized", "lambda_w": 1e-300}',
     "lambda_w"),
    ('{"kind": "train", "dataset": "digits", "lr": -Infinity}', "lr"),
])
def test_non_finite_and_underflowing_numbers_are_422_naming_the_field(api_each_db, body, field):
    response = api_each_db.client.post("/experiments", content=body, headers={"content-type": "application/json"})
    problem = _problem(response, 422)
    assert [error["field"] for error in problem["errors"]] == [field]


@pytest.mark.parametrize(("method", "url", "field"), [
    ("GET", "/experiments/%00/metrics", "path"),
    ("POST", "/experiments/%00/cancel", "path"),
    ("GET", "/experiments?dataset=%00", "dataset"),
    ("GET", "/experiments?where=name%20%3D%20%27%00%27", "where"),
])
def test_nul_characters_are_422_not_a_database_error(api_each_db, method, url, field):
    problem = _problem(api_each_db.client.request(method, url), 422)
    assert problem["errors"][0]["field"] == field


def test_out_of_range_integers_are_422_in_parameters_and_answered_in_filters(api_each_db):
    for name in ("K", "d"):
        problem = _problem(api_each_db.client.get("/experiments", params={name: 2**31}), 422)
        assert problem["errors"][0]["field"] == name
    for where in ("spec.d = 2147483648", "spec.K in (1, 3000000000)", "spec.seed > 1e300", "result.nc1 < -1e308"):
        response = api_each_db.client.get("/experiments", params={"where": where})
        assert response.status_code == 200 and response.json()["items"] == [], where


def test_a_body_over_the_cap_is_413(api_each_db):
    huge = '{"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2, "pad": "' + "x" * (1 << 20) + '"}'
    _problem(api_each_db.client.post("/experiments", content=huge, headers={"content-type": "application/json"}), 413)

    def chunks():  # no Content-Length: the cap applies as the body arrives
        yield huge.encode()

    response = api_each_db.client.post("/experiments", content=chunks(), headers={"content-type": "application/json"})
    _problem(response, 413)


def test_an_unreachable_database_is_a_503_with_retry_after(pg_admin, processes):
    with fresh_pg_database(pg_admin) as database_url:
        processes.env["NCLAB_DATABASE_URL"] = database_url
        port = free_port()
        api = processes.start_api(port)
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url, api)
        with httpx.Client(base_url=base_url) as client:
            assert client.get("/experiments").status_code == 200
            name = database_url.rsplit("/", 1)[1]
            with psycopg.connect(pg_admin, autocommit=True) as admin:  # the database goes away under the API
                admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            for request in (client.get("/experiments"), client.post("/experiments", json=SPEC),
                            client.get("/experiments/aggregate", params={"metrics": "nc1"})):
                problem = _problem(request, 503)
                assert request.headers["retry-after"] == "5" and "database" in problem["detail"]


def test_api_keys_need_the_bearer_scheme_and_guard_the_docs_too(processes):
    processes.env["NCLAB_API_KEYS"] = "alice:alice-key"
    port = free_port()
    api = processes.start_api(port)  # no --host: 127.0.0.1
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, api)
    listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    with httpx.Client(base_url=base_url) as client:
        assert client.get("/experiments", headers={"Authorization": "alice-key"}).status_code == 401
        assert client.get("/experiments", headers={"Authorization": "bearer alice-key"}).status_code == 200
        assert client.get("/experiments", headers={"Authorization": "BEARER alice-key"}).status_code == 200
        for path in ("/openapi.json", "/docs", "/redoc", "/metrics"):
            _problem(client.get(path), 401)
            assert client.get(path, headers={"Authorization": "Bearer alice-key"}).status_code == 200
        schema = client.get("/openapi.json", headers={"X-API-Key": "alice-key"}).json()
        assert set(schema["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader", "APIKeyCookie"}
        # The dashboard's cookie is a key like the others.
        assert httpx.get(f"{base_url}/experiments", cookies={"nclab_api_key": "alice-key"}).status_code == 200
        assert httpx.get(f"{base_url}/experiments", cookies={"nclab_api_key": "bob-key"}).status_code == 401
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code in (200, 503)



def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


PR_SET_CHILD_SUBREAPER = 36


@contextmanager
def _adopting_orphans():
    """This process as a subreaper (Linux): the orphans of its descendants become its children,
    so that it can wait for them and read how they ended."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _endings(pids: set[int]) -> dict[int, int]:
    """How each of these adopted processes ended (os.waitstatus_to_exitcode: -N for signal N), once all have."""
    ended: dict[int, int] = {}

    def all_ended() -> bool:
        for pid in pids - set(ended):
            found, status = os.waitpid(pid, os.WNOHANG)
            if found:
                ended[pid] = os.waitstatus_to_exitcode(status)
        return len(ended) == len(pids)

    # Without the parent-death signal nothing would end them: this waits for an event, not a speed.
    eventually(all_ended, timeout=60, message=lambda: f"{_alive(pids - set(ended))} outlived their parent")
    return ended


def test_api_workers_end_when_their_supervisor_is_killed(processes):
    port = free_port()
    api = processes.start_api(port, workers=2)
    wait_ready(f"http://127.0.0.1:{port}", api)

    def serving() -> set[int]:
        """The workers that serve (multiprocessing's spawned processes), not its resource tracker."""
        return {pid for pid in children(api.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}

    workers = eventually(lambda: found if len(found := serving()) == 2 else None, timeout=60, ignoring=(OSError,),
                         message=lambda: f"{api.pid} has children {children(api.pid)}, wanted 2 workers")
    children_ = children(api.pid)
    with _adopting_orphans():
        os.kill(api.pid, signal.SIGKILL)  # the supervisor alone, not its process group
        api.wait()
        endings = _endings(children_)
    # Each worker ended by the SIGTERM the kernel sent it as its parent died (PR_SET_PDEATHSIG;
    # uvicorn re-raises the signal that stopped it): nothing else signals them.
    assert {pid: endings[pid] for pid in workers} == {pid: -signal.SIGTERM for pid in workers}


def test_a_pool_process_ends_at_once_when_its_worker_is_killed(own_production):
    """With a job running: a pool process busy with one reads none of its pipes, so only the
    kernel can end it at once (PR_SET_PDEATHSIG, SIGKILL), not its finding them closed. (An
    idle one could see its pipes close and exit 0 before the signal comes: the kernel
    closes a dying process's files before it signals the children.)"""
    client, worker = own_production.client, own_production.worker
    endless = client.post("/experiments", json=ENDLESS).json()["id"]
    wait_for_status(client, endless, {"running"}, timeout=60)
    pool = children(worker.pid)  # concurrency 1: the pool process running the job
    with _adopting_orphans():
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        endings = _endings(pool)
    assert endings == {pid: -signal.SIGKILL for pid in pool}


def test_help_writes_no_files(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCLAB_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    for args in (["--help"], ["serve", "--help"], ["data", "--help"]):
        result = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_train_jobs_over_the_caps_are_422_saying_the_cap(api_each_db):
    client = api_each_db.client
    wide_features = {"kind": "train", "dataset": "digits", "d": 2_000_000_000}
    problem = _problem(client.post("/experiments", json=wide_features), 422)
    assert [error["field"] for error in problem["errors"]] == ["d"] and "NCLAB_MAX_TRAIN_WIDTH" in problem["detail"]
    huge = {"kind": "train", "dataset": "gaussian", "K": 10, "gaussian_dim": 100_000,
            "gaussian_train_per_class": 10**7}
    problem = _problem(client.post("/experiments", json=huge), 422)
    assert "NCLAB_MAX_TRAIN_SAMPLES" in problem["detail"]
    wide = {"kind": "train", "dataset": "gaussian", "K": 10, "gaussian_dim": 100_000, "mlp_width": 16384}
    problem = _problem(client.post("/experiments", json=wide), 422)
    assert "by its estimate" in problem["detail"] and "NCLAB_MAX_JOB_BYTES" in problem["detail"]


def test_a_redis_restart_that_loses_the_queue_costs_seconds_not_minutes(pg_database, processes):
    """The queue's messages die with a Redis that keeps nothing; the worker's reconnect has them re-sent."""
    port = free_port()
    broker = redis_server(port)
    try:
        # The default re-send delay (300 s): recovery must not wait for it.
        processes.env.update(NCLAB_DATABASE_URL=pg_database, NCLAB_BROKER_URL=f"redis://127.0.0.1:{port}/0",
                             NCLAB_RESEND_AFTER="300", NCLAB_RECONCILE_INTERVAL="2")
        api_port = free_port()
        api = processes.start_api(api_port)
        processes.start("worker", name="worker")
        base_url = f"http://127.0.0.1:{api_port}"
        wait_ready(base_url, api)
        with httpx.Client(base_url=base_url, timeout=30) as client:
            busy = client.post("/experiments", json=ENDLESS).json()
            wait_for_status(client, busy["id"], {"running"})
            waiting = [client.post("/experiments", json={**SPEC, "seed": seed}).json()["id"] for seed in range(3)]
            broker_url = f"redis://127.0.0.1:{port}/0"
            # Two wait in Redis behind the busy worker: its one slot's places in the cpu queue (the fair
            # scheduler's, docs/lifecycle.md); the third waits in the database.
            eventually(lambda: len(queued_messages(broker_url)) == 2,
                       message=lambda: f"queued: {queued_messages(broker_url)}")

            broker.kill()
            broker.wait()
            broker = redis_server(port)  # empty: the two messages are gone
            client.post(f"/experiments/{busy['id']}/cancel")
            # Bounded well below the reconciler's own re-send (NCLAB_RESEND_AFTER, 300 s); and the
            # worker says it was its reconnect that had them sent again.
            for experiment_id in waiting:
                assert wait_for_status(client, experiment_id, {"succeeded", "failed"}, timeout=120)["status"] == \
                    "succeeded"
            log = (processes.log_dir / "worker.log").read_text()
            assert "connected to the broker: 2 queued jobs will be sent again" in log
    finally:
        broker.kill()
        broker.wait()


def test_the_openapi_document_declares_every_status_and_media_type():
    from service.api.app import create_app

    document = create_app().openapi()
    paths, media = document["paths"], {}
    rule = {"if": {"properties": {"normalization": {"const": "normalized"}}},
            "then": {"properties": {"d": {"minimum": 2}}}}
    assert rule in document["components"]["schemas"]["UFMSpec"]["allOf"]  # the cross-field rule is declared
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            media.update({(path, method, status): set(body.get("content", {})) for status, body in responses.items()})
            if path.startswith("/experiments"):
                for status in ("401", "413", "422", "503"):
                    assert media[path, method, status] == {PROBLEM_JSON}, (path, method, status)
            if "{experiment_id}" in path:
                assert media[path, method, "404"] == {PROBLEM_JSON}
    assert media["/experiments/{experiment_id}/cancel", "post", "409"] == {PROBLEM_JSON}
    with_body = (("/experiments", "post"), ("/experiments/search", "post"), ("/experiments/{experiment_id}", "patch"))
    for path, method in with_body:
        assert media[path, method, "400"] == {PROBLEM_JSON}  # a body that cannot be read
    assert "202" in paths["/experiments/{experiment_id}/cancel"]["post"]["responses"]
    assert media["/experiments", "post", "202"] == {"application/json"}
    csv_paths = ("/experiments", "/experiments/aggregate", "/experiments/curves",
                 "/experiments/{experiment_id}/metrics")
    for path in csv_paths:
        assert "text/csv" in media[path, "get", "200"]
    for path in ("/experiments/curves.png", "/experiments/{experiment_id}/metrics.png"):
        assert media[path, "get", "200"] == {"image/png"}
    assert media["/readyz", "get", "503"] == {PROBLEM_JSON}


@pytest.mark.parametrize("model", [UFMSpec, TrainSpec])
def test_the_json_schema_states_which_fields_each_setting_uses(model):
    """For every field an owner setting governs, the JSON Schema accepts exactly what the API does."""
    base = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2} if model is UFMSpec else \
        {"kind": "train", "dataset": "digits", "K": 3}
    validator = jsonschema_rs.validator_for(model.model_json_schema())
    checked = 0
    for field, (owner, _allowed) in model.FIELD_OWNERS.items():
        # Data sets that need no files, so that only the rule under test can refuse a spec.
        choices = [c for c in typing.get_args(model.model_fields[owner].annotation)
                   if owner != "dataset" or c in ("digits", "gaussian")]
        default = model.model_fields[field].default
        other = default * 2 + 1 if isinstance(default, int | float) else default
        for owner_value in (None, *choices):
            for value in (None, default, other):
                spec = dict(base)
                if owner_value is not None:
                    spec[owner] = owner_value
                if value is not None:
                    spec[field] = value
                try:
                    model.model_validate(spec)
                    accepted = True
                except pydantic.ValidationError:
                    accepted = False
                assert validator.is_valid(spec) == accepted, spec
                checked += 1
    assert checked >= 27
