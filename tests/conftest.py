"""Shared fixtures.  The reactor is pytest-twisted's; nothing here imports it at module load."""

import os

import pytest

IN_CI = os.environ.get("CI") == "true"


def require_binary(path: str) -> None:
    """Fail in CI (a missing install step must not hide behind a skip); skip elsewhere."""
    if not os.path.exists(path):
        message = f"{path} is not installed (scripts/test.sh installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
