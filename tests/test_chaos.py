"""One short round of bench/chaos.py in the default run: kill -9 the worker mid-job once,
restart Redis with 20 jobs queued once, on a PostgreSQL cluster and a Redis of its own."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST_LIFECYCLE, REQUIRE_SERVICES

ROOT = Path(__file__).resolve().parent.parent
# Its own PostgreSQL cluster, Redis and processes, for minutes.
pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_a_short_chaos_round_loses_nothing():
    missing = [tool for tool in ("redis-server", "redis-cli", "runuser") if shutil.which(tool) is None]
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        missing.append("initdb")
    if missing:
        message = f"chaos needs {', '.join(missing)}"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    # The heartbeat timeout of the tests' own stacks, not the bench's 10 s: each kill waits for it.
    heartbeat_timeout = FAST_LIFECYCLE["NCLAB_HEARTBEAT_TIMEOUT"]
    chaos = [str(ROOT / "bench" / "chaos.py"), "--short", "--heartbeat-timeout", heartbeat_timeout]
    result = subprocess.run([sys.executable, *chaos], cwd=ROOT, capture_output=True, text=True, timeout=280)
    print(result.stdout, result.stderr[-5000:])
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    table = result.stdout.splitlines()
    assert table[-1] == "targets met"
    rows = {line.split()[0]: line.split()[1:] for line in table[1:-1]}
    # tried, succeeded, failed, canceled, lost
    assert rows["worker"][:5] == ["1", "1", "0", "0", "0"] and rows["redis"][:5] == ["20", "20", "0", "0", "0"]
