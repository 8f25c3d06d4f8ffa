"""The lab's commands, built on service.client: submit, sweep, status, wait, cancel, label, ls, history, compare,
artifacts, download, whoami, audit.

They talk to a running service (``--url``, else NCLAB_URL, else http://127.0.0.1:8000)
and import nothing of the server: they work in a client-only install (``pip install
'nclab[client]'``), where the server's commands that service/cli.py adds to the same
``nclab`` command say which extra they need instead (``NclabGroup``). Exit codes, for
scripts: 0 succeeded (or nothing to wait for), 1 an experiment failed, 3 one was canceled
(and none failed), 2 a usage or HTTP error, its message on stderr. Tables and results go
to stdout, progress to stderr.
"""

import copy
import csv
import functools
import importlib.metadata
import io
import itertools
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import EllipsisType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from service.client import STATUSES, TERMINAL_STATUSES, Client, NclabError, WaitTimeout

# Piped output keeps one row per line (rich would fold tables to 80 columns), and a message's path whole.
out = Console() if sys.stdout.isatty() else Console(width=400)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=400)

SUCCEEDED, FAILED, USAGE_OR_HTTP, CANCELED = 0, 1, 2, 3
# The columns of `nclab ls` and `nclab status`: (heading, dotted path in an experiment).
LIST_COLUMNS = [
    ("id", "id"),
    ("name", "name"),
    ("owner", "owner"),
    ("kind", "spec.kind"),
    ("normalization", "spec.normalization"),
    ("data", "spec.dataset"),
    ("arch", "spec.architecture"),
    ("K", "spec.K"),
    ("d", "spec.d"),
    ("status", "status"),
    ("nc1", "result.nc1"),
    ("nc2_etf_w", "result.nc2_etf_w"),
    ("test_acc", "result.test_accuracy"),
    ("created", "created_at"),
]
COMPARE_STATISTICS = ("mean", "std", "min", "median", "max")
HISTORY_METRICS = ("loss", "accuracy", "nc1", "nc2_etf_m", "nc2_etf_w", "nc3", "test_accuracy")

Url = Annotated[
    str | None,
    typer.Option("--url", envvar="NCLAB_URL", show_envvar=True, help="the service [default: http://127.0.0.1:8000]"),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="NCLAB_API_KEY", show_envvar=True, help="an API key, when the service requires one"
    ),
]
Timeout = Annotated[float | None, typer.Option(help="give up waiting after this many seconds (exit 2)")]
Where = Annotated[str | None, typer.Option(help="a filter, e.g. \"spec.dataset = 'digits' and result.nc1 < 0.5\"")]


@contextmanager
def _client(url: str | None, api_key: str | None) -> Iterator[Client]:
    """A client whose errors end the command with exit code 2 and the problem's detail on stderr."""
    try:
        with Client(url, api_key=api_key) as client:
            yield client
    except NclabError as exc:
        err.print(f"nclab: error: {exc}", markup=False, highlight=False)
        for problem in exc.errors:
            if problem.get("field"):
                err.print(f"  {problem['field']}: {problem['message']}", markup=False, highlight=False)
        raise typer.Exit(USAGE_OR_HTTP) from None
    except WaitTimeout as exc:
        err.print(f"nclab: {exc}", markup=False)
        raise typer.Exit(USAGE_OR_HTTP) from None


