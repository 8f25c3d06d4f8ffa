"""The nclab command's lab commands, run as subprocesses against real servers: exit codes, tables, CSV, PNG."""

import csv
import io
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import pytest

from tests.support import ENDLESS, wait_for_status

NCLAB = str(Path(sys.executable).parent / "nclab")
UFM = {"kind": "ufm", "K": 4, "d": 6, "n_per_class": 3}
# Decay times step size far above 2: the weights oscillate with growing amplitude until NaN.
DIVERGING = {"kind": "train", "dataset": "digits", "architecture": "mlp", "d": 64, "mlp_width": 128, "mlp_depth": 2,
             "epochs": 3, "batch_size": 64, "normalization": "regularized", "lr": 100.0, "weight_decay": 1.0,
             "feature_decay": 10.0}
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def nclab(stack, *args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCLAB_")}
    env["NCLAB_URL"] = stack.base_url
    return subprocess.run([NCLAB, *args], input=stdin, capture_output=True, text=True, env=env, timeout=timeout)


def write_json(tmp_path: Path, name: str, document) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return str(path)


def test_submit_wait_prints_the_result_and_exits_0(stack, tmp_path):
    done = nclab(stack, "submit", write_json(tmp_path, "spec.json", {"spec": UFM, "name": "cli", "tags": {"a": "1"}}),
                 "--wait", "--tag", "b=2")
    assert done.returncode == 0, done.stderr
    experiment_id = done.stdout.split()[0]
    stored = stack.client.get(f"/experiments/{experiment_id}").json()
    assert stored["status"] == "succeeded" and stored["name"] == "cli" and stored["tags"] == {"a": "1", "b": "2"}
    assert "succeeded" in done.stdout and "optimality_gap" in done.stdout
    shown = nclab(stack, "status", experiment_id, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["result"] == stored["result"]
    # A spec on stdin, and no --wait: the id at once.
    queued = nclab(stack, "submit", "-", stdin=json.dumps({**UFM, "seed": 3}))
    assert queued.returncode == 0 and len(queued.stdout.strip()) == 36


def test_a_failed_run_exits_1_and_a_canceled_one_3(embedded, tmp_path):
    stack = embedded  # the command's exit codes do not depend on the service's mode (the submit test runs on both)
    failed = nclab(stack, "submit", write_json(tmp_path, "diverging.json", DIVERGING), "--wait")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "diverged: loss became" in failed.stdout
    assert nclab(stack, "status", failed.stdout.split()[0]).returncode == 1

    endless = nclab(stack, "submit", write_json(tmp_path, "endless.json", ENDLESS))
    endless_id = endless.stdout.strip()
    quick_id = nclab(stack, "submit", write_json(tmp_path, "quick.json", UFM)).stdout.strip()
    canceled = nclab(stack, "cancel", endless_id)
    assert canceled.returncode == 0 and canceled.stdout.startswith(endless_id)
    waited = nclab(stack, "wait", quick_id, endless_id, "--timeout", "120")
    assert waited.returncode == 3, waited.stderr
    assert waited.stdout.splitlines() == [f"{quick_id} succeeded", f"{endless_id} canceled"]
    assert nclab(stack, "wait", quick_id).returncode == 0


def test_status_of_a_queued_experiment_shows_its_priority_and_place(embedded, tmp_path):
    """One slot, taken by an endless run: a solve submitted with --priority waits, and says where."""
    endless_id = nclab(embedded, "submit", write_json(tmp_path, "endless.json", ENDLESS)).stdout.strip()
    wait_for_status(embedded.client, endless_id, {"running"})
    queued = nclab(embedded, "submit", write_json(tmp_path, "quick.json", {"spec": UFM, "priority": 2}),
                   "--priority", "3")
    queued_id = queued.stdout.strip()
    try:
        shown = nclab(embedded, "status", queued_id)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert any("priority" in line and "3" in line for line in lines), shown.stdout  # the option over the file's
        assert "1st of anonymous's 1" in shown.stdout  # no keys: everyone is the anonymous admin
    finally:
        nclab(embedded, "cancel", queued_id)
        nclab(embedded, "cancel", endless_id)


@pytest.mark.parametrize(("args", "message"), [
    (["submit", "{missing}"], "No such file"),
    (["submit", "{bad_spec}"], "spec.K: Input should be greater than or equal to 2"),
    (["status", "00000000-0000-0000-0000-000000000000"], "404: no experiment with id"),
    (["ls", "--where", "spec.nope = 1"], "spec.nope"),
    (["ls", "--csv", "--json"], "--csv or --json"),
    (["cancel", "no-such-id"], "404: no sweep with id"),
    (["sweep", "{bad_sweep}"], "members[1].d"),
    (["frobnicate"], "No such command"),
])
def test_usage_and_http_errors_exit_2_with_the_reason_on_stderr(embedded, tmp_path, args, message):
    files = {"missing": str(tmp_path / "missing.json"),
             "bad_spec": write_json(tmp_path, "bad.json", {**UFM, "K": 1}),
             "bad_sweep": write_json(tmp_path, "sweep.json", {"base": {**UFM, "K": 3}, "grid": {"d": [4, 1]}})}
    done = nclab(embedded, *(arg.format(**files) for arg in args))
    assert done.returncode == 2
    assert message in done.stderr, done.stderr
    assert done.stdout == ""


def test_a_wait_past_its_timeout_exits_2(embedded, tmp_path):
    endless_id = nclab(embedded, "submit", write_json(tmp_path, "endless.json", ENDLESS)).stdout.strip()
    try:
        done = nclab(embedded, "wait", endless_id, "--timeout", "0.5")
        assert done.returncode == 2 and "1 of 1 experiments unfinished after 0.5 s" in done.stderr
    finally:
        embedded.client.post(f"/experiments/{endless_id}/cancel")
        wait_for_status(embedded.client, endless_id, {"canceled"}, timeout=30)


def test_sweep_wait_ls_history_and_compare_write_tables_csv_and_png(embedded, tmp_path):
    stack = embedded
    tag = os.urandom(4).hex()
    sweep_file = write_json(tmp_path, "sweep.json", {
        "name": "cli-sweep", "tags": {"run": tag}, "base": {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2},
        "variants": [{"normalization": "normalized", "logit_scale": 4}, {"normalization": "regularized"}],
        "grid": {"seed": [0, 1, 2]}})
    swept = nclab(stack, "sweep", sweep_file, "--wait", "--timeout", "120")
    assert swept.returncode == 0, swept.stderr
    assert swept.stdout.splitlines()[-1] == "6 succeeded, 0 failed, 0 canceled"
    where = f"tags.run = '{tag}'"

    listed = nclab(stack, "ls", "--where", where, "--csv", "--limit", "0")
    records = list(csv.DictReader(io.StringIO(listed.stdout)))
    assert listed.returncode == 0 and len(records) == 6 and {r["status"] for r in records} == {"succeeded"}
    assert len(list(csv.DictReader(io.StringIO(nclab(stack, "ls", "--where", where, "--csv", "--limit", "2")
                                                .stdout)))) == 2
    lines = nclab(stack, "ls", "--where", where, "--order-by", "result.loss", "--json").stdout.splitlines()
    experiments = [json.loads(line) for line in lines]
    losses = [e["result"]["loss"] for e in experiments]
    assert len(experiments) == 6 and losses == sorted(losses)
    table = nclab(stack, "ls", "--where", where, "--limit", "3").stdout
    assert "3 experiments" in table and sum(e["id"] in table for e in experiments) == 3

    first = experiments[0]["id"]
    history = nclab(stack, "history", first, "--csv")
    rows = list(csv.DictReader(io.StringIO(history.stdout)))
    assert float(rows[-1]["loss"]) == pytest.approx(experiments[0]["result"]["loss"], rel=1e-9)
    plot = tmp_path / "history.png"
    assert nclab(stack, "history", first, "--plot", str(plot), "--metric", "loss,nc1").returncode == 0
    assert matplotlib.image.imread(plot).shape[:2] == (500, 800)

    compared = nclab(stack, "compare", "--where", where, "--group-by", "spec.normalization", "--metric", "loss",
                     "--csv", "--plot", str(tmp_path / "compare.png"))
    assert compared.returncode == 0, compared.stderr
    groups = {r["spec.normalization"]: r for r in csv.DictReader(io.StringIO(compared.stdout))}
    for mode in ("normalized", "regularized"):
        mean = statistics.mean(e["result"]["loss"] for e in experiments if e["spec"]["normalization"] == mode)
        assert float(groups[mode]["loss.mean"]) == pytest.approx(mean, rel=1e-9)
    assert matplotlib.image.imread(tmp_path / "compare.png").shape[:2] == (500, 800)
    shown = nclab(stack, "compare", "--where", where, "--group-by", "spec.normalization", "--metric", "loss,nc1")
    assert shown.stdout.count("normalized") == 2 and shown.stdout.count("regularized") == 2


def test_label_and_cancel_a_sweep_and_its_members(embedded, tmp_path):
    sweep_file = write_json(tmp_path, "endless.json", {"base": ENDLESS, "grid": {"seed": [0, 1, 2]}})
    created = nclab(embedded, "sweep", sweep_file)
    sweep_id = created.stdout.split()[1].rstrip(":")
    labeled = nclab(embedded, "label", sweep_id, "--name", "endless", "--tag", "fig=2")
    assert labeled.returncode == 0 and labeled.stdout.strip() == f"{sweep_id} endless: fig=2", labeled
    canceled = nclab(embedded, "cancel", sweep_id)
    assert canceled.returncode == 0 and canceled.stdout.startswith(f"sweep {sweep_id}:")
    members = embedded.client.get(f"/sweeps/{sweep_id}").json()["members"]
    assert {embedded.client.get(f"/experiments/{m}").json()["name"] for m in members} == {"endless"}
    relabeled = nclab(embedded, "label", members[0], "--clear-name", "--untag", "fig", "--tag", "one=1")
    assert relabeled.stdout.strip() == f"{members[0]} (no name): one=1", relabeled
    assert [wait_for_status(embedded.client, m, {"canceled", "succeeded", "failed"}, 30)["status"]
            for m in members] == ["canceled"] * 3


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """NCLAB_DATA_DIR holding a file of every name the data sets need: a spec validates
    against their presence, and these tests read no data."""
    from service.datasets import DATASETS
    from service.settings import get_settings

    for info in DATASETS.values():
        for path in info.missing_files(tmp_path):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    monkeypatch.setenv("NCLAB_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def _arm(spec: dict) -> tuple:
    """What tells the seed paper's arms apart (bench/paper.py groups by it)."""
    return spec["normalization"], spec["logit_scale"], spec["weight_decay_scope"]


@pytest.mark.parametrize(("name", "members"), [
    ("ufm.json", 1), ("landscape-probe.json", 1), ("digits-three-modes.json", 9), ("losses.json", 18),
    ("layers.json", 6),
    ("paper/fast-collapse-fashion-mnist-mlp.json", 21), ("paper/fast-collapse-mnist-resnet18.json", 21),
    ("paper/paper-settings-cifar10-resnet18.json", 6), ("paper/paper-settings-cifar100-resnet18.json", 6)])
def test_each_example_is_a_valid_request(data_dir, name, members):
    from service import sweeps
    from service.schemas import LabelledSubmission

    document = json.loads((EXAMPLES / name).read_text())
    if "base" in document:
        specs = sweeps.members(sweeps.SweepRequest.model_validate(document))
        # Every member of a comparison differs from the others in what it varies.
        assert len(specs) == members and len({json.dumps(spec, sort_keys=True) for spec in specs}) == members
    else:
        labelled = LabelledSubmission.model_validate(document if "spec" in document else {"spec": document})
        assert labelled.spec.kind == "ufm" and members == 1


@pytest.mark.parametrize("name", ["fast-collapse-fashion-mnist-mlp.json", "fast-collapse-mnist-resnet18.json"])
def test_the_fast_collapse_sweeps_hold_the_papers_arms_each_with_its_settings(data_dir, name):
    from service import sweeps

    specs = sweeps.members(sweeps.SweepRequest.model_validate_json((EXAMPLES / "paper" / name).read_text()))
    arms: dict[tuple, list[dict]] = {}
    for spec in specs:
        arms.setdefault(_arm(spec), []).append(spec)
    normalized = {arm: members for arm, members in arms.items() if arm[0] == "normalized"}
    assert sorted(arm[1] for arm in normalized) == [1, 3, 5, 10, 30]
    assert all(sorted(m["seed"] for m in members) == [0, 1, 2] for members in arms.values())
    # Normalized as the paper trains it: nothing decayed.
    assert all(m["weight_decay_scope"] == "none" for members in normalized.values() for m in members)
    # Regularized with the paper's decays (lambda = 1e-4 on W and, summed, on the features) and with ours.
    paper, ours = arms[("regularized", 10.0, "classifier")], arms[("regularized", 10.0, "all")]
    assert {(m["weight_decay"], m["feature_decay"], m["feature_decay_reduction"]) for m in paper} == {
        (1e-4, 1e-4, "sum")}
    assert {(m["weight_decay"], m["feature_decay"], m["feature_decay_reduction"]) for m in ours} == {
        (5e-4, 5e-4, "mean")}
    # One budget for all: the same schedule, data and epochs in every arm.
    shared = ("dataset", "architecture", "d", "n_per_class", "epochs", "lr", "lr_milestones", "batch_size")
    assert len({tuple(json.dumps(spec[field]) for field in shared) for spec in specs}) == 1


def test_whoami_and_audit_with_keys_and_roles(tmp_path):
    """`nclab whoami` and `nclab audit` (and the client's me and audit) against `nclab serve` with keys."""
    from service.client import Client, Forbidden
    from tests.conftest import make_processes, running
    from tests.support import free_port, wait_ready

    with running(make_processes(tmp_path)) as processes:
        processes.env["NCLAB_API_KEYS"] = "bob:bob-key, root:root-key:admin"
        port = free_port()
        serve = processes.start("serve", "--port", str(port), name="serve")
        server = SimpleNamespace(base_url=f"http://127.0.0.1:{port}")
        wait_ready(server.base_url, serve)
        with Client(server.base_url, api_key="bob-key") as bob:
            submitted = bob.submit(UFM)["id"]
            assert bob.me() == {"owner": "bob", "role": "member"}
            with pytest.raises(Forbidden, match=r"bob \(member\) may not read the audit: only an admin may"):
                list(bob.audit())
        with Client(server.base_url, api_key="root-key") as root:
            assert [(row["owner"], row["action"], row["target"]) for row in root.audit(where="owner = 'bob'")] == [
                ("bob", "audit.read", None), ("bob", "experiment.submit", submitted)]
            assert len(list(csv.reader(io.StringIO(root.audit_csv(where="status = 202"))))) == 2

        def as_key(key: str, *args: str) -> subprocess.CompletedProcess:
            return nclab(server, *args, "--api-key", key)

        assert as_key("bob-key", "whoami").stdout.strip() == "bob (member)"
        assert as_key("root-key", "whoami").stdout.strip() == "root (admin)"
        refused = as_key("bob-key", "audit")
        assert refused.returncode == 2 and "403: bob (member) may not read the audit" in refused.stderr
        table = as_key("root-key", "audit", "--where", "status = 403")
        assert table.returncode == 0 and "2 audit rows" in table.stdout and "audit.read" in table.stdout
        exported = list(csv.DictReader(io.StringIO(as_key("root-key", "audit", "--csv", "--limit", "0").stdout)))
        assert [(row["owner"], row["action"], row["status"]) for row in exported] == [
            ("bob", "audit.read", "403"), ("bob", "audit.read", "403"), ("bob", "experiment.submit", "202")]
