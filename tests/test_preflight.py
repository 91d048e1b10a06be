"""Preflight checks called directly: require_tls without TLS, and permissions evaluated
for another user from mode bits."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from saslsmtp import activation
from saslsmtp.config import ConfigError
from saslsmtp.preflight import READ, RunAs, allowed, preflight, writable_dir_problem
from saslsmtp.service import load
from tests.support import write_config

NOBODY = RunAs(65534, frozenset([65534]), "nobody")


def config_with(tmp_path: Path, mechanisms: list[str]) -> object:
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    return load(str(write_config(tmp_path, '[backends.users]\ntype = "file"\npath = "users"\n',
                                 mechanisms=mechanisms, require_tls=True)))


def test_require_tls_without_tls_and_only_plaintext_is_an_error(tmp_path: Path) -> None:
    """PLAIN and LOGIN are never offered without TLS: nobody could log in."""
    with pytest.raises(ConfigError) as e:
        preflight(config_with(tmp_path, ["PLAIN", "LOGIN"]), Clock())
    assert ": auth.require_tls: is true but there is no [tls] section" in str(e.value)


def test_require_tls_without_tls_and_some_plaintext_is_a_warning(tmp_path: Path) -> None:
    """CRAM-MD5 still works; the warning names what never will."""
    warnings = preflight(config_with(tmp_path, ["CRAM-MD5", "PLAIN"]), Clock())
    assert len(warnings) == 1 and "only CRAM-MD5 can be used; PLAIN never will" in warnings[0]


def test_require_tls_without_tls_and_no_plaintext_is_a_warning(tmp_path: Path) -> None:
    """Every mechanism is non-plaintext: it works, but nothing is ever encrypted."""
    warnings = preflight(config_with(tmp_path, ["CRAM-MD5"]), Clock())
    assert len(warnings) == 1 and "no session is ever encrypted" in warnings[0]


@pytest.mark.parametrize("declared, verdict", [
    ('["X-PASSWORD-TOTP"]', "error"),                       # a list: plaintext
    ('{"X-PASSWORD-TOTP": {}}', "error"),                   # the default: plaintext
    ('{"X-PASSWORD-TOTP": {"plaintext": False}}', "no session is ever encrypted"),
])
def test_require_tls_judges_a_scripts_mechanisms_as_it_declares_them(
        tmp_path: Path, declared: str, verdict: str) -> None:
    """The same rule for the script's mechanisms: a plaintext one is never offered
    without TLS, so with only it nobody could log in."""
    (tmp_path / "auth.py").write_text(f"MECHANISMS = {declared}\n"
                                      "def auth(arguments, context):\n    return None\n")
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    config = load(str(write_config(tmp_path, '[backends.users]\ntype = "file"\npath = "users"\n',
                                   mechanisms=["X-PASSWORD-TOTP"], require_tls=True,
                                   script="auth.py")))
    if verdict == "error":
        with pytest.raises(ConfigError, match="so X-PASSWORD-TOTP can never be used and nobody"):
            preflight(config, Clock())
    else:
        warnings = preflight(config, Clock())
        assert len(warnings) == 1 and verdict in warnings[0]


def test_permissions_are_judged_for_the_serving_user(tmp_path: Path) -> None:
    """Owner, group and other bits for ``nobody``; a folder above it cannot enter, and a
    missing Maildir under a folder it cannot write; root may read anything."""
    import shutil
    import tempfile
    tmp_path = Path(tempfile.mkdtemp(dir="/tmp"))
    tmp_path.chmod(0o755)
    try:
        check_as_nobody(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def check_as_nobody(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    secret.chmod(0o600)
    assert not allowed(secret, NOBODY, READ) and allowed(secret, RunAs(0, frozenset([0]), "root"), READ)
    assert "cannot be created by nobody" in (writable_dir_problem(str(tmp_path / "mail"), NOBODY) or "")
    (tmp_path / "mail").mkdir(mode=0o777)
    (tmp_path / "mail").chmod(0o777)
    assert writable_dir_problem(str(tmp_path / "mail"), NOBODY, ("tmp", "new", "cur")) is None
    (tmp_path / "closed").mkdir(mode=0o700)
    (tmp_path / "closed").chmod(0o700)
    assert writable_dir_problem(str(tmp_path / "closed" / "mail"), NOBODY) == \
        f"{tmp_path}/closed/mail is not writable by nobody: cannot enter {tmp_path}/closed"


SECRET_BACKEND = ('[backends.api]\ntype = "http"\nurl = "http://127.0.0.1:9/check"\n'
                  'headers = { Authorization = "Bearer t0ken" }\n')


@pytest.mark.parametrize("backend, extra, secrets", [
    (SECRET_BACKEND, "", "backends.api.headers"),
    ('[backends.users]\ntype = "file"\npath = "users"\n',
     '[limits]\nstore = "redis://:pw@127.0.0.1:6379/0"\n', "limits.store"),
])
def test_a_configuration_with_secrets_that_everyone_can_read_is_a_warning(
        tmp_path: Path, backend: str, extra: str, secrets: str) -> None:
    """A token or password in a file every local user can read is given away: --check
    and the start warn at the key's line, never quoting the secret; 0640 is quiet."""
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    path = write_config(tmp_path, backend, extra=extra)
    path.chmod(0o644)
    warnings = preflight(load(str(path)), Clock())
    assert [w for w in warnings if f"holds secrets ({secrets}) and every user can read it"
            " (mode 644): chmod o-r it" in w] != [], warnings
    assert not [w for w in warnings if "t0ken" in w or ":pw@" in w]
    path.chmod(0o640)
    assert not [w for w in preflight(load(str(path)), Clock()) if "holds secrets" in w]


