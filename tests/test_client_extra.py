"""The client apart from the server: ``pip install 'nclab[client]'`` and what it brings.

The slow tests build a fresh venv with the client extra alone (the real dependency set,
from the package index or pip's cache) and run the client and ``nclab`` there; the fast
ones check the same boundaries in the test venv.
"""

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.client import cli as client_cli

REPO = Path(__file__).resolve().parent.parent
CLIENT_COMMANDS = ("submit", "sweep", "status", "wait", "cancel", "ls", "history", "compare")
# The server's commands and the extra each needs (the worker's includes the server's).
SERVER_COMMANDS = {("serve",): "worker", ("api",): "server", ("worker",): "worker", ("migrate",): "server",
                   ("data", "prepare"): "server"}
# What the server and the worker import, and a client-only install must not bring.
SERVER_MODULES = ("fastapi", "uvicorn", "starlette", "celery", "sqlalchemy", "alembic", "psycopg", "pydantic_settings",
                  "lark", "matplotlib", "orjson", "torch", "numpy", "sklearn")
UFM = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}


def refusal(command: tuple[str, ...], extra: str) -> str:
    """How ``nclab COMMAND`` begins to say that it needs ``extra``."""
    return f"nclab {' '.join(command)}: needs the {extra} extra: pip install 'nclab[{extra}]' (missing: "


def _env(**extra: str) -> dict:
    """The environment without PYTHONPATH or NCLAB_*: nothing may reach the source tree or a test's settings."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("NCLAB_")}
    return {**env, "COLUMNS": "200", **extra}


def _run(*args, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=_env(**env),
                          timeout=timeout)


def _build_wheel(source: Path, wheels: Path) -> Path:
    """nclab's wheel: with this venv's setuptools when it is new enough (seconds faster), else by pip, isolated."""
    try:
        setuptools_major = int(importlib.metadata.version("setuptools").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        setuptools_major = 0
    if setuptools_major >= 68:  # pyproject's build-system requirement
        built = _run(sys.executable, "-c", f"import setuptools.build_meta as b; b.build_wheel({str(wheels)!r})",
                     cwd=source, timeout=300)
    else:
        built = _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", wheels, source,
                     cwd=source, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("nclab-*.whl")
    return wheel


def _build_client_venv(root: Path) -> Path:
    """A fresh venv holding nclab[client] and what it requires, nothing else; its bin folder.

    nclab is built as a wheel from a copy of the sources (so nothing is written into the
    working tree) and installed with this venv's pip (``pip --python``), which spares
    the new venv a pip of its own. Most of the time is pip reading the package index.
    """
    started = time.monotonic()
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("service", "worker"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheel = _build_wheel(source, root / "wheels")
    venv = root / "venv"
    created = _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    assert created.returncode == 0, created.stderr
    # --no-compile: byte-compiling pygments, pydantic and the rest costs more than the few modules imported here.
    installed = _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet",
                     "--no-compile", f"{wheel}[client]", cwd=root, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "does not provide the extra" not in installed.stderr
    print(f"client-only venv built in {time.monotonic() - started:.1f} s")
    return venv / "bin"


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Iterator[Callable[[], Path]]:
    """Waits for the client-only venv's bin folder; built in the background from the first request on,
    so that the `embedded` server starts meanwhile (it is mostly waiting on the package index)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        building = pool.submit(_build_client_venv, tmp_path_factory.mktemp("client-only"))
        yield building.result


# First, so that the embedded server starts while the venv is built.
@pytest.mark.slow
def test_the_client_only_nclab_drives_a_real_server(client_venv, embedded, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"spec": UFM, "name": "client-only"}))
    bin_dir = client_venv()
    submitted = _run(bin_dir / "nclab", "submit", spec, cwd=tmp_path, NCLAB_URL=embedded.base_url)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    experiment_id = submitted.stdout.strip()
    waited = _run(bin_dir / "python", "-c",
                  "from service.client import Client\n"
                  f"with Client({embedded.base_url!r}) as nclab:\n"
                  f"    (done,) = nclab.wait([{experiment_id!r}], timeout=60)\n"
                  "    print(done['name'], done['status'])\n",
                  cwd=tmp_path)
    assert waited.returncode == 0 and waited.stdout.split() == ["client-only", "succeeded"], waited.stderr
    shown = _run(bin_dir / "nclab", "status", experiment_id, "--json", cwd=tmp_path, NCLAB_URL=embedded.base_url)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "succeeded"


