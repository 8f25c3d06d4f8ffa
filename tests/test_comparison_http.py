"""Lab-wide comparison through the API (in-process), on SQLite and on PostgreSQL.

Real UFM solves (small ones, run here by the worker's task body) make the history; every
figure the API returns is checked against the experiments' own results and histories,
read one by one and reduced with numpy.
"""

import csv
import io
import math
import uuid

import numpy as np
import pytest
from PIL import Image

PROBLEM_JSON = "application/problem+json"


@pytest.fixture(scope="module")
def lab(api_each_db):
    """Nine finished solves labelled with a batch tag of their own: 2 logit scales x 3 seeds, and 3 regularized."""
    client = api_each_db.client
    batch = uuid.uuid4().hex[:12]
    specs = [{"kind": "ufm", "K": 4, "d": 6, "n_per_class": 3, "logit_scale": scale, "seed": seed}
             for scale in (2, 5) for seed in range(3)]
    specs += [{"kind": "ufm", "K": 4, "d": 6, "n_per_class": 3, "normalization": "regularized", "seed": seed}
              for seed in range(3)]
    ids = []
    for i, spec in enumerate(specs):
        tags = {"batch": batch, **({"paper": "fig2"} if i % 2 == 0 else {})}
        response = client.post("/experiments", json={"spec": spec, "name": f"run {i}", "tags": tags})
        assert response.status_code == 202, response.text
        assert response.json()["tags"] == tags and response.json()["name"] == f"run {i}"
        ids.append(response.json()["id"])
    done = [api_each_db.run(i) for i in ids]
    assert all(e["status"] == "succeeded" for e in done), [e["error"] for e in done]
    histories = {i: client.get(f"/experiments/{i}/metrics").json()["items"] for i in ids}
    return client, batch, done, histories


def test_search_filters_on_spec_result_and_tags_and_orders_by_a_metric(lab):
    client, batch, done, _ = lab
    where = (f"tags.batch = '{batch}' and spec.normalization = 'normalized' "
             "and (spec.logit_scale >= 5 or tags.paper = 'fig2')")
    response = client.get("/experiments", params={"where": where, "order_by": "-result.loss,id", "limit": 4})
    assert response.status_code == 200, response.text
    expected = [e for e in done if e["spec"]["normalization"] == "normalized"
                and (e["spec"]["logit_scale"] >= 5 or e["tags"].get("paper") == "fig2")]
    expected.sort(key=lambda e: e["id"])
    expected.sort(key=lambda e: e["result"]["loss"], reverse=True)
    ids, page = [], response.json()
    while True:
        ids += [item["id"] for item in page["items"]]
        if page["next_cursor"] is None:
            break
        page = client.get("/experiments", params={"where": where, "order_by": "-result.loss,id", "limit": 4,
                                                  "cursor": page["next_cursor"]}).json()
    assert ids == [e["id"] for e in expected]
    # A page's items are the experiments exactly as GET /experiments/{id} shows them.
    for item in response.json()["items"]:
        assert item == client.get(f"/experiments/{item['id']}").json()

    body = {"where": where, "order_by": ["-result.loss", "id"], "limit": 100}
    searched = client.post("/experiments/search", json=body)
    assert searched.status_code == 200 and [i["id"] for i in searched.json()["items"]] == ids

    # The old equality parameters still work, and combine with where.
    combined = client.get("/experiments", params={"where": f"tags.batch = '{batch}'", "normalization": "regularized"})
    assert sorted(i["id"] for i in combined.json()["items"]) == sorted(
        e["id"] for e in done if e["spec"]["normalization"] == "regularized")


