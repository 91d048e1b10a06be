"""Settings that passed ``--check`` and then broke the start (a traceback), every login
(454) or a reload: each is now refused by ``--check``, a real start, a SIGHUP reload and
``saslsmtp-authtest`` alike, as ``file:line: key: message``.  A ``rediss://`` store's
``ca_file`` is relative to the configuration's folder, as every other path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from saslsmtp.config import key_lines, parse_config
from saslsmtp.mechanisms import BUILTIN_NAMES
from tests.conftest import require
from tests.support import ROOT, check_here, run_each, twistd_command
from tests.tlsutil import make_ca

USERS = "demo:{PLAIN}demo-password\n"


def base(folder: Path, extra: str = "", delivery: str = 'path = "mail"') -> str:
    """The brief's configuration (B), relative paths, ``extra`` tables at the end."""
    return (f'[server]\nhostname = "mail.example.test"\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
            f'[auth]\nrequire_tls = false\nbackends = ["users"]\n'
            f'[backends.users]\ntype = "file"\npath = "users"\n'
            f'[delivery]\n{delivery}\n{extra}\n')


def _listen(description: str, workers: int = 1) -> Callable[[Path], str]:
    """The base configuration listening on ``description`` (with ``workers``)."""
    return lambda f: base(f).replace('"tcp:0:interface=127.0.0.1"]\n',
                                     f'"{description}"]\nworkers = {workers}\n')


def _store(ca: str) -> Callable[[Path], str]:
    return lambda f: base(f, f'[limits]\nstore = "rediss://127.0.0.1:1/0?ca_file={ca}"')