@pytest.mark.slow
def test_a_client_only_install_has_the_client_and_none_of_the_server(client_venv):
    bin_dir = client_venv()
    probe = ("import importlib, json, sys\n"
             "absent = []\n"
             f"for name in {SERVER_MODULES!r}:\n"
             "    try:\n"
             "        importlib.import_module(name)\n"
             "    except ImportError:\n"
             "        absent.append(name)\n"
             "from service.client import Client, NclabError\n"
             "import service.cli\n"
             "print(json.dumps({'absent': absent, 'client': Client.__module__,\n"
             "                  'file': sys.modules['service'].__file__}))\n")
    checked = _run(bin_dir / "python", "-c", probe, cwd=bin_dir)
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout)
    assert report["absent"] == list(SERVER_MODULES)
    assert report["client"] == "service.client.core"
    assert report["file"].startswith(str(bin_dir.parent))  # the installed copy, not the working tree


# The server's commands, each refused and each with its help, in one process (typer's CliRunner).
REFUSALS = f"""
from typer.testing import CliRunner
from service.cli import app

runner = CliRunner()
for command, message in {[(command, refusal(command, extra)) for command, extra in SERVER_COMMANDS.items()]!r}:
    refused = runner.invoke(app, list(command))
    assert refused.exit_code == 2, (command, refused.output)
    assert message in refused.output and "fastapi" in refused.output, refused.output
    assert refused.exception is None or isinstance(refused.exception, SystemExit), refused.exception
    helped = runner.invoke(app, [*command, "--help"])
    assert helped.exit_code == 0 and "Usage:" in helped.output, (command, helped.output)
print("ok")
"""


@pytest.mark.slow
def test_the_client_only_nclab_has_the_lab_commands_and_names_the_server_extra(client_venv, tmp_path):
    bin_dir = client_venv()
    shown = _run(bin_dir / "nclab", "--help", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for command in CLIENT_COMMANDS:
        assert f" {command} " in shown.stdout
    submit = _run(bin_dir / "nclab", "submit", "--help", cwd=tmp_path)
    assert submit.returncode == 0 and "Usage: nclab submit" in submit.stdout, submit.stderr
    refused = _run(bin_dir / "nclab", "serve", cwd=tmp_path, NCLAB_DATA_DIR=str(tmp_path / "data"))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refusal(("serve",), "worker") in refused.stderr
    assert "torch" in refused.stderr and "fastapi" in refused.stderr  # among the missing, the server's too
    assert "Traceback" not in refused.stdout + refused.stderr
    assert not (tmp_path / "data").exists()
    others = _run(bin_dir / "python", "-c", REFUSALS, cwd=tmp_path)
    assert others.returncode == 0 and others.stdout.strip() == "ok", others.stdout + others.stderr


# The same boundaries, fast, in the test venv.

def test_the_client_and_the_nclab_command_import_nothing_of_the_server():
    probe = ("import sys\n"
             "import service.cli, service.client, service.client.cli\n"
             f"print(sorted(m for m in {SERVER_MODULES + ('service.settings', 'service.schemas', 'service.db')!r} "
             "if m in sys.modules))\n")
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=_env(),
                              timeout=60)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "[]"


def test_the_client_knows_the_statuses_the_api_writes():
    from service import schemas
    from service.client import STATUSES, TERMINAL_STATUSES

    assert STATUSES == schemas.STATUSES and TERMINAL_STATUSES == schemas.TERMINAL_STATUSES


def test_a_server_command_without_its_extra_says_which_extra_it_needs(monkeypatch):
    from typer.testing import CliRunner

    from service.cli import app

    monkeypatch.setattr(client_cli, "missing_requirements", lambda extra: [f"{extra}-package", "fastapi"])
    runner = CliRunner()
    for command, extra in SERVER_COMMANDS.items():
        refused = runner.invoke(app, list(command))
        assert refused.exit_code == 2, (command, refused.output)
        assert f"{refusal(command, extra)}{extra}-package, fastapi)" in refused.output
        assert runner.invoke(app, [*command, "--help"]).exit_code == 0
    # The lab's commands never ask.
    assert runner.invoke(app, ["status", "--help"]).exit_code == 0


def test_the_extras_are_read_from_the_installed_metadata(monkeypatch):
    requires = ['httpx>=0.27', 'fastapi>=0.110; extra == "server"', 'uvicorn[standard]>=0.30; extra == "server"',
                'nclab-not-installed; extra == "server"', 'nclab[server]; extra == "worker"',
                'torch-not-installed>=2.3; extra == "worker"', 'pytest>=8; extra == "test"']
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: requires)
    assert client_cli.missing_requirements("server") == ["nclab-not-installed"]
    # The worker's extra names the server's: both are checked.
    assert client_cli.missing_requirements("worker") == ["torch-not-installed", "nclab-not-installed"]
    assert client_cli.missing_requirements("client") == []
