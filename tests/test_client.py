"""service.client against real servers: embedded, and PostgreSQL + Redis + a worker."""

import statistics
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.client import Client, Conflict, InvalidRequest, NotFound, Unavailable, WaitTimeout, to_pandas
from tests.support import ENDLESS, free_port

UFM = {"kind": "ufm", "K": 4, "d": 6, "n_per_class": 3, "normalization": "normalized", "logit_scale": 10}


@pytest.fixture
def client(stack):
    with Client(stack.base_url, timeout=30) as nclab:
        yield nclab


def test_submit_and_wait_follow_a_job_to_succeeded_with_its_closed_form(client):
    created = client.submit(UFM, name="client", tags={"t": "1"})
    assert created["status"] == "queued" and created["spec"]["seed"] == 0
    seen = []
    done = client.wait(created["id"], timeout=120, on_progress=lambda states: seen.append(states[0]["status"]))
    assert done["status"] == "succeeded" and seen[-1] == "succeeded"
    assert done["name"] == "client" and done["tags"] == {"t": "1"}
    # The normalized UFM optimum (docs/closed-forms.md): L* = ln(1 + (K-1) exp(-s K/(K-1))).
    assert done["result"]["optimality_gap"] < 1e-8
    history = client.history(created["id"])
    assert [row["step"] for row in history] == sorted(row["step"] for row in history) and len(history) > 2
    assert history[-1]["loss"] == pytest.approx(done["result"]["loss"], rel=1e-9)
    tail = client.history(created["id"], after=history[-2]["step"])
    assert tail == history[-1:]
    png = client.history_png(created["id"], "nc1,loss")
    assert png.startswith(b"\x89PNG")
    assert client.history_csv(created["id"]).splitlines()[0].startswith("step,")


def test_wait_follows_a_job_to_canceled_and_many_ids_in_one_loop(client):
    endless = client.submit(ENDLESS)
    quick = [client.submit({**UFM, "seed": seed}) for seed in range(3)]
    with pytest.raises(WaitTimeout) as timed_out:
        client.wait(endless["id"], timeout=0.5)
    assert timed_out.value.last[0]["status"] in ("queued", "running")
    client.cancel(endless["id"])
    states = client.wait([q["id"] for q in quick] + [endless["id"]], timeout=120)
    assert [s["id"] for s in states] == [q["id"] for q in quick] + [endless["id"]]
    assert [s["status"] for s in states] == ["succeeded"] * 3 + ["canceled"]
    with pytest.raises(Conflict) as finished:
        client.cancel(endless["id"])
    assert "already canceled" in finished.value.detail


def test_errors_are_typed_and_carry_the_problem(client):
    with pytest.raises(InvalidRequest) as invalid:
        client.submit({**UFM, "K": 1})
    assert invalid.value.status == 422 and invalid.value.errors[0]["field"] == "spec.K"
    with pytest.raises(NotFound):
        client.get(str(uuid.uuid4()))
    with pytest.raises(NotFound):
        client.wait([str(uuid.uuid4()), str(uuid.uuid4())])
    with pytest.raises(InvalidRequest) as bad_filter:
        list(client.search(where="spec.nope = 1"))
    assert bad_filter.value.errors[0]["field"] == "spec.nope"


