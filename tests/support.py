"""Helpers for tests that talk to real servers."""

import socket
import subprocess
import time

import httpx

# A job that runs for minutes, for the tests that cancel or kill one: 1,000 epochs over
# 10,000 samples. (A UFM solve no longer will: one whose tol is out of reach stops once
# its gradient norm stops falling, worker/nc/descent.py.)
ENDLESS = {"kind": "train", "dataset": "gaussian", "K": 10, "d": 64, "epochs": 1000,
           "gaussian_train_per_class": 1000, "lr_schedule": "constant"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server(port: int) -> subprocess.Popen:
    """A Redis of the test's own on ``port``, keeping nothing on disk; the caller kills it."""
    server = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.1)
    return server


def wait_ready(base_url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base_url} not ready after {timeout} s")


def wait_for_status(client: httpx.Client, experiment_id: str, statuses: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/experiments/{experiment_id}").raise_for_status().json()
        if body["status"] in statuses:
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"experiment stayed {body['status']} (wanted {statuses}): {body}")
        time.sleep(0.1)

