"""Shared fixtures.  The reactor is pytest-twisted's; nothing here imports it at module load."""

import os

import pytest

#: CI=true (GitHub, GitLab, the project's .ci/run), and any other "yes" a CI system sets
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(ok: bool, message: str) -> None:
    """Fail in CI (a missing install step must not hide behind a skip); skip elsewhere."""
    if not ok:
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)  # outside CI only: in CI the line above fails


def require_binary(name: str, package: str = "") -> str:
    """The path of an executable (a name on PATH or a path), or fail in CI / skip."""
    import shutil
    path = name if os.path.sep in name and os.access(name, os.X_OK) else shutil.which(name)
    require(path is not None, f"{name} is not installed (Debian package {package or name};"
                              " scripts/test.sh installs it)")
    return path


# ---------------------------------------------------------------------------
# No password reaches a log: every log event of the whole suite is captured and, at the
# end of the session, searched for the passwords the suite's AUTH runs use, and for their
# base64 forms as PLAIN blobs.  A hit fails the session.
# ---------------------------------------------------------------------------

SUITE_PASSWORDS = ("tanstaaftanstaaf", "wonderland", "demo-password", "benchpass",
                   "xipj3plmq", "log-canary-Pw-1")


def _needles(password: str) -> list[str]:
    import base64
    out = [password, base64.b64encode(password.encode()).decode()]
    for user in ("tim", "alice", "demo", "bench", "Kurt", "canary"):
        out.append(base64.b64encode(f"\0{user}\0{password}".encode()).decode().rstrip("="))
    return out


def event_text(event: dict) -> str:
    """Everything an observer could write for ``event``: repr, message and traceback."""
    from twisted.logger import formatEvent
    text = [repr(event), formatEvent(event)]  # (formatEvent reports its own errors)
    failure = event.get("log_failure")
    if failure is not None:
        text.append(failure.getTraceback())
    return "\n".join(text)


@pytest.fixture(scope="session", autouse=True)
def no_password_in_any_log_event():
    """Session-wide observer of twisted.logger; fails the run if a password leaked."""
    from twisted.logger import globalLogPublisher
    events: list[str] = []

    def observe(event: dict) -> None:
        events.append(event_text(event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)
    needles = [n for p in SUITE_PASSWORDS for n in _needles(p)]
    leaks = [(n, e[:300]) for e in events for n in needles if n in e]
    assert not leaks, f"passwords reached the log: {leaks[:5]}"


# ---------------------------------------------------------------------------
# Parallel runs (pytest-xdist, as scripts/test.sh runs the suite): tests marked
# ``alone`` (latency and timeout windows) run while no other test does (tests/alone.py).
# ---------------------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line(
        "markers", "alone: measures time; runs while no other test runs (tests/alone.py)")
    if not hasattr(config, "workerinput") and config.getoption("numprocesses", None):
        import tempfile
        from tests.alone import LOCKS_VARIABLE
        config._saslsmtp_locks = tempfile.mkdtemp(prefix="saslsmtp-test-locks-")
        os.environ[LOCKS_VARIABLE] = config._saslsmtp_locks  # the workers inherit it


def pytest_unconfigure(config):
    folder = getattr(config, "_saslsmtp_locks", None)
    if folder:
        import shutil
        shutil.rmtree(folder, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    from tests.alone import LOCKS_VARIABLE, turn
    folder = os.environ.get(LOCKS_VARIABLE)
    if not folder:
        return (yield)
    with turn(folder, item.get_closest_marker("alone") is not None):
        return (yield)
