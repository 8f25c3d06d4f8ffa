"""New jobs' messages go out after the response, in rounds, and a job whose send failed is sent later."""

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg

from service.dispatch import Dispatcher
from service.queue import RUN_EXPERIMENT
from tests.conftest import fresh_redis_broker
from tests.support import eventually, free_port, queued_messages, redis_server, wait_ready

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
    assert first.wait(5)  # the first round is under way: "next" comes in a later one
    dispatcher.send("next")
    dispatcher.close()
    assert sent == [["next"]]
    assert "the reconciler will send them" in caplog.text


def _sends(database_url: str, ids: list[str]) -> list[tuple]:
    with psycopg.connect(database_url.replace("+psycopg", "")) as connection:
        return connection.execute("SELECT id, sent_at, send_count FROM experiments WHERE id = ANY(%s)",
                                  (ids,)).fetchall()


def _wait_until_sent(database_url: str, ids: list[str], timeout: float) -> list[tuple]:
    def sent() -> list[tuple] | None:
        rows = _sends(database_url, ids)
        return rows if len(rows) == len(ids) and all(sent_at is not None for _id, sent_at, _count in rows) else None

    return eventually(sent, timeout=timeout, message=lambda: f"unsent: {_sends(database_url, ids)}")


def test_concurrent_submits_are_each_sent_once_in_shared_rounds(pg_database, processes):
    """FIFO, no worker: the messages stay in Redis, where the test reads them (the fair scheduler sends none
    while no worker serves the queue: tests/test_scheduler.py)."""
    broker = fresh_redis_broker()
    processes.env.update(NCLAB_DATABASE_URL=pg_database, NCLAB_BROKER_URL=broker, NCLAB_SCHEDULER="fifo")
    port = free_port()
    api = processes.start("api", "--port", str(port), name="api")
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, api)

    with httpx.Client(base_url=base_url, timeout=30) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda seed: client.post("/experiments", json={**SPEC, "seed": seed}), range(60)))
    assert all(answer.status_code == 202 for answer in answers)
    ids = [answer.json()["id"] for answer in answers]

    rows = _wait_until_sent(pg_database, ids, timeout=30)
    assert all(count == 1 for _id, _sent_at, count in rows)
    # A round records its sends in one UPDATE, with one time: fewer times than jobs.
    assert len({sent_at for _id, sent_at, _count in rows}) < len(ids)
    messages = queued_messages(broker)
    assert sorted(messages) == sorted((RUN_EXPERIMENT, experiment_id) for experiment_id in ids)


def test_a_submit_while_the_broker_is_down_is_answered_at_once_and_sent_when_it_returns(pg_database, processes):
    """Down as a hung Redis is: it takes connections and never answers, so that a send cannot
    end, in success or failure, until the test lets it; then gone; then back. FIFO: the send is the new job's own,
    with no worker to give it a slot."""
    broker_port = free_port()
    broker_url = f"redis://127.0.0.1:{broker_port}/0"
    silent = socket.create_server(("127.0.0.1", broker_port))
    processes.env.update(NCLAB_DATABASE_URL=pg_database, NCLAB_BROKER_URL=broker_url, NCLAB_SCHEDULER="fifo")
    port = free_port()
    api = processes.start_api(port)
    base_url = f"http://127.0.0.1:{port}"
    with silent, httpx.Client(base_url=base_url, timeout=30) as client:
        def up() -> bool:
            assert api.poll() is None, "the API exited"
            return client.get("/healthz").status_code == 200

        # /readyz says 503 while the broker is down: wait for the process itself.
        eventually(up, timeout=60, interval=0.2, ignoring=(httpx.TransportError,), message="the API did not start")

        answer = client.post("/experiments", json=SPEC)
        # Answered although no send can have ended: the send is not awaited.
        assert answer.status_code == 202
        experiment_id = answer.json()["id"]
        silent.settimeout(60)
        connection, _ = silent.accept()  # the send under way, after the answer
        [(_id, _sent_at, send_count)] = _sends(pg_database, [experiment_id])
        assert send_count == 0  # stored, never sent: the reconciler's to send

        connection.close()
        silent.close()  # the broker is gone: sends fail
        broker = redis_server(broker_port)
        try:
            eventually(lambda: _sends(pg_database, [experiment_id])[0][2] > 0, timeout=60,
                       message="not sent after the broker came back")
            # The dispatcher's retry and the reconciler may both get through: a second message
            # is harmless (a job is claimed once), a missing one is not.
            assert set(queued_messages(broker_url)) == {(RUN_EXPERIMENT, experiment_id)}
        finally:
            broker.kill()
            broker.wait()
