"""The benchmark driver's own behaviour (not its figures)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Runs benchmarks/run.py with ``aiosmtpd`` made unimportable, as on a machine where
#: saslsmtp was installed without its test extra.
WITHOUT_AIOSMTPD = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "aiosmtpd":
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, Block())
sys.argv = ["benchmarks/run.py", "--duration", "1"]
runpy.run_path("benchmarks/run.py", run_name="__main__")
"""


def test_missing_test_extra_is_a_message_not_a_traceback() -> None:
    """Without the test extra the driver says what to install and exits 2."""
    done = subprocess.run([sys.executable, "-c", WITHOUT_AIOSMTPD], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "missing Python packages: aiosmtpd" in done.stderr
    assert "pip install -e '.[test]'" in done.stderr


def test_workers_benchmark_measures_the_master_and_its_workers() -> None:
    """benchmarks/workers.py's one run: the real daemon with two workers serves the
    generator without errors, and the CPU read covers the master and both workers."""
    import argparse
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import workers as bench
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    result = bench.one_run(2, argparse.Namespace(scheme="plain", concurrency=4, duration=1.0,
                                                 warmup=0.2))
    assert result["status"] == 0 and result["errors"] == 0
    assert result["processes"] == 3
    assert result["sessions"] > 0 and result["handshakes_per_s"] > 0
    assert result["server_cpu_s"] > 0
    # every session's end line is counted, per worker, from the log the workers share
    # (one more session than the generator's: the start-up probe that waits for a 220)
    assert len(result["sessions_per_worker"]) <= 2
    assert sum(result["sessions_per_worker"]) == result["sessions"] + result["sessions_warmup"] + 1