def test_a_readable_configuration_without_secrets_is_no_warning(tmp_path: Path) -> None:
    path = Path(config_with(tmp_path, ["CRAM-MD5"]).path)  # type: ignore[attr-defined]
    path.chmod(0o644)
    assert not [w for w in preflight(load(str(path)), Clock()) if "holds secrets" in w]


def test_a_systemd_listener_outside_socket_activation_is_checked_for_syntax_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd passes no sockets to ExecStartPre's ``--check`` (nor to one run by hand):
    the entries' syntax is checked, not the sockets they name (a start says when there
    are none, tests/test_socket_activation.py).  It said "no socket at that index" and
    so failed every ExecStartPre of a socket-activated unit."""
    monkeypatch.setattr(activation, "take", lambda: None)
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    path = write_config(tmp_path, '[backends.users]\ntype = "file"\npath = "users"\n',
                        listen=["systemd:name=submission", "systemd:domain=INET:index=0"])
    preflight(load(str(path)), Clock())
    path = write_config(tmp_path, '[backends.users]\ntype = "file"\npath = "users"\n',
                        listen=["systemd:name=submission", "systemd:nmae=submissions"])
    with pytest.raises(ConfigError) as e:
        preflight(load(str(path)), Clock())
    assert len(e.value.problems) == 1
    assert "server.listen: systemd:nmae=submissions: unknown option nmae=" in str(e.value)


def test_a_systemd_listener_is_checked_against_the_passed_sockets(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the sockets (a start, or --check run by systemd-socket-activate) the names
    are matched: a name systemd did not pass is a problem, a passed socket no entry
    names a warning."""
    with socket.socket() as one, socket.socket() as two:
        for sock in (one, two):
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        ports = [sock.getsockname()[1] for sock in (one, two)]
        passed = activation.Passed((one.fileno(), two.fileno()), ("submission", "smtps"))
        monkeypatch.setattr(activation, "take", lambda: passed)
        (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
        path = write_config(tmp_path, '[backends.users]\ntype = "file"\npath = "users"\n',
                            listen=["systemd:name=submission"])
        warnings = preflight(load(str(path)), Clock())
        assert [w for w in warnings if "systemd passed" in w] == [
            f"{path}:3: server.listen: warning: systemd passed smtps (fd {two.fileno()}, port"
            f" {ports[1]}), which no server.listen entry names: connections to it wait"
            " unanswered (add systemd:name=... to server.listen or remove it from the .socket"
            " unit)"]
        path = write_config(tmp_path, '[backends.users]\ntype = "file"\npath = "users"\n',
                            listen=["systemd:name=submissions", "systemd:name=smtps"])
        with pytest.raises(ConfigError) as e:
            preflight(load(str(path)), Clock())
        assert [str(p) for p in e.value.problems] == [
            f"{path}:3: server.listen: 'systemd:name=submissions': systemd passed no socket"
            f" named 'submissions' (it passed submission (fd {one.fileno()}, port {ports[0]}),"
            f" smtps (fd {two.fileno()}, port {ports[1]}); ListenStream= and"
            " FileDescriptorName= in the .socket unit make them)"]


def test_malformed_listen_variables_are_a_problem(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def malformed() -> None:
        raise activation.ActivationError("LISTEN_FDS='x' is not a number")
    monkeypatch.setattr(activation, "take", malformed)
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    path = write_config(tmp_path, '[backends.users]\ntype = "file"\npath = "users"\n')
    with pytest.raises(ConfigError) as e:
        preflight(load(str(path)), Clock())
    assert "server.listen: socket activation: LISTEN_FDS='x' is not a number" in str(e.value)


def test_worker_timeout_for_one_process_is_a_warning(tmp_path: Path) -> None:
    """Set for one process it does nothing (no master watches it): --check says so, and
    not with workers, nor at its default."""
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    path = write_config(tmp_path, '[backends.users]\ntype = "file"\npath = "users"\n')
    text = path.read_text()
    path.write_text(text.replace("[server]\n", "[server]\nworker_timeout = 5\n", 1))
    warnings = preflight(load(str(path)), Clock())
    assert [w for w in warnings if "worker_timeout" in w] == [
        f"{path}:2: server.worker_timeout: warning: has no effect with one process (workers ="
        " 1): no master watches it; under systemd, WatchdogSec= restarts a stuck process"]
    assert not [w for w in preflight(load(str(path)), Clock(), workers=2) if "worker_timeout" in w]
    path.write_text(text)
    assert not [w for w in preflight(load(str(path)), Clock()) if "worker_timeout" in w]