def _read_json(path: str) -> Any:
    """A JSON document from a file, or from stdin for '-'; a usage error if it is neither."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
        return json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"{path}: {exc}") from None


def _field(experiment: dict, path: str) -> Any:
    value: Any = experiment
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and len(value) > 19 and value[10:11] == "T":  # an ISO timestamp
        return value[:19].replace("T", " ")
    return str(value)


def _exit_code(statuses: list[str]) -> int:
    if "failed" in statuses:
        return FAILED
    if "canceled" in statuses:
        return CANCELED
    return SUCCEEDED


def _table(title: str | None, headings: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title, show_edge=False, header_style="bold")
    for heading in headings:
        table.add_column(heading, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(value) for value in row))
    return table


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
        console=err,
    )


def _print_experiment(experiment: dict) -> None:
    result = experiment.get("result") or {}
    rows = [
        ["id", experiment["id"]],
        ["name", experiment.get("name")],
        ["status", experiment["status"]],
        ["progress", experiment["progress"]],
    ]
    if experiment.get("priority"):
        rows.append(["priority", experiment["priority"]])
    if experiment.get("place"):  # a queued experiment's place in its queue
        rows.append(["place", experiment["place"]["text"]])
    if experiment.get("waiting"):
        rows.append(["waiting", experiment["waiting"]])
    rows += [[key, value] for key, value in result.items()]
    if experiment.get("error"):
        rows.append(["error", experiment["error"]])
    out.print(_table(None, ["field", "value"], rows))


def _follow(client: Client, experiment_id: str, timeout: float | None) -> dict:
    """Wait for one experiment with a progress bar showing its latest loss and nc1."""
    last_step: int | None = None
    with _progress() as progress:
        task = progress.add_task("running", total=1.0, detail="")

        def show(states: list[dict]) -> None:
            nonlocal last_step
            experiment = states[0]
            rows = client.history(experiment["id"], after=last_step)
            detail = progress.tasks[task].fields["detail"]
            if rows:
                last_step, latest = rows[-1]["step"], rows[-1]
                detail = "  ".join(f"{key} {_cell(latest.get(key))}" for key in ("loss", "nc1") if key in latest)
                detail = f"step {last_step}  {detail}"
            progress.update(task, description=experiment["status"], completed=experiment["progress"], detail=detail)

        return client.wait(experiment_id, timeout=timeout, on_progress=show)


def submit(
    spec_file: Annotated[
        str, typer.Argument(metavar="SPEC.json|-", help='a spec, bare or {"spec", "name", "tags"}; \'-\' reads stdin')
    ],
    wait: Annotated[bool, typer.Option("--wait", help="follow it to the end; the exit code says how it ended")] = False,
    name: Annotated[str | None, typer.Option(help="a name (over the file's)")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="key=value, repeatable (over the file's)")] = None,
    priority: Annotated[
        int | None, typer.Option(min=-10, max=10, help="-10..10 (over the file's); above 0 for admins only")
    ] = None,
    timeout: Timeout = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Submit one experiment; prints its id (with --wait, its result)."""
    document = _read_json(spec_file)
    labelled = isinstance(document, dict) and "spec" in document
    spec = document["spec"] if labelled else document
    tags = {**(document.get("tags") or {} if labelled else {}), **_tags(tag)}
    with _client(url, api_key) as client:
        experiment = client.submit(
            spec,
            name=name or (document.get("name") if labelled else None),
            tags=tags or None,
            priority=priority if priority is not None else (document.get("priority") if labelled else None),
        )
        out.print(experiment["id"], highlight=False)
        if wait:
            final = _follow(client, experiment["id"], timeout)
            _print_experiment(final)
            raise typer.Exit(_exit_code([final["status"]]))


def _tags(pairs: list[str] | None) -> dict[str, str]:
    tags = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--tag {pair!r}: write key=value")
        tags[key] = value
    return tags


