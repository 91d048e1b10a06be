"""A worker process that cannot start says why in one JSON log line and exits 1
(the master then reports it), instead of a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_worker(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "saslsmtp.worker", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


def critical_lines(stdout: str) -> list[str]:
    """The messages of the worker's critical events (its compact JSON relay lines)."""
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return [e.get("message", "") for e in events if e.get("level") == "critical"]


def test_worker_with_an_invalid_config_exits_1_naming_the_problem(tmp_path: Path) -> None:
    """Config problems come out as ``file:line: key: message``."""
    config = tmp_path / "c.toml"
    config.write_text("[server]\nmax_recipients = 0\n")
    done = run_worker("--config", str(config))
    assert done.returncode == 1, done.stderr
    problem = f"{config}:2: server.max_recipients: must be at least 1"
    assert any(problem in line for line in critical_lines(done.stdout)), done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_worker_with_an_unreadable_config_exits_1(tmp_path: Path) -> None:
    """A missing file is a config problem too."""
    done = run_worker("--config", str(tmp_path / "absent.toml"))
    assert done.returncode == 1, done.stderr
    assert any("cannot read" in line for line in critical_lines(done.stdout))
