"""The service end to end against real PostgreSQL, Redis, Celery worker and HTTP; what the API
answers by itself (validation, lists), in-process on SQLite and on PostgreSQL."""

import math
import signal

import pytest

from tests.support import ENDLESS, eventually, wait_for_status

DONE_WHEN_SPEC = {"kind": "ufm", "K": 10, "d": 16, "n_per_class": 20, "normalization": "normalized",
                  "logit_scale": 10, "seed": 0}
# A UFM of some 400 iterations, with a history row every 20.
LONG_UFM = {"kind": "ufm", "K": 30, "d": 64, "n_per_class": 50, "tol": 1e-300, "max_iters": 400,
            "checkpoint_every": 20}
PROBLEM_JSON = "application/problem+json"


def submit(client, spec: dict) -> dict:
    response = client.post("/experiments", json=spec)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/experiments/{body['id']}"
    assert body["status"] in ("queued", "running")  # an idle worker may already have claimed it
    return body


def wait_until_running_with_history(client, experiment_id: str, timeout: float = 60) -> list[dict]:
    """The history so far, once the job runs and has one."""
    wait_for_status(client, experiment_id, {"running"}, timeout)
    return eventually(lambda: client.get(f"/experiments/{experiment_id}/metrics").json()["items"], timeout=timeout,
                      interval=0.1, message="no history row appeared")


def test_submit_poll_and_read_result_and_history(production):
    client = production.client
    created = submit(client, DONE_WHEN_SPEC)
    done = wait_for_status(client, created["id"], {"succeeded", "failed"}, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"] == 1.0 and done["attempts"] == 1
    assert done["started_at"] <= done["finished_at"]

    result = done["result"]
    optimum = math.log(1 + 9 * math.exp(-10 * 10 / 9))
    assert result["optimal_loss"] == pytest.approx(optimum, rel=1e-12)
    assert abs(result["optimality_gap"]) < 1e-8
    assert result["converged"] is True
    for key in ("nc1", "nc2_etf_w", "nc3_etf", "nc2_etf_m", "nc4"):
        assert result[key] < 1e-6, key
    assert result["accuracy"] == 1.0

    history = client.get(f"/experiments/{created['id']}/metrics").json()["items"]
    steps = [row["step"] for row in history]
    assert steps[0] == 0 and steps == sorted(set(steps)) and steps[-1] == result["iterations"]
    assert history[-1]["loss"] == pytest.approx(result["loss"], rel=1e-12)
    assert history[0]["nc1"] > 1e-2 > history[-1]["nc1"]  # random init is far from collapse


def test_cancel_stops_a_running_job_within_seconds_and_keeps_its_history(production):
    client = production.client
    created = submit(client, ENDLESS)
    wait_until_running_with_history(client, created["id"])

    response = client.post(f"/experiments/{created['id']}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"] is True
    # Within seconds: a run of minutes (1,000 epochs) ends canceled, far short of its end.
    done = wait_for_status(client, created["id"], {"canceled", "failed", "succeeded"}, timeout=60)
    assert done["status"] == "canceled" and done["progress"] < 0.5
    history = client.get(f"/experiments/{created['id']}/metrics").json()["items"]
    assert history and history[-1]["step"] < ENDLESS["epochs"] / 2

    again = client.post(f"/experiments/{created['id']}/cancel")
    assert again.status_code == 409 and again.headers["content-type"] == PROBLEM_JSON


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"K": 1}, "K"),
        ({"d": 0}, "d"),
        ({"d": 1}, "d"),  # normalized: no room on a 0-dimensional sphere
        ({"n_per_class": 0}, "n_per_class"),
        ({"logit_scale": 0}, "logit_scale"),
        ({"logit_scale": -1}, "logit_scale"),
        ({"normalization": "regularized", "lambda_w": -1e-3}, "lambda_w"),
        ({"normalization": "regularized", "lambda_h": 0}, "lambda_h"),
        ({"normalization": "regularized", "lambda_b": -1}, "lambda_b"),
        ({"lambda_w": 1e-3}, "lambda_w"),  # lambdas belong to the regularized problem
        ({"normalization": "regularized", "logit_scale": 5}, "logit_scale"),
        ({"normalization": "spherical"}, "normalization"),
        ({"max_iters": 0}, "max_iters"),
        ({"max_iters": 10**9}, "max_iters"),
        ({"K": 1000, "d": 1000, "n_per_class": 1000}, "n_per_class"),
        ({"n_per_class": [3, 3]}, "n_per_class"),  # K = 4 counts needed
        ({"n_per_class": [3, 3, 0, 3]}, "n_per_class"),
        ({"n_per_class": "many"}, "n_per_class"),
        ({"restarts": 0}, "restarts"),
        ({"restarts": 10**6}, "restarts"),
        ({"tol": 0}, "tol"),
        ({"seed": -1}, "seed"),
        ({"K": "ten"}, "K"),
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"kind": "gan"}, "kind"),
        ({"loss": "hinge"}, "loss"),
        ({"loss": "label_smoothing"}, "label_smoothing"),  # required with its loss
        ({"loss": "label_smoothing", "label_smoothing": 1.0}, "label_smoothing"),  # 0 < eps < 1
        ({"loss": "label_smoothing", "label_smoothing": 0}, "label_smoothing"),
        ({"loss": "mse", "label_smoothing": 0.1}, "label_smoothing"),  # only with its loss
        ({"layers": 2}, "layers"),  # the deep UFM is regularized
        ({"normalization": "regularized", "layers": 7}, "layers"),
        ({"normalization": "regularized", "layers": 3, "d": 6000, "n_per_class": 1}, "layers"),  # 2 d^2 > 5e7
        ({"normalization": "regularized", "layers": 3, "lambda_layers": [1e-3]}, "lambda_layers"),
        ({"layer_activation": "relu"}, "layer_activation"),  # only with layers > 1
    ],
)
def test_invalid_specs_are_422_problems_naming_the_field_and_store_nothing(api_each_db, spec, field):
    client = api_each_db.client
    before = len(client.get("/experiments", params={"limit": 500}).json()["items"])
    response = client.post("/experiments", json={"kind": "ufm", "K": 4, "d": 4, "n_per_class": 2, **spec})
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM_JSON
    problem = response.json()
    assert [error["field"] for error in problem["errors"]] == [field]
    assert problem["detail"].startswith(f"{field}: ")
    assert len(client.get("/experiments", params={"limit": 500}).json()["items"]) == before


