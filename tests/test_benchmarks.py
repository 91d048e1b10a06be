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
