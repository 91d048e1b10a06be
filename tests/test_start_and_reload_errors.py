"""What operations promise, where it broke: a server that cannot do its job says so in
one line and exits 1 (a worker that cannot start stops the master; an auth cache control
socket that cannot be made), a SIGHUP reload is refused in the words a start and
``--check`` use (a key that does not match, a certificate that does not parse, a script
that calls ``sys.exit()``), the "takes effect at the next restart" warning compares
with what runs, a second SIGTERM during the drain is ignored, and ``--workers`` has
``server.workers``' range."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from saslsmtp.serving import Reloader, build_factory, stop_wiring
from saslsmtp.service import load
from tests.support import ROOT, alice_config, free_port, twistd_command, wait_for, write_config
from tests.test_lifecycle import Running
from tests.test_reload import write_cert

BACKEND = '[backends.users]\ntype = "file"\npath = "{path}"\n'


def run_twistd(config: Path, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(twistd_command(config, *extra), capture_output=True, text=True,
                          timeout=timeout, cwd=config.parent, env=env)


def add_to(config: Path, section: str, lines: str) -> None:
    """Add TOML ``lines`` at the top of ``[section]`` (appending the section if absent)."""
    text = config.read_text()
    header = f"[{section}]\n"
    if header in text:
        config.write_text(text.replace(header, header + lines, 1))
    else:
        config.write_text(text + "\n" + header + lines)


@pytest.fixture
def captured() -> Iterator[Callable[[], list[str]]]:
    """Every line logged in this process during the test, formatted."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [formatEvent(e) for e in events]
    globalLogPublisher.removeObserver(events.append)


# -- 1. a worker that cannot start stops the master ---------------------------------------

def held_control_socket(tmp_path: Path) -> tuple[str, str]:
    """A control socket whose worker-0 path is locked by a live process (this test):
    every check passes, and only worker 0's bind fails."""
    socket_path = tmp_path / "cache.sock"
    os.symlink(str(os.getpid()), f"{socket_path}.0.lock")
    return f'ttl = 300\ncontrol_socket = "{socket_path}"\n', f"{socket_path}.0"


def test_a_worker_that_cannot_start_stops_the_master_with_its_reason(tmp_path: Path) -> None:
    """workers = 2 and a start that fails only in a worker (its control socket is held
    by another live process): the master exits 1 with the worker's one-line reason
    instead of restarting it forever; nobody said the server started."""
    config, _ = alice_config(tmp_path, "workers = 2\n")
    lines, path = held_control_socket(tmp_path)
    add_to(config, "auth.cache", lines)
    expected = (f"saslsmtp: {config}: auth.cache.control_socket: cannot listen on {path}:"
                " another running server holds it")
    assert run_twistd(config, "--check").returncode == 0
    started = time.monotonic()
    out = run_twistd(config)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert expected in text
    assert "restarting it" not in text and "started 2 workers" not in text
    assert time.monotonic() - started < 20
    assert "Traceback" not in text


def test_a_held_control_socket_stops_a_single_process_too(tmp_path: Path) -> None:
    config, port = alice_config(tmp_path)
    socket_path = tmp_path / "cache.sock"
    os.symlink(str(os.getpid()), f"{socket_path}.lock")
    add_to(config, "auth.cache", f'ttl = 300\ncontrol_socket = "{socket_path}"\n')
    out = run_twistd(config)
    assert out.returncode == 1, out.stdout + out.stderr
    assert (f"saslsmtp: {config}: auth.cache.control_socket: cannot listen on {socket_path}:"
            " another running server holds it") in out.stdout + out.stderr
    assert "saslsmtp ready" not in out.stdout + out.stderr


# -- 2. a control socket that cannot be made ----------------------------------------------

@pytest.mark.parametrize("where", ["missing-folder", "too-long"])
def test_an_unusable_control_socket_fails_check_and_start(tmp_path: Path, where: str) -> None:
    config, _ = alice_config(tmp_path)
    if where == "missing-folder":
        path = "/nonexistent/dir/cache.sock"
        words = "cannot create /nonexistent/dir/cache.sock: the folder /nonexistent/dir does not exist"
    else:
        folder = tmp_path / ("d" * max(1, 108 - len(str(tmp_path)) - len("/cache.sock")))
        folder.mkdir()
        path = str(folder / "cache.sock")
        words = f"{path} is {len(path)} bytes long; a UNIX socket path can have at most 107"
    add_to(config, "auth.cache", f'ttl = 300\ncontrol_socket = "{path}"\n')
    line = config.read_text().splitlines().index(f'control_socket = "{path}"') + 1
    for extra in (("--check",), ()):
        out = run_twistd(config, *extra)
        assert out.returncode == 1, (extra, out.stdout, out.stderr)
        assert f"{config.name}:{line}: auth.cache.control_socket: {words}" in out.stderr
        assert "Traceback" not in out.stderr and "ready" not in out.stdout + out.stderr


# -- 3. the restart-only warning compares with what runs ----------------------------------

def warnings_of(messages: list[str], key: str) -> int:
    return sum(f"reload: {key} changed; it takes effect at the next restart" in m for m in messages)