#: (case, the configuration for a folder, the key refused, the message (``{f}``: the folder))
CASES: list[tuple[str, Callable[[Path], str], str, str]] = [
    ("rediss ca_file missing", _store("nope.pem"), "limits.store",
     "ca_file {f}/nope.pem: no such file"),
    ("rediss ca_file a folder", _store("adir"), "limits.store",
     "ca_file {f}/adir: is a folder, not a file"),
    ("rediss ca_file not PEM", _store("garbage.pem"), "limits.store",
     "ca_file {f}/garbage.pem: holds no PEM certificate"),
    ("delivery ca_file not PEM", lambda f: base(f, delivery='type = "smtp"\nendpoint = '
                                                '"tcp:127.0.0.1:1"\nstarttls = true\n'
                                                'ca_file = "garbage.pem"'),
     "delivery.ca_file", "{f}/garbage.pem: holds no PEM certificate"),
    ("delivery reuse_limit zero", lambda f: base(f, delivery='type = "smtp"\nendpoint = '
                                                 '"tcp:127.0.0.1:1"\nreuse_limit = 0'),
     "delivery.reuse_limit", "must be at least 1 (1: a new connection for every message)"),
    ("http url without a host", lambda f: base(f, '[backends.api]\ntype = "http"\n'
                                                  'url = "http://"'),
     "backends.api.url", "'http://' is not a usable URL: no host name"),
    ("http url broken IPv6", lambda f: base(f, '[backends.api]\ntype = "http"\n'
                                               'url = "http://[::1/x"'),
     "backends.api.url", "'http://[::1/x' is not a usable URL: Invalid IPv6 URL"),
    ("ldaps ca_file not PEM", lambda f: base(f, '[backends.dir]\ntype = "ldap"\n'
                                                'url = "ldaps://127.0.0.1:1"\n'
                                                'user_dn = "uid={username},dc=x"\n'
                                                'ca_file = "garbage.pem"'),
     "backends.dir.ca_file", "{f}/garbage.pem: holds no PEM certificate"),
    ("Maildir under /proc", lambda f: base(f, delivery='path = "/proc/nope"'), "delivery.path",
     "cannot use /proc/nope: No such file or directory"),
    # Twisted parses these endpoints and fails only at the bind (a traceback at start) or
    # at every connection
    ("listener port beyond 65535", _listen("tcp:99999"), "server.listen",
     "'tcp:99999' is not a usable endpoint: port 99999 is out of range (0 to 65535)"),
    ("listener port negative, workers", _listen("tcp:-1:interface=127.0.0.1", workers=2),
     "server.listen", "'tcp:-1:interface=127.0.0.1' is not a usable endpoint: port -1 is out"
     " of range (0 to 65535)"),
    ("metrics port beyond 65535", lambda f: base(f, '[metrics]\nlisten = "tcp:port=70000"'),
     "metrics.listen", "'tcp:port=70000' is not a usable endpoint: port 70000 is out of range"
     " (0 to 65535)"),
    # ... and these at the bind only: a name that does not resolve, an address elsewhere
    ("listener interface does not resolve", _listen("tcp:0:interface=no-such-host.invalid"),
     "server.listen", "'tcp:0:interface=no-such-host.invalid' is not a usable endpoint:"
     " interface 'no-such-host.invalid' does not resolve"),
    ("listener interface does not resolve, workers",
     _listen("haproxy:tcp:0:interface=no-such-host.invalid", workers=2), "server.listen",
     "'haproxy:tcp:0:interface=no-such-host.invalid' is not a usable endpoint: interface"
     " 'no-such-host.invalid' does not resolve"),
    ("listener interface not this machine's", _listen("tcp:0:interface=192.0.2.1"),
     "server.listen", "'tcp:0:interface=192.0.2.1' is not a usable endpoint: interface"
     " '192.0.2.1' is no address of this machine (Cannot assign requested address)"),
    ("metrics interface does not resolve",
     lambda f: base(f, '[metrics]\nlisten = "tcp:0:interface=no-such-host.invalid"'),
     "metrics.listen", "'tcp:0:interface=no-such-host.invalid' is not a usable endpoint:"
     " interface 'no-such-host.invalid' does not resolve"),
    ("smtp backend endpoint port", lambda f: base(f, '[backends.up]\ntype = "smtp"\n'
                                                     'endpoint = "tcp:127.0.0.1:99999"'),
     "backends.up.endpoint", "'tcp:127.0.0.1:99999' cannot be connected to: port 99999 is"
     " out of range (1 to 65535)"),
    ("oauth2 jwks_url port", lambda f: base(f, '[backends.idp]\ntype = "oauth2"\n'
                                               'jwks_url = "https://idp.example.test:99999/k"\n'
                                               'issuer = "x"\naudience = ["y"]'),
     "backends.idp.jwks_url", "'https://idp.example.test:99999/k' is not a usable URL: Port"
     " out of range 0-65535"),
]


def write_case(folder: Path, make: Callable[[Path], str]) -> Path:
    folder.mkdir()
    (folder / "users").write_text(USERS)
    (folder / "garbage.pem").write_text("this is not a certificate\n")
    (folder / "adir").mkdir()
    config = folder / "saslsmtp.toml"
    config.write_text(make(folder))
    return config