def test_sweep_search_aggregate_and_curves_agree_with_the_members(client):
    tag = uuid.uuid4().hex[:8]
    sweep = client.sweep(base={"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}, name="client-sweep",
                         tags={"run": tag},
                         variants=[{"normalization": "normalized", "logit_scale": 4},
                                   {"normalization": "regularized", "lambda_w": 1e-3}],
                         grid={"seed": [0, 1, 2]})
    assert sweep["size"] == 6
    done = client.wait_sweep(sweep["id"], timeout=120)
    assert done["status_counts"]["succeeded"] == 6 and done["progress"] == 1.0

    where = f"tags.run = '{tag}'"
    found = list(client.search(where=where, order_by="spec.normalization,spec.seed", page_size=4))
    assert len(found) == 6 and sorted(e["id"] for e in found) == sorted(sweep["members"])
    assert [(e["spec"]["normalization"], e["spec"]["seed"]) for e in found] == [
        (mode, seed) for mode in ("normalized", "regularized") for seed in (0, 1, 2)]

    groups = client.aggregate(where=where, group_by="spec.normalization", metrics="loss,nc1")
    assert [g["group"]["spec.normalization"] for g in groups] == ["normalized", "regularized"]
    for group in groups:
        mode = group["group"]["spec.normalization"]
        losses = [e["result"]["loss"] for e in found if e["spec"]["normalization"] == mode]
        assert group["count"] == 3
        assert group["metrics"]["loss"]["mean"] == pytest.approx(statistics.mean(losses), rel=1e-9)
        assert group["metrics"]["loss"]["std"] == pytest.approx(statistics.stdev(losses), rel=1e-6, abs=1e-15)
    assert client.aggregate_csv(where=where, group_by="spec.normalization", metrics="loss").count("\n") == 3

    curves = client.curves(where=where, group_by="spec.normalization", metric="loss")
    assert [c["group"]["spec.normalization"] for c in curves] == ["normalized", "regularized"]
    start = curves[0]["points"][0]
    initial = [client.history(e["id"])[0] for e in found if e["spec"]["normalization"] == "normalized"]
    assert start["step"] == 0 and start["n"] == 3
    assert start["mean"] == pytest.approx(statistics.mean(row["loss"] for row in initial), rel=1e-9)
    assert client.curves_png(where=where, group_by="spec.normalization", metric="loss").startswith(b"\x89PNG")
    assert sweep["id"] in [s["id"] for s in client.sweeps()]

    canceled = client.sweep(base=ENDLESS, grid={"seed": [0, 1]})
    counts = client.cancel_sweep(canceled["id"])["status_counts"]
    assert counts["queued"] + counts["running"] + counts["canceled"] == 2
    assert client.wait_sweep(canceled["id"], timeout=60)["status_counts"]["canceled"] == 2


def test_a_retried_submit_with_one_key_is_one_experiment(client):
    key = str(uuid.uuid4())
    first = client.submit(UFM, name=key, idempotency_key=key)
    assert client.submit(UFM, name=key, idempotency_key=key)["id"] == first["id"]
    assert len(list(client.search(where=f"name = '{key}'"))) == 1


def test_to_pandas_needs_pandas():
    rows = [{"id": "a", "spec": {"K": 3}}]
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install pandas"):
            to_pandas(rows)
    else:
        frame = to_pandas(rows)
        assert list(frame.columns) == ["id", "spec.K"] and frame["spec.K"].tolist() == [3]


class FlakyServer:
    """A real HTTP server that answers 503 (or drops the connection) a given number of times, then 200."""

    def __init__(self, failures: int, drop: bool = False):
        self.failures, self.requests = failures, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                server.requests.append((self.command, self.headers.get("Idempotency-Key")))
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                if len(server.requests) <= server.failures:
                    if drop:
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Type", "application/problem+json")
                    body = b'{"title": "Service Unavailable", "status": 503, "detail": "database unavailable"}'
                else:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    body = b'{"id": "x", "status": "queued"}'
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.mark.parametrize("drop", [False, True], ids=["503", "dropped connection"])
def test_gets_and_keyed_posts_retry_and_plain_posts_do_not(drop):
    server = FlakyServer(failures=2, drop=drop)
    try:
        with Client(server.url, retries=3) as client:
            assert client.get("x")["id"] == "x" and len(server.requests) == 3
            server.requests.clear()
            client.submit(UFM)  # the client gives every submit a key, so it may retry
            keys = [key for _method, key in server.requests]
            assert len(keys) == 3 and keys[0] and len(set(keys)) == 1
            server.requests.clear()
            with pytest.raises(Unavailable):
                client.cancel("x")  # a POST without a key: one try
            assert len(server.requests) == 1
        server.requests.clear()
        with Client(server.url, retries=1) as client, pytest.raises(Unavailable) as gave_up:
            client.get("x")
        assert len(server.requests) == 2
        if not drop:
            assert gave_up.value.status == 503 and gave_up.value.problem["detail"] == "database unavailable"
    finally:
        server.close()


def test_the_url_and_key_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("NCLAB_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("NCLAB_API_KEY", "secret")
    with Client() as client:
        assert client.base_url == "http://127.0.0.1:1"
        assert client._http.headers["authorization"] == "Bearer secret"
