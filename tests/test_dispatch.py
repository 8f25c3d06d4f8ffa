"""New jobs' messages go out after the response, in rounds, and a job whose send failed is sent later."""

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import redis

from service.dispatch import Dispatcher
from service.queue import RUN_EXPERIMENT
from tests.conftest import fresh_redis_broker
from tests.support import free_port, redis_server, wait_ready

SPEC = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}


def test_a_round_takes_what_arrived_meanwhile_and_close_sends_the_rest():
    rounds: list[list[str]] = []
    dispatcher = Dispatcher(rounds.append)
    ids = [f"job-{i}" for i in range(200)]
    for experiment_id in ids:
        dispatcher.send(experiment_id)
    dispatcher.close()
    assert [i for batch in rounds for i in batch] == ids  # each once, in order
    assert len(rounds) <= 3  # not one round per id: they arrived within one linger

    dispatcher.send("after-close")  # a closed dispatcher starts again
    dispatcher.close()
    assert rounds[-1] == ["after-close"]


def test_a_failed_round_is_logged_and_later_rounds_still_go_out(caplog):
    sent: list[list[str]] = []
    first = threading.Event()

    def flaky(ids):
        if not first.is_set():
            first.set()
            raise ConnectionError("broker down")
        sent.append(ids)

    dispatcher = Dispatcher(flaky)
    dispatcher.send("lost")
    assert first.wait(5)
    time.sleep(0.05)
    dispatcher.send("next")
    dispatcher.close()
    assert sent == [["next"]]
    assert "the reconciler will send them" in caplog.text


def _queued_messages(broker_url: str) -> list[tuple[str, str]]:
    """(task name, experiment id) of each message waiting in Celery's default queue."""
    messages = []
    for raw in redis.Redis.from_url(broker_url).lrange("celery", 0, -1):
        envelope = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        messages.append((envelope["headers"]["task"], args[0]))
    return messages


def _sends(database_url: str, ids: list[str]) -> list[tuple]:
    with psycopg.connect(database_url.replace("+psycopg", "")) as connection:
        return connection.execute("SELECT id, sent_at, send_count FROM experiments WHERE id = ANY(%s)",
                                  (ids,)).fetchall()


def _wait_until_sent(database_url: str, ids: list[str], timeout: float) -> list[tuple]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _sends(database_url, ids)
        if len(rows) == len(ids) and all(sent_at is not None for _id, sent_at, _count in rows):
            return rows
        assert time.monotonic() < deadline, f"unsent after {timeout} s: {rows}"
        time.sleep(0.05)


def test_concurrent_submits_are_each_sent_once_in_shared_rounds(pg_database, processes):
    """No worker: the messages stay in Redis, where the test reads them."""
    broker = fresh_redis_broker()
    processes.env.update(NCLAB_DATABASE_URL=pg_database, NCLAB_BROKER_URL=broker)
    port = free_port()
    api = processes.start("api", "--port", str(port), name="api")
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, api)

    with httpx.Client(base_url=base_url, timeout=30) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda seed: client.post("/experiments", json={**SPEC, "seed": seed}), range(60)))
    assert all(answer.status_code == 202 for answer in answers)
    ids = [answer.json()["id"] for answer in answers]

    rows = _wait_until_sent(pg_database, ids, timeout=10)
    assert all(count == 1 for _id, _sent_at, count in rows)
    # A round records its sends in one UPDATE, with one time: fewer times than jobs.
    assert len({sent_at for _id, sent_at, _count in rows}) < len(ids)
    messages = _queued_messages(broker)
    assert sorted(messages) == sorted((RUN_EXPERIMENT, experiment_id) for experiment_id in ids)


def test_a_submit_while_the_broker_is_down_is_answered_at_once_and_sent_when_it_returns(pg_database, processes):
    broker_port = free_port()
    broker_url = f"redis://127.0.0.1:{broker_port}/0"
    processes.env.update(NCLAB_DATABASE_URL=pg_database, NCLAB_BROKER_URL=broker_url)
    port = free_port()
    processes.start("api", "--port", str(port), name="api")
    base_url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base_url, timeout=30) as client:
        deadline = time.monotonic() + 60
        while True:  # /readyz says 503 while the broker is down: wait for the process itself
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)

        started = time.monotonic()
        answer = client.post("/experiments", json=SPEC)
        assert answer.status_code == 202 and time.monotonic() - started < 1.0  # the send is not awaited
        experiment_id = answer.json()["id"]
        time.sleep(1.0)
        [(_id, _sent_at, send_count)] = _sends(pg_database, [experiment_id])
        assert send_count == 0  # stored, never sent: the reconciler's to send

        broker = redis_server(broker_port)
        try:
            deadline = time.monotonic() + 20
            while _sends(pg_database, [experiment_id])[0][2] == 0:
                assert time.monotonic() < deadline, "not sent 20 s after the broker came back"
                time.sleep(0.1)
            # The dispatcher's retry and the reconciler may both get through: a second message
            # is harmless (a job is claimed once), a missing one is not.
            assert set(_queued_messages(broker_url)) == {(RUN_EXPERIMENT, experiment_id)}
        finally:
            broker.kill()
            broker.wait()