def test_restart_only_warnings_compare_with_what_the_process_bound(tmp_path: Path,
                                                                   captured: Callable[[], list[str]]) -> None:
    """A new port warns at every reload while it is pending, and not once the file
    names the bound port again; the same for ``[metrics] listen``."""
    from twisted.internet import reactor
    (tmp_path / "users").write_text("alice:{PLAIN}wonderland\n")
    config = write_config(tmp_path, BACKEND.format(path=tmp_path / "users"),
                          listen=["tcp:2600:interface=127.0.0.1"],
                          extra='[metrics]\nlisten = "tcp:9600:interface=127.0.0.1"\n')
    factory = build_factory(load(str(config)), reactor)
    reloader = Reloader(str(config), factory, reactor, clock=Clock())
    original = config.read_text()
    changed = original.replace("tcp:2600", "tcp:2601").replace("tcp:9600", "tcp:9601")
    try:
        for text, expected in ((changed, 1), (changed, 2), (original, 2)):
            config.write_text(text)
            assert reloader.reload() is True
            assert warnings_of(captured(), "server.listen") == expected
            assert warnings_of(captured(), "metrics.listen") == expected
    finally:
        reloader.stop()
        stop_wiring(factory.wiring)


def test_the_master_warns_against_what_it_bound(tmp_path: Path, captured: Callable[[], list[str]]) -> None:
    from tests.test_master import master
    service, _ = master(tmp_path)
    config = Path(service.config_path)
    original = config.read_text()
    changed = original.replace("tcp:2601", "tcp:2602")
    changed += '\n[metrics]\nlisten = "tcp:9601:interface=127.0.0.1"\n'
    for text, expected in ((changed, 1), (changed, 2), (original, 2)):
        config.write_text(text)
        assert service.reload() is True
        assert warnings_of(captured(), "server.listen") == expected
        assert warnings_of(captured(), "metrics.listen") == expected


# -- 4. a reload is refused in the start's words ------------------------------------------

def broken_variants(tmp_path: Path, config: Path) -> list[tuple[str, str]]:
    """(configuration text, the problem a start prints) for each way to break it."""
    good = config.read_text()
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = write_cert(other, 2)
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n\ndef auth(a, c):\n    return None\n")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    return [
        (good.replace(str(key), str(other_key)),
         f"tls.private_key: {other_key} does not match the certificate in {cert}"),
        (good.replace(str(cert), str(tmp_path / "garbage.pem")),
         f"tls.certificate: {tmp_path / 'garbage.pem'} holds no PEM certificate"),
        (good.replace("[auth]\n", '[auth]\nscript = "exits.py"\n'),
         f"{tmp_path / 'exits.py'}:2: auth.script: the script exited (SystemExit 3) while loading"),
    ]


def tls_config(tmp_path: Path) -> Path:
    (tmp_path / "users").write_text("alice:{PLAIN}wonderland\n")
    cert, key = write_cert(tmp_path, 1)
    return write_config(tmp_path, BACKEND.format(path=tmp_path / "users"),
                        tls=(str(cert), str(key)))


def test_check_and_start_refuse_each_variant_in_one_line(tmp_path: Path) -> None:
    """What the reload below must say is what ``--check`` and a start say (exit 1, no
    traceback; a script's sys.exit() included)."""
    config = tls_config(tmp_path)
    config.write_text(config.read_text().replace("tcp:0", f"tcp:{free_port()}"))
    for text, problem in broken_variants(tmp_path, config):
        config.write_text(text)
        for extra in (("--check",), ()):
            out = run_twistd(config, *extra)
            assert out.returncode == 1, (problem, extra, out.stdout, out.stderr)
            assert problem in out.stderr, (problem, out.stderr)
            assert "Traceback" not in out.stderr


def test_reload_is_refused_with_the_words_of_a_start(tmp_path: Path, captured: Callable[[], list[str]]) -> None:
    from twisted.internet import reactor
    config = tls_config(tmp_path)
    factory = build_factory(load(str(config)), reactor)
    reloader = Reloader(str(config), factory, reactor, clock=Clock())
    running = factory.wiring
    try:
        for text, problem in broken_variants(tmp_path, config):
            config.write_text(text)
            assert reloader.reload() is False
            assert factory.wiring is running
            assert any("reload refused, keeping the running configuration:" in m and problem in m
                       for m in captured()), (problem, captured())
    finally:
        reloader.stop()
        stop_wiring(factory.wiring)


def test_the_master_refuses_a_reload_with_the_words_of_a_start(tmp_path: Path,
                                                               captured: Callable[[], list[str]]) -> None:
    from tests.test_master import FakeReactor
    from saslsmtp.master import MasterService
    config = tls_config(tmp_path)
    service = MasterService(str(config), load(str(config)), 2, FakeReactor())
    for text, problem in broken_variants(tmp_path, config):
        config.write_text(text)
        assert service.reload() is False
        assert any("reload refused, workers keep the running configuration:" in m
                   and problem in m for m in captured()), (problem, captured())


# -- 5. a second SIGTERM while draining ---------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_sigterm_while_draining_is_ignored(tmp_path: Path, workers: int) -> None:
    daemon = Running(tmp_path, workers)
    try:
        sending = daemon.sending()
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "Received SIGTERM, shutting down." in daemon.text(), what="the first")
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM received: already shutting down" in daemon.text(),
                 what="the second")
        sending.sock.sendall(b"second half\r\n")
        assert sending.send(b".").startswith(b"250 ")
        assert daemon.proc.wait(30) == 0, daemon.text()
        text = daemon.text()
        assert "SIGTERM received: already shutting down" in text
        assert "ReactorNotRunning" not in text and "#critical" not in text, text
    finally:
        daemon.stop()


# -- 6. --workers has server.workers' range -----------------------------------------------

def test_workers_option_has_the_range_of_server_workers(tmp_path: Path) -> None:
    config, _ = alice_config(tmp_path)
    out = run_twistd(config, "--workers=999", "--check")
    assert out.returncode == 1
    assert "--workers must be between 0 (one per CPU) and 256" in out.stdout + out.stderr
    assert run_twistd(config, "--workers=256", "--check").returncode == 0