def test_aggregate_equals_numpy_over_the_groups(lab):
    client, batch, done, _ = lab
    response = client.get("/experiments/aggregate", params={
        "where": f"tags.batch = '{batch}'", "group_by": "spec.normalization,spec.logit_scale",
        "metrics": "nc1,loss,result.accuracy"})
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    groups = {}
    for e in done:
        groups.setdefault((e["spec"]["normalization"], e["spec"]["logit_scale"]), []).append(e)
    assert [tuple(item["group"].values()) for item in items] == sorted(groups)
    for item in items:
        assert list(item["group"]) == ["spec.normalization", "spec.logit_scale"]
        members = groups[tuple(item["group"].values())]
        assert item["count"] == len(members) == 3
        for key in ("nc1", "loss", "accuracy"):
            values = np.array([e["result"][key] for e in members])
            figures = item["metrics"][key]
            assert figures["n"] == 3
            assert math.isclose(figures["mean"], values.mean(), rel_tol=1e-12, abs_tol=1e-300)
            assert math.isclose(figures["std"], values.std(ddof=1), rel_tol=1e-9, abs_tol=1e-15)
            assert figures["min"] == values.min() and figures["max"] == values.max()
            assert math.isclose(figures["median"], np.median(values), rel_tol=1e-12, abs_tol=1e-300)


def test_curves_equal_numpy_per_group_and_step(lab):
    client, batch, done, histories = lab
    response = client.get("/experiments/curves", params={
        "where": f"tags.batch = '{batch}'", "group_by": "spec.normalization", "metric": "loss"})
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [item["group"]["spec.normalization"] for item in items] == ["normalized", "regularized"]
    for item in items:
        per_step = {}
        for e in done:
            if e["spec"]["normalization"] == item["group"]["spec.normalization"]:
                for row in histories[e["id"]]:
                    per_step.setdefault(row["step"], []).append(row["loss"])
        assert [p["step"] for p in item["points"]] == sorted(per_step)
        for point in item["points"]:
            values = np.array(per_step[point["step"]])
            assert point["n"] == len(values)
            assert math.isclose(point["mean"], values.mean(), rel_tol=1e-12)
            assert point["min"] == values.min() and point["max"] == values.max()
            if len(values) > 1:
                assert math.isclose(point["std"], values.std(ddof=1), rel_tol=1e-9, abs_tol=1e-15)


def _csv(response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(response.text)))


def test_csv_round_trips_lists_aggregates_curves_and_histories(lab):
    client, batch, done, histories = lab
    where = f"tags.batch = '{batch}'"
    rows = _csv(client.get("/experiments", params={"where": where, "order_by": "id", "format": "csv"}))
    by_id = {e["id"]: e for e in done}
    assert [row["id"] for row in rows] == sorted(by_id)
    for row in rows:
        experiment = by_id[row["id"]]
        assert row["status"] == "succeeded" and row["name"] == experiment["name"]
        assert int(row["spec.K"]) == 4 and float(row["spec.logit_scale"]) == experiment["spec"]["logit_scale"]
        for key in ("nc1", "loss", "optimality_gap", "grad_norm"):
            reference = experiment["result"][key]
            assert (row[f"result.{key}"] == "") if reference is None else float(row[f"result.{key}"]) == reference
        assert row["result.converged"] == ("true" if experiment["result"]["converged"] else "false")
        assert row["spec.dataset"] == ""  # a UFM spec has no data set

    by_accept = _csv(client.get("/experiments", params={"where": where, "order_by": "id"},
                                headers={"Accept": "text/csv"}))
    assert by_accept == rows

    aggregated = _csv(client.get("/experiments/aggregate", params={
        "where": where, "group_by": "spec.normalization", "metrics": "nc1", "format": "csv"}))
    json_items = client.get("/experiments/aggregate", params={
        "where": where, "group_by": "spec.normalization", "metrics": "nc1"}).json()["items"]
    assert [(r["spec.normalization"], int(r["count"]), float(r["nc1.mean"])) for r in aggregated] == [
        (i["group"]["spec.normalization"], i["count"], i["metrics"]["nc1"]["mean"]) for i in json_items]

    curve_rows = _csv(client.get("/experiments/curves", params={"where": where, "metric": "nc1"},
                                 headers={"Accept": "text/csv"}))
    (curve,) = client.get("/experiments/curves", params={"where": where, "metric": "nc1"}).json()["items"]
    assert [(int(r["step"]), int(r["n"]), float(r["mean"])) for r in curve_rows] == [
        (p["step"], p["n"], p["mean"]) for p in curve["points"]]

    first = done[0]["id"]
    history_rows = _csv(client.get(f"/experiments/{first}/metrics", params={"format": "csv"}))
    assert [(int(r["step"]), float(r["loss"]), float(r["nc1"])) for r in history_rows] == [
        (row["step"], row["loss"], row["nc1"]) for row in histories[first]]