def expected(config: Path, key: str, message: str) -> str:
    lines = key_lines(config.read_text())
    probe = key
    while probe not in lines:
        probe = probe.rsplit(".", 1)[0]
    return f"{config}:{lines[probe]}: {key}: {message.format(f=config.parent)}"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run(argv: list[str], timeout: float, stdin: str = "") -> tuple[int | None, str]:
    """Run from ``/`` (relative paths must not depend on it): (exit status, output)."""
    proc = subprocess.Popen(argv, cwd="/", env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(stdin, timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
        return None, out


def test_check_and_start_refuse_them_alike(tmp_path: Path) -> None:
    """Each case: ``--check`` exits 1 and a real start exits non-zero, naming
    ``file:line: key: message``, with no traceback and never "ready"."""
    require(Path("/proc/self").is_dir(), "needs /proc (Linux)")
    cases, configs = [], []
    for n, (name, make, key, message) in enumerate(CASES):
        config = write_case(tmp_path / f"case{n}", make)
        cases.append((name, expected(config, key, message)))
        configs.append(config)
    starts = run_each([twistd_command(config) for config in configs], 30, env=_env())
    failures = []
    for (name, want), config, start in zip(cases, configs, starts):
        for what, (status, out) in (("--check", check_here(config)), ("start", start)):
            if status in (0, None) or want not in out or "Traceback" in out \
                    or "saslsmtp ready" in out:
                failures.append(f"{name} ({what}): exit {status}, want {want!r} in:\n{out}")
    assert not failures, "\n\n".join(failures)


@pytest_twisted.ensureDeferred
async def test_a_reload_refuses_them_at_their_line(tmp_path: Path) -> None:
    """A SIGHUP reload (the ``Reloader``) keeps the running configuration and logs the
    same ``file:line: key: message`` for each case (no ``ValueError:`` without a key)."""
    from twisted.internet import reactor

    from saslsmtp.serving import Reloader, build_factory, start_runners, stop_wiring
    from saslsmtp.service import load
    folder = tmp_path / "live"
    config = write_case(folder, lambda f: base(f))
    factory = build_factory(load(str(config)), reactor)
    start_runners(factory.wiring)
    reloader = Reloader(str(config), factory, reactor, clock=Clock())
    running = factory.wiring
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        failures = []
        for name, make, key, message in CASES:
            config.write_text(make(folder))
            want = expected(config, key, message)
            events.clear()
            refused = reloader.reload() is False and factory.wiring is running
            lines = [formatEvent(e) for e in events]
            if not refused or not any(want in line and "reload refused" in line for line in lines):
                failures.append(f"{name}: refused={refused}, want {want!r} in {lines}")
        assert not failures, "\n".join(failures)
    finally:
        globalLogPublisher.removeObserver(events.append)
        reloader.stop()
        stop_wiring(factory.wiring)


def test_authtest_says_configuration_error(tmp_path: Path) -> None:
    """``saslsmtp-authtest`` with a bad store ``ca_file``: exit 78 and the one line."""
    config = write_case(tmp_path / "c", _store("garbage.pem"))
    status, out = run([sys.executable, "-m", "saslsmtp.authtest", "--config", str(config),
                       "demo"], 30, stdin="demo-password\n")
    assert status == 78, out
    assert expected(config, "limits.store", "ca_file {f}/garbage.pem: holds no PEM certificate") \
        in out and "Traceback" not in out, out


def test_a_relative_store_ca_file_is_beside_the_configuration(tmp_path: Path) -> None:
    """``?ca_file=ca.pem`` is the ca.pem next to the configuration file, wherever the
    daemon is started from: ``--check`` from ``/`` passes, and the store gets its
    absolute path."""
    folder = tmp_path / "etc"
    config = write_case(folder, _store("ca.pem"))
    (folder / "ca").mkdir()
    Path(make_ca(folder / "ca").cert_path).rename(folder / "ca.pem")
    status, out = run(twistd_command(config, "--check"), 30)
    assert status == 0 and out.strip().endswith(f"{config}: OK"), out
    parsed = parse_config(config.read_text(), str(config), known_mechanisms=BUILTIN_NAMES)
    from saslsmtp.limits.redisurl import parse_redis_url
    assert parse_redis_url(parsed.section("limits").store).ca_file == str(folder / "ca.pem")


def test_a_url_port_problem_never_repeats_a_password() -> None:
    """The port check quotes the URL as messages may show it (password masked)."""
    from saslsmtp.options import OptionProblem, url_port_problem
    assert url_port_problem("k", "https://bob:s3cret@idp.example.test:99999/k") == [OptionProblem(
        "k", "'https://bob:***@idp.example.test:99999/k' is not a usable URL: Port out of range"
             " 0-65535")]
    assert url_port_problem("k", "https://idp.example.test/k") == []