def test_unknown_experiment_is_a_404_problem(api_each_db):
    response = api_each_db.client.get("/experiments/does-not-exist")
    assert response.status_code == 404 and response.headers["content-type"] == PROBLEM_JSON
    assert api_each_db.client.get("/experiments/does-not-exist/metrics").status_code == 404


def test_list_filters_and_paginates_newest_first_with_a_cursor(api_each_db):
    client = api_each_db.client
    tag = 700  # a d no other test in the module uses
    ids = []
    for K, normalization in [(3, "normalized"), (4, "regularized"), (3, "regularized"), (5, "normalized"),
                             (3, "normalized")]:
        spec = {"kind": "ufm", "K": K, "d": tag, "n_per_class": 1, "normalization": normalization, "max_iters": 5}
        ids.append(submit(client, spec)["id"])

    pages, cursor = [], None
    while True:
        params = {"d": tag, "limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/experiments", params=params).json()
        pages.append([item["id"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == ids[::-1]

    def listed(**filters):
        return [item["id"] for item in client.get("/experiments", params={"d": tag, **filters}).json()["items"]]

    assert listed(K=3) == [ids[4], ids[2], ids[0]]
    assert listed(K=3, normalization="regularized") == [ids[2]]
    assert listed(kind="ufm", normalization="normalized") == [ids[4], ids[3], ids[0]]
    for experiment_id in ids:
        assert api_each_db.run(experiment_id)["status"] == "succeeded"
    assert set(listed(status="succeeded")) == set(ids) and listed(status="queued") == []

    bad = client.get("/experiments", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 422 and "cursor" in bad.json()["detail"]
    assert client.get("/experiments", params={"status": "sleeping"}).status_code == 422


def test_readiness_reports_database_and_broker(production):
    body = production.client.get("/readyz").json()
    assert body["checks"] == {"database": "ok", "broker": "ok"}


def test_a_job_whose_worker_dies_is_requeued_and_finished_by_another_worker(own_production):
    stack = own_production
    created = submit(stack.client, LONG_UFM)
    wait_until_running_with_history(stack.client, created["id"])

    stack.processes.stop(stack.worker, signal.SIGKILL)  # the whole worker, no warm shutdown
    stack.processes.start("worker", name="worker-2")
    done = wait_for_status(stack.client, created["id"], {"succeeded", "failed", "canceled"}, timeout=90)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert done["result"]["iterations"] == 400
    history = stack.client.get(f"/experiments/{created['id']}/metrics").json()["items"]
    assert [row["step"] for row in history] == list(range(0, 401, 20))  # rewritten, not duplicated


def test_generalized_collapse_imbalance_and_restarts_run_end_to_end(production):
    client = production.client
    no_etf = submit(client, {"kind": "ufm", "K": 10, "d": 4, "n_per_class": 3, "max_iters": 3000})
    imbalanced = submit(client, {"kind": "ufm", "K": 4, "d": 8, "n_per_class": [2, 5, 3, 9]})
    restarted = submit(client, {"kind": "ufm", "K": 5, "d": 8, "n_per_class": 3, "restarts": 4})
    # N d K = 2^20 multiply-adds per product: large enough to merge collapsed features.
    merging = submit(client, {"kind": "ufm", "K": 32, "d": 64, "n_per_class": 16})

    result = wait_for_status(client, no_etf["id"], {"succeeded"}, timeout=120)["result"]
    assert result["optimal_loss"] is None and result["optimality_gap"] is None
    assert result["has_closed_form"] is False
    # Ten directions in R^4 cannot all be as far apart as a simplex ETF's.
    assert 0 < result["w_min_angle_deg"] < math.degrees(math.acos(-1 / 9))
    assert result["loss"] > math.log1p(9 * math.exp(-10 * 10 / 9))

    result = wait_for_status(client, imbalanced["id"], {"succeeded"}, timeout=120)["result"]
    assert result["optimal_loss"] is None and result["accuracy"] == 1.0
    assert result["nc1"] < 1e-6
    history = client.get(f"/experiments/{imbalanced['id']}/metrics").json()["items"]
    assert history[-1]["step"] == result["iterations"]

    result = wait_for_status(client, merging["id"], {"succeeded"}, timeout=120)["result"]
    assert result["converged"] and abs(result["optimality_gap"]) < 1e-8
    assert 0 < result["features_merged_at"] < result["iterations"]
    history = client.get(f"/experiments/{merging['id']}/metrics").json()["items"]
    assert history[-1]["step"] == result["iterations"]
    assert history[-1]["nc1"] < 1e-20 and history[-1]["nc2_etf_w"] < 1e-6

    result = wait_for_status(client, restarted["id"], {"succeeded"}, timeout=120)["result"]
    assert result["restarts"] == 4 and result["global_optimum_fraction"] == 1.0
    assert result["final_loss_max"] - result["final_loss_min"] < 1e-8
    assert abs(result["optimality_gap"]) < 1e-8