def sweep(
    sweep_file: Annotated[
        str, typer.Argument(metavar="SWEEP.json|-", help='{"name", "tags", "base", "variants", "grid"}')
    ],
    wait: Annotated[bool, typer.Option("--wait", help="follow every member to the end")] = False,
    timeout: Timeout = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Submit a sweep (base x variants x grid); prints its id and size (with --wait, how its members ended)."""
    document = _read_json(sweep_file)
    if not isinstance(document, dict):
        raise typer.BadParameter(f"{sweep_file}: a sweep is a JSON object with 'base'")
    unknown = set(document) - {"name", "tags", "priority", "base", "variants", "grid"}
    if unknown:
        raise typer.BadParameter(f"{sweep_file}: unknown keys {sorted(unknown)}")
    with _client(url, api_key) as client:
        created = client.sweep(**document)
        out.print(f"sweep {created['id']}: {created['size']} experiments", highlight=False)
        if wait:
            with _progress() as progress:
                tasks = {status: progress.add_task(status, total=created["size"], detail="") for status in STATUSES}

                def show(state: dict) -> None:
                    for status, task in tasks.items():
                        progress.update(task, completed=state["status_counts"][status])

                final = client.wait_sweep(created["id"], timeout=timeout, on_progress=show)
            counts = final["status_counts"]
            out.print(", ".join(f"{counts[s]} {s}" for s in TERMINAL_STATUSES), highlight=False)
            raise typer.Exit(_exit_code([s for s in TERMINAL_STATUSES if counts[s]]))


def status(
    experiment_id: Annotated[str, typer.Argument(metavar="ID")],
    as_json: Annotated[bool, typer.Option("--json", help="the experiment as the API returns it")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Show an experiment: status, progress, result, error. Exit code as for wait once it has finished."""
    with _client(url, api_key) as client:
        experiment = client.get(experiment_id)
    if as_json:
        out.print_json(data=experiment)
    else:
        _print_experiment(experiment)
    raise typer.Exit(_exit_code([experiment["status"]]))


def wait(
    experiment_ids: Annotated[list[str], typer.Argument(metavar="ID...")],
    timeout: Timeout = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Wait until every experiment has finished; prints each one's status. Exit 1 if any failed, 3 if canceled."""
    with _client(url, api_key) as client, _progress() as progress:
        task = progress.add_task("finished", total=len(set(experiment_ids)), detail="")

        def show(states: list[dict]) -> None:
            progress.update(task, completed=sum(s["status"] in TERMINAL_STATUSES for s in states))

        final = client.wait(list(experiment_ids), timeout=timeout, on_progress=show)
    for experiment in final:
        out.print(f"{experiment['id']} {experiment['status']}", highlight=False)
    raise typer.Exit(_exit_code([experiment["status"] for experiment in final]))


def cancel(
    resource_id: Annotated[str, typer.Argument(metavar="ID", help="an experiment's or a sweep's id")],
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Cancel an experiment, or every unfinished member of a sweep."""
    with _client(url, api_key) as client:
        try:
            experiment = client.cancel(resource_id)
        except NclabError as exc:
            if exc.status != 404:
                raise
            swept = client.cancel_sweep(resource_id)
            counts = swept["status_counts"]
            out.print(
                f"sweep {resource_id}: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]), highlight=False
            )
            return
    stopping = " (stopping)" if experiment["status"] == "running" else ""
    out.print(f"{experiment['id']} {experiment['status']}{stopping}", highlight=False)


def label(
    resource_id: Annotated[str, typer.Argument(metavar="ID", help="an experiment's or a sweep's id")],
    name: Annotated[str | None, typer.Option(help="the new name")] = None,
    clear_name: Annotated[bool, typer.Option("--clear-name", help="remove the name")] = False,
    tag: Annotated[list[str] | None, typer.Option(help="key=value, merged into the tags (repeatable)")] = None,
    untag: Annotated[list[str] | None, typer.Option(help="a tag's key to remove (repeatable)")] = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Rename or retag an experiment, or a sweep and its members (its owner's members and the admins may)."""
    if name is not None and clear_name:
        raise typer.BadParameter("--name and --clear-name: give one")
    new_name: str | EllipsisType | None = None if clear_name else (name if name is not None else ...)
    tags: dict[str, str | None] = {**_tags(tag), **dict.fromkeys(untag or [])}
    with _client(url, api_key) as client:
        try:
            labeled = client.relabel(resource_id, new_name, tags)
        except NclabError as exc:
            if exc.status != 404:
                raise
            labeled = client.relabel_sweep(resource_id, new_name, tags)
    tag_text = " ".join(f"{key}={value}" for key, value in labeled["tags"].items()) or "no tags"
    out.print(f"{labeled['id']} {labeled['name'] or '(no name)'}: {tag_text}", highlight=False)


def ls(
    where: Where = None,
    order_by: Annotated[str | None, typer.Option(help="e.g. result.nc1,-created_at [default: -created_at]")] = None,
    limit: Annotated[int, typer.Option(help="at most this many rows; 0 for all")] = 20,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV on stdout, every column")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines on stdout, one experiment each")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """List experiments matching a filter, as a table, CSV or JSON lines."""
    if as_csv and as_json:
        raise typer.BadParameter("--csv or --json, not both")
    with _client(url, api_key) as client:
        if as_csv:
            _write_csv_rows(client.search_csv(where, order_by), limit)
            return
        experiments = _first(client.search, where, order_by, limit)
    if as_json:
        for experiment in experiments:
            sys.stdout.write(json.dumps(experiment) + "\n")
        return
    rows = [[_field(e, path) for _heading, path in LIST_COLUMNS] for e in experiments]
    out.print(_table(f"{len(rows)} experiments", [heading for heading, _path in LIST_COLUMNS], rows))


def _first(pages, where: str | None, order_by: str | None, limit: int) -> list[dict]:
    """The first ``limit`` items (0: all) of a paged listing (Client.search, Client.audit), no page past them."""
    page_size = min(limit, 500) if limit else 500
    return list(itertools.islice(pages(where, order_by, page_size=page_size), limit or None))


def _write_csv_rows(text: str, limit: int) -> None:
    """The header and the first ``limit`` records (all for 0) of a CSV document, to stdout."""
    if not limit:
        sys.stdout.write(text)
        return
    writer = csv.writer(sys.stdout, lineterminator="\r\n")  # as the server writes it (RFC 4180)
    for index, record in enumerate(csv.reader(io.StringIO(text))):
        if index > limit:
            break
        writer.writerow(record)


def history(
    experiment_id: Annotated[str, typer.Argument(metavar="ID")],
    as_csv: Annotated[bool, typer.Option("--csv", help="every metric as CSV on stdout")] = False,
    plot: Annotated[Path | None, typer.Option(help="write a PNG of the metrics here")] = None,
    metric: Annotated[str, typer.Option(help="comma-separated metrics for the plot")] = "nc1",
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """An experiment's metric history: a table of the main metrics, all of them as CSV, or a plot."""
    with _client(url, api_key) as client:
        if plot is not None:
            plot.write_bytes(client.history_png(experiment_id, metric))
            err.print(f"wrote {plot}", highlight=False)
        if as_csv:
            sys.stdout.write(client.history_csv(experiment_id))
        elif plot is None:
            rows = client.history(experiment_id)
            keys = [key for key in HISTORY_METRICS if any(key in row for row in rows)]
            out.print(
                _table(
                    f"{len(rows)} steps", ["step", *keys], [[row["step"], *(row.get(k) for k in keys)] for row in rows]
                )
            )


def compare(
    metric: Annotated[str, typer.Option(help="comma-separated result metrics; the plot shows the first's history")],
    where: Where = None,
    group_by: Annotated[str | None, typer.Option(help="comma-separated fields, e.g. spec.normalization")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="the aggregate as CSV on stdout")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="write the first metric's curves (mean ± std per group) here")
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Compare groups of experiments: per group, count and mean, std, min, median, max of each metric."""
    metrics = [name.strip() for name in metric.split(",") if name.strip()]
    with _client(url, api_key) as client:
        if as_csv:
            sys.stdout.write(client.aggregate_csv(where, group_by, ",".join(metrics)))
        else:
            items = client.aggregate(where, group_by, ",".join(metrics))
            groups = list(items[0]["group"]) if items else []
            headings = [*groups, "count", "metric", "n", *COMPARE_STATISTICS]
            rows = [
                [
                    *item["group"].values(),
                    item["count"],
                    metric,
                    item["metrics"][metric]["n"],
                    *(item["metrics"][metric][stat] for stat in COMPARE_STATISTICS),
                ]
                for item in items
                for metric in metrics
            ]
            out.print(_table(None, headings, rows))
        if plot is not None:
            plot.write_bytes(client.curves_png(where, group_by, metrics[0]))
            err.print(f"wrote {plot}", highlight=False)


def artifacts(
    experiment_id: Annotated[str, typer.Argument(metavar="ID")],
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """List the files an experiment kept: name, bytes, sha256 (its first 12 digits), media type."""
    with _client(url, api_key) as client:
        items = client.artifacts(experiment_id)
    rows = [[item["name"], item["bytes"], item["sha256"][:12], item["media_type"]] for item in items]
    out.print(_table(f"{len(rows)} artifacts", ["name", "bytes", "sha256", "media type"], rows))


def download(
    experiment_id: Annotated[str, typer.Argument(metavar="ID")],
    name: Annotated[str, typer.Argument(metavar="NAME", help="e.g. model.safetensors (see nclab artifacts ID)")],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="the file, or a folder, to write [default: NAME in this folder]"),
    ] = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Download one of an experiment's files; it appears only once its sha256 matches the API's."""
    with _client(url, api_key) as client:
        try:
            written = client.download(experiment_id, name, output or Path(name))
        except OSError as exc:
            raise typer.BadParameter(str(exc), param_hint="'--output'") from None
    err.print(f"wrote {written}", highlight=False)


def whoami(url: Url = None, api_key: ApiKey = None) -> None:
    """Who the API key names, and its role: reader (reads), member (submits; changes its own work) or admin."""
    with _client(url, api_key) as client:
        me = client.me()
    out.print(f"{me['owner']} ({me['role']})", highlight=False)


AUDIT_COLUMNS = ("at", "owner", "role", "action", "target", "client", "status", "detail")


def audit(
    where: Annotated[
        str | None, typer.Option(help="a filter of the audit's fields, e.g. \"status = 403 and owner = 'bob'\"")
    ] = None,
    order_by: Annotated[str | None, typer.Option(help="e.g. owner,-at [default: -at]")] = None,
    limit: Annotated[int, typer.Option(help="at most this many rows; 0 for all")] = 50,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV on stdout, every column")] = False,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """The audit (admins only): every change (submit, sweep, cancel, relabel) and every refusal (401, 403, 429)."""
    with _client(url, api_key) as client:
        if as_csv:
            _write_csv_rows(client.audit_csv(where, order_by), limit)
            return
        rows = [[entry[column] for column in AUDIT_COLUMNS] for entry in _first(client.audit, where, order_by, limit)]
    out.print(_table(f"{len(rows)} audit rows", list(AUDIT_COLUMNS), rows))


def uploads(
    owner: Annotated[str | None, typer.Option(help="only this owner's uploads")] = None,
    limit: Annotated[int, typer.Option(help="at most this many rows; 0 for all")] = 50,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """List uploaded files of features, newest first: id, owner, bytes, what they hold, when."""
    with _client(url, api_key) as client:
        items = list(itertools.islice(client.uploads(owner), limit or None))
    rows = [
        [item["id"], item["owner"], item["bytes"], _holds(item["layout"]), item["classes"], item["created_at"]]
        for item in items
    ]
    out.print(_table(f"{len(rows)} uploads", ["id", "owner", "bytes", "holds", "K", "created"], rows))


def _holds(layout: dict) -> str:
    steps = f"{layout['steps']} x " if layout["steps"] > 1 else ""
    return f"{steps}{layout['samples']} x {layout['dim']} {layout['format']}"


def delete_upload(
    upload_id: Annotated[str, typer.Argument(metavar="ID")],
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Delete an uploaded file (yours, or any as an admin); refused while an unfinished analysis reads it."""
    with _client(url, api_key) as client:
        client.delete_upload(upload_id)
    err.print(f"deleted upload {upload_id}", highlight=False)


ArrayFile = Annotated[Path | None, typer.Option(help="a .npy file (with --labels)", exists=True, dir_okay=False)]


def analyze(
    features: Annotated[
        Path,
        typer.Argument(
            metavar="FEATURES",
            help="a safetensors or .npz file holding features, labels, ... (uploaded as it is); or, with --labels, "
            "a .npy of the features (N x d, or S x N x d for S checkpoints)",
            exists=True,
            dir_okay=False,
        ),
    ],
    labels: ArrayFile = None,
    classifier: ArrayFile = None,
    bias: ArrayFile = None,
    test_features: ArrayFile = None,
    test_labels: ArrayFile = None,
    model: Annotated[str | None, typer.Option(help="what was analysed, e.g. vit_b16 (searchable: spec.model)")] = None,
    dataset: Annotated[str | None, typer.Option(help="e.g. imagenet (spec.dataset)")] = None,
    epoch: Annotated[int | None, typer.Option(help="the epoch the features are from (spec.epoch)")] = None,
    logit_scale: Annotated[float | None, typer.Option(help="the logits are logit_scale * W h + b [default: 1]")] = None,
    name: Annotated[str | None, typer.Option(help="a name")] = None,
    tag: Annotated[list[str] | None, typer.Option(help="key=value, repeatable")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow it to the end; the exit code says how it ended")] = False,
    timeout: Timeout = None,
    url: Url = None,
    api_key: ApiKey = None,
) -> None:
    """Analyse features trained elsewhere: upload them and queue their metric catalogue; prints its id."""
    arrays = {"classifier": classifier, "bias": bias, "test_features": test_features, "test_labels": test_labels}
    given = [f"--{key.replace('_', '-')}" for key, path in arrays.items() if path is not None]
    if labels is None and given:
        raise typer.BadParameter(f"{', '.join(given)} go with --labels: FEATURES is then a .npy", param_hint="FEATURES")
    spec = {"model": model, "dataset": dataset, "epoch": epoch, "logit_scale": logit_scale}
    spec = {key: value for key, value in spec.items() if value is not None}
    with _client(url, api_key) as client:
        if labels is None:
            upload = client.upload(features)
            experiment = client.submit(
                {"kind": "analysis", "source": {"upload": upload["id"]}, **spec}, name=name, tags=_tags(tag) or None
            )
        else:
            import numpy as np  # the analyze extra's: a client-only install has none

            def load(path: Path | None):
                # Memory-mapped: safetensors copies it into the file a block at a time.
                return None if path is None else np.load(path, mmap_mode="r", allow_pickle=False)

            experiment = client.analyze(
                load(features),
                load(labels),
                **{key: load(path) for key, path in arrays.items()},
                name=name,
                tags=_tags(tag) or None,
                **spec,
            )
        out.print(experiment["id"], highlight=False)
        if wait:
            final = _follow(client, experiment["id"], timeout)
            _print_experiment(final)
            raise typer.Exit(_exit_code([final["status"]]))


COMMANDS = (
    submit,
    sweep,
    status,
    wait,
    cancel,
    label,
    ls,
    history,
    compare,
    artifacts,
    download,
    whoami,
    audit,
    analyze,
    uploads,
    delete_upload,
)
DISTRIBUTION = "nclab"
# The extra that the server's commands need: the server's, but `serve` runs a worker too, and a worker runs torch.
SERVER_EXTRA = "server"
COMMAND_EXTRAS = {"serve": "worker", "worker": "worker"}


def register(app: typer.Typer) -> None:
    """Add the lab's commands to the ``nclab`` app (whose ``cls`` should be ``NclabGroup``)."""
    for command in COMMANDS:
        app.command()(command)


def missing_requirements(extra: str = SERVER_EXTRA) -> list[str]:
    """The distributions that nclab's ``extra`` requires (with the extras it names) and that are not installed.

    Read from nclab's installed metadata, so pyproject.toml stays the one list; empty when
    nclab itself is not installed (a bare source checkout), so that nothing is refused then.
    """
    try:
        requirements = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return []
    missing: list[str] = []
    extras, seen = [extra], set()
    while extras:
        wanted = extras.pop()
        seen.add(wanted)
        for requirement in requirements:
            name, _, marker = requirement.partition(";")
            if f'extra == "{wanted}"' not in marker.replace("'", '"'):
                continue
            parsed = re.match(r"\s*([A-Za-z0-9._-]+)\s*(\[([^]]*)\])?", name)
            if parsed is None:
                continue
            distribution, _, named = parsed.groups()
            if distribution == DISTRIBUTION:  # e.g. the worker's nclab[server]
                extras.extend(e.strip() for e in (named or "").split(",") if e.strip() and e.strip() not in seen)
                continue
            try:
                importlib.metadata.distribution(distribution)
            except importlib.metadata.PackageNotFoundError:
                if distribution not in missing:
                    missing.append(distribution)
    return missing


def _needs(extra: str, command_path: str, callback):
    @functools.wraps(callback)
    def checked(*args, **kwargs):
        missing = missing_requirements(extra)
        if missing:
            typer.echo(
                f"{command_path}: needs the {extra} extra: pip install 'nclab[{extra}]' "
                f"(missing: {', '.join(missing)})",
                err=True,
            )
            raise typer.Exit(USAGE_OR_HTTP)
        return callback(*args, **kwargs)

    return checked


def _with_extra_check(command, command_path: str, extra: str):
    """A copy of a server command (or group of them) that checks for its extra before it runs.

    The check wraps the callbacks, not the parsing, so ``--help`` still works without the extra.
    """
    command = copy.copy(command)
    if getattr(command, "commands", None) is not None:  # a group, e.g. `nclab data`
        command.commands = {
            name: _with_extra_check(sub, f"{command_path} {name}", extra) for name, sub in command.commands.items()
        }
    elif command.callback is not None:
        command.callback = _needs(extra, command_path, command.callback)
    return command


class NclabGroup(TyperGroup):
    """The ``nclab`` command: the lab's commands run on the client's dependencies alone; every
    other command is the server's and, without its extra (``COMMAND_EXTRAS``, else the server
    extra), ends with a message naming it (exit 2) instead of an ImportError.
    ``typer.Typer(cls=NclabGroup)``."""

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is None or cmd_name in {c.__name__ for c in COMMANDS}:
            return command
        return _with_extra_check(command, f"nclab {cmd_name}", COMMAND_EXTRAS.get(cmd_name, SERVER_EXTRA))
