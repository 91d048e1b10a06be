"""The README stays true: its code examples run, and its commands exist."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_testing_example_runs() -> None:
    """The "Testing a script" example is a working pytest test."""
    [block] = [b for b in python_blocks() if "SMTPHarness" in b]
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(block, "README.md", "exec"), namespace)
        tests = [v for k, v in namespace.items() if k.startswith("test_")]
        assert tests
        for test in tests:
            test()
    finally:
        os.chdir(cwd)


def test_script_example_compiles_and_uses_the_api() -> None:
    [block] = [b for b in python_blocks() if "async def auth" in b]
    compile(block, "README.md", "exec")
    from saslsmtp import script
    for name in ("Accept", "Defer", "Reject", "Reply", "Verdict"):
        assert hasattr(script, name)


def test_commands_are_the_ci_ones() -> None:
    """.ci/run runs exactly the README's test command."""
    assert "bash scripts/test.sh" in README
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "twistd -n saslsmtp --config etc/saslsmtp.toml" in README
