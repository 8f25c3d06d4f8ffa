"""Every result says what produced it (worker/environment.py), and the lab can search on it."""

import platform
import socket

import torch

from service.search.fields import ENVIRONMENT_TYPES
from worker import environment

UFM = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}
PYTHON_TYPES = {"string": str, "number": int, "bool": bool}


def test_the_worker_records_exactly_the_searchable_keys_with_their_types():
    described = environment.describe(torch.device("cpu"), "vm pid 1")
    assert list(described) == list(ENVIRONMENT_TYPES)
    for key, value in described.items():
        assert value is None or type(value) is PYTHON_TYPES[ENVIRONMENT_TYPES[key]], (key, value)


def test_a_result_records_its_environment_and_is_found_by_it(api):
    client = api.client
    experiment = api.run(client.post("/experiments", json=UFM).json()["id"])
    assert experiment["status"] == "succeeded"
    recorded = experiment["environment"]
    assert recorded["torch"] == torch.__version__ and recorded["python"] == platform.python_version()
    assert recorded["device"] == "cpu" and recorded["host"] == socket.gethostname()
    assert recorded["worker"] == experiment_worker(api, experiment["id"])
    assert recorded["threads"] >= 1 and recorded["deterministic_algorithms"] is False
    assert recorded["commit"] is None or len(recorded["commit"]) == 40

    def found(where: str) -> list[str]:
        response = client.get("/experiments", params={"where": where, "limit": 500})
        assert response.status_code == 200, response.text
        return [item["id"] for item in response.json()["items"]]

    assert experiment["id"] in found(f"environment.torch = '{torch.__version__}' and environment.device = 'cpu'")
    assert experiment["id"] not in found("environment.device = 'NVIDIA H100 80GB HBM3'")
    grouped = client.get("/experiments/aggregate", params={"group_by": "environment.device", "metrics": "nc1"}).json()
    assert {"environment.device": "cpu"} in [item["group"] for item in grouped["items"]]
    unknown = client.get("/experiments", params={"where": "environment.gpu = 'x'"})
    assert unknown.status_code == 422 and "environment keys are nclab, commit, python, torch" in unknown.text


def experiment_worker(api, experiment_id: str) -> str:
    from sqlalchemy import select

    from service.db import get_sessionmaker
    from service.models import Experiment

    with get_sessionmaker()() as session:
        return session.scalar(select(Experiment.worker).where(Experiment.id == experiment_id))
