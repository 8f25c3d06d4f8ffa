"""Helpers for tests: waiting for a condition, and talking to real servers."""

import asyncio
import base64
import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import redis

# A job that runs for minutes, for the tests that cancel or kill one: 1,000 epochs over
# 10,000 samples. (A UFM solve no longer will: one whose tol is out of reach stops once
# its gradient norm stops falling, worker/nc/descent.py.)
ENDLESS = {"kind": "train", "dataset": "gaussian", "K": 10, "d": 64, "epochs": 1000,
           "gaussian_train_per_class": 1000, "lr_schedule": "constant"}

T = TypeVar("T")


def eventually(condition: Callable[[], T], timeout: float = 30, interval: float = 0.05,
               message: str | Callable[[], str] | None = None,
               ignoring: tuple[type[BaseException], ...] = ()) -> T:
    """``condition()``'s first truthy value, asked every ``interval`` s; an AssertionError after ``timeout`` s.

    The one polling loop of the tests. ``timeout`` only bounds a wait for something that
    does happen (it is never what a test asserts: no test depends on how fast a machine
    is). ``message`` (or a function that writes it, called once, on failure) says what
    did not happen; exceptions of the ``ignoring`` types count as "not yet".
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except ignoring:
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = message() if callable(message) else message
            raise AssertionError(f"not within {timeout:g} s: {detail or getattr(condition, '__name__', condition)}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server(port: int) -> subprocess.Popen:
    """A Redis of the test's own on ``port``, keeping nothing on disk; the caller kills it."""
    server = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    eventually(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode == 0,
               timeout=10, interval=0.1, message="redis-server did not start")
    return server


def queued_messages(broker_url: str, queue: str = "cpu") -> list[tuple[str, str]]:
    """(task name, experiment id) of each message waiting in a queue (UFM solves go to cpu) on a Redis broker."""
    messages = []
    with redis.Redis.from_url(broker_url) as broker:
        for raw in broker.lrange(queue, 0, -1):
            envelope = json.loads(raw)
            args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            messages.append((envelope["headers"]["task"], args[0]))
    return messages


def wait_ready(base_url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200

    eventually(ready, timeout=timeout, interval=0.2, ignoring=(httpx.TransportError,),
               message=f"{base_url} not ready")


def wait_for_status(client, experiment_id: str, statuses: set[str], timeout: float = 60) -> dict:
    """The experiment once its status is one of ``statuses`` (``client``: an httpx.Client or a TestClient)."""
    last: dict = {}

    def reached() -> dict | None:
        last.update(client.get(f"/experiments/{experiment_id}").raise_for_status().json())
        return dict(last) if last["status"] in statuses else None

    return eventually(reached, timeout=timeout, interval=0.1,
                      message=lambda: f"experiment stayed {last.get('status')} (wanted {statuses}): {last}")


def answer_to_raised(error: Exception, query: str = "") -> httpx.Response:
    """What the API answers (its problem handlers, service.api.problems) to a request whose
    route raised ``error``: for the errors no request can be made to cause on demand."""
    from fastapi import FastAPI

    from service.api import problems

    app = FastAPI()
    problems.install(app)

    @app.get("/fail")
    def fail():
        raise error

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://nclab") as client:
            return await client.get(f"/fail{query}")

    return asyncio.run(get())


def stored_dir(experiment_id: str) -> Path:
    """An experiment's directory in the local artifact store that this process's settings name."""
    from service.settings import get_settings

    return Path(get_settings().resolved_artifact_root) / experiment_id