def test_plots_are_pngs_of_the_asked_size(lab):
    client, batch, done, _ = lab
    response = client.get(f"/experiments/{done[0]['id']}/metrics.png",
                          params={"metric": "nc1,nc2_etf_w", "width": 640, "height": 480})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.size == (640, 480)

    response = client.get("/experiments/curves.png", params={
        "where": f"tags.batch = '{batch}'", "group_by": "spec.normalization,spec.logit_scale", "metric": "nc1"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (800, 500)
    # Not a blank canvas: three groups drew lines and bands in colour.
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50


@pytest.mark.parametrize(("path", "params", "field"), [
    ("/experiments", {"where": "result.nc1 < 'x'"}, "result.nc1"),
    ("/experiments", {"where": "spec.nope = 1"}, "spec.nope"),
    ("/experiments", {"where": "spec.normalization = 'normalised'"}, "spec.normalization"),
    ("/experiments", {"where": "result.converged > true"}, "result.converged"),
    ("/experiments", {"where": "created_at > 'yesterday'"}, "created_at"),
    ("/experiments", {"where": "result.nc1 <"}, "where"),
    ("/experiments", {"where": "spec.K = 1; DROP TABLE experiments"}, "where"),
    ("/experiments", {"where": "spec.K = 1 OR 1=1 --"}, "where"),
    ("/experiments", {"where": "spec.normalization = 'x'' OR ''1''=''1'"}, "spec.normalization"),
    ("/experiments", {"where": "\"spec.K\" = 1"}, "where"),
    ("/experiments", {"order_by": "nc1"}, "nc1"),
    ("/experiments", {"order_by": "result.nc1;DELETE FROM experiments"}, "order_by"),
    ("/experiments", {"cursor": "not-a-cursor"}, "cursor"),
    ("/experiments", {"seed": "0"}, "seed"),
    ("/experiments/aggregate", {"group_by": "spec.bogus"}, "spec.bogus"),
    ("/experiments/aggregate", {"metrics": "converged"}, "metrics"),
    ("/experiments/curves", {"metric": "bogus"}, "metric"),
    ("/experiments/curves", {}, "metric"),
])
def test_bad_filters_and_parameters_are_422_problems_naming_the_field(lab, path, params, field):
    client = lab[0]
    response = client.get(path, params=params)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM_JSON
    problem = response.json()
    assert problem["errors"][0]["field"] == field, problem
    assert field in problem["detail"]


def test_an_injection_attempt_in_a_value_is_just_a_value(lab):
    client, batch, done, _ = lab
    where = "name = 'x'' OR ''1''=''1' or name = 'x''; DROP TABLE experiments; --'"
    response = client.get("/experiments", params={"where": where})
    assert response.status_code == 200 and response.json()["items"] == []
    assert len(client.get("/experiments", params={"where": f"tags.batch = '{batch}'"}).json()["items"]) == len(done)


def test_repeated_single_valued_parameters_are_422(lab):
    client = lab[0]
    response = client.get("/experiments?K=10&K=100")
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "K"
    assert "2 times" in response.json()["detail"]


def test_patch_renames_and_merges_tags(lab):
    client, batch, done, _ = lab
    experiment_id = done[1]["id"]
    response = client.patch(f"/experiments/{experiment_id}",
                            json={"name": "renamed", "tags": {"fig": "3", "paper": None}})
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "renamed"
    assert response.json()["tags"] == {"batch": batch, "fig": "3"}
    assert client.get(f"/experiments/{experiment_id}").json()["tags"] == {"batch": batch, "fig": "3"}
    where = f"tags.fig = '3' and name = 'renamed' and tags.batch = '{batch}'"
    found = client.get("/experiments", params={"where": where})
    assert [i["id"] for i in found.json()["items"]] == [experiment_id]

    too_many = client.patch(f"/experiments/{experiment_id}", json={"tags": {f"t{i}": "x" for i in range(31)}})
    assert too_many.status_code == 422 and too_many.json()["errors"][0]["field"] == "tags"
    bad_key = client.patch(f"/experiments/{experiment_id}", json={"tags": {"no spaces": "x"}})
    assert bad_key.status_code == 422 and bad_key.json()["errors"][0]["field"].startswith("tags")
    assert client.patch("/experiments/nope", json={"name": "x"}).status_code == 404
    cleared = client.patch(f"/experiments/{experiment_id}", json={"name": None})
    assert cleared.json()["name"] is None and cleared.json()["tags"] == {"batch": batch, "fig": "3"}


@pytest.mark.parametrize(("body", "field"), [
    ({"spec": {"kind": "ufm", "K": 1, "d": 4, "n_per_class": 2}}, "spec.K"),
    ({"spec": {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}, "name": "x" * 201}, "name"),
    ({"spec": {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}, "tags": {"a": 1}}, "tags.a"),
    ({"spec": {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}, "tags": {f"t{i}": "x" for i in range(33)}}, "tags"),
    ({"spec": {"kind": "gan"}}, "spec.kind"),
    ({"spec": {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}, "owner": "me"}, "owner"),
])
def test_labelled_submissions_are_validated_naming_the_field(lab, body, field):
    response = lab[0].post("/experiments", json=body)
    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == [field]


def test_metrics_count_requests_per_route_and_jobs_per_status(lab):
    from prometheus_client.parser import text_string_to_metric_families

    client, _batch, done, _ = lab
    client.get(f"/experiments/{done[0]['id']}")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}
    assert samples[("http_requests_total", (("handler", "/experiments/{experiment_id}"), ("method", "GET"),
                                            ("status", "2xx")))] >= 1
    assert samples[("nclab_database_up", ())] == 1
    by_status = {item["group"]["status"]: item["count"]
                 for item in client.get("/experiments/aggregate", params={"group_by": "status"}).json()["items"]}
    for status in ("queued", "running", "succeeded", "failed", "canceled"):
        assert samples[("nclab_jobs", (("status", status),))] == by_status.get(status, 0)
    queued = client.get("/experiments/aggregate", params={"group_by": "spec.resources", "where": "status = 'queued'"})
    by_queue = {item["group"]["spec.resources"]: item["count"] for item in queued.json()["items"]}
    for queue in ("cpu", "gpu"):
        assert samples[("nclab_queue_depth", (("queue", queue),))] == by_queue.get(queue, 0)
        assert samples[("nclab_queue_consumers", (("queue", queue),))] == 0  # in-process jobs: no worker announced
    finished = sum(by_status.get(status, 0) for status in ("succeeded", "failed", "canceled"))
    ufm_count = samples[("nclab_job_duration_seconds_count", (("kind", "ufm"),))]
    assert ufm_count == finished  # every job of this module is a UFM solve
    assert samples[("nclab_job_duration_seconds_bucket", (("kind", "ufm"), ("le", "60.0")))] <= ufm_count
    assert samples[("nclab_job_duration_seconds_sum", (("kind", "ufm"),))] > 0
