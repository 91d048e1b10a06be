"""``etc/systemd/saslsmtp.service`` (and ``saslsmtp.socket``): systemd itself accepts
every line, the unit has the hardening and reload wiring the README promises, and
saslsmtp tells systemd it is ready (``Type=notify``) only once it serves."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from saslsmtp.listeners import parse
from tests.conftest import require_binary
from tests.support import ROOT, alice_config, kill_leftovers, twistd_command

UNIT = ROOT / "etc" / "systemd" / "saslsmtp.service"
SOCKET = ROOT / "etc" / "systemd" / "saslsmtp.socket"
SHIPPED_TWISTD = "/opt/saslsmtp/bin/twistd"


def verify(tmp_path: Path, text: str, socket_text: str | None = None) -> subprocess.CompletedProcess:
    """``systemd-analyze verify`` of ``text`` installed as ``saslsmtp.service``, with the
    twistd path pointing at this interpreter's twistd (verify checks the binary exists),
    and of ``socket_text`` installed beside it as ``saslsmtp.socket``."""
    analyze = require_binary("systemd-analyze", "systemd")
    twistd = Path(sys.executable).parent / "twistd"
    assert twistd.is_file(), f"{twistd} missing: twistd is installed with Twisted"
    unit = tmp_path / "saslsmtp.service"
    unit.write_text(text.replace(SHIPPED_TWISTD, str(twistd)))
    units = [str(unit)]
    if socket_text is not None:
        (tmp_path / "saslsmtp.socket").write_text(socket_text)
        units.insert(0, str(tmp_path / "saslsmtp.socket"))
    return subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    """No error and no warning (systemd only warns about an unknown value, exit 0)."""
    text = UNIT.read_text()
    assert SHIPPED_TWISTD in text
    result = verify(tmp_path, text)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_the_socket_unit_verifies_with_the_service(tmp_path: Path) -> None:
    """saslsmtp.socket, and the service switched to it as its comments say."""
    service = UNIT.read_text().replace("[Unit]\n", "[Unit]\nRequires=saslsmtp.socket\n"
                                                  "After=saslsmtp.socket\n", 1)
    result = verify(tmp_path, service, SOCKET.read_text())
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    result = verify(tmp_path, service, SOCKET.read_text().replace("NoDelay=yes", "NoDelay=maybe"))
    assert "saslsmtp.socket:" in result.stderr and "maybe" in result.stderr, result.stderr


def test_the_socket_unit_passes_what_the_documented_listeners_name() -> None:
    """The ``systemd:`` entries the units' comments (and docs/operations.md) give pick
    one socket each of those saslsmtp.socket passes: its FileDescriptorName= and ports."""
    lines = [line.strip() for line in SOCKET.read_text().splitlines()]
    name = [line.split("=", 1)[1] for line in lines if line.startswith("FileDescriptorName=")]
    ports = {int(line.split("=", 1)[1]) for line in lines if line.startswith("ListenStream=")}
    assert ports == {587, 465}
    for text in (UNIT.read_text(), SOCKET.read_text(),
                 (ROOT / "docs" / "operations.md").read_text()):
        listen = [line for line in text.splitlines() if "listen = [\"systemd:" in line]
        assert listen, "no systemd: listen example"
        entries = re.findall(r'"(systemd:[^"]+)"', listen[0])
        wanted = [parse(entry).wanted() for entry in entries]
        assert [(w.name, w.port) for w in wanted] == [(name[0], 587), (name[0], 465)], entries
        assert [parse(entry).implicit_tls for entry in entries] == [False, True]


def test_the_unit_starts_the_twistd_the_readme_installs() -> None:
    """The README installs saslsmtp into a virtual environment (a system-wide pip install
    is refused on Debian 12); the unit's Exec lines name that environment's twistd (they
    named /usr/local/bin/twistd, which that install never makes)."""
    readme = (ROOT / "README.md").read_text()
    venv = readme.split("python3 -m venv ", 1)[1].split()[0]
    assert f"{venv}/bin/pip install" in readme
    execs = [line.split("=", 1)[1].split()[0] for line in UNIT.read_text().splitlines()
             if line.startswith(("ExecStart=", "ExecStartPre="))]
    assert execs == [f"{venv}/bin/twistd"] * 2, execs


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: a misspelt value is reported."""
    result = verify(tmp_path, UNIT.read_text().replace("KillMode=mixed", "KillMode=mixd"))
    assert "KillMode" in result.stderr or "kill mode" in result.stderr


def test_hardening_and_reload_lines() -> None:
    """SIGHUP reload, no new privileges, read-only system but the Maildir, and only the
    capability to bind low ports."""
    lines = {line.strip() for line in UNIT.read_text().splitlines()}
    for expected in ("ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes",
                     "ProtectSystem=strict", "ReadWritePaths=-/var/mail/saslsmtp", "PrivateTmp=yes",
                     "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                     "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "KillMode=mixed"):
        assert expected in lines, expected


def test_every_writable_path_may_be_missing() -> None:
    """systemd fails a start whose ReadWritePaths= names a missing folder (226/NAMESPACE),
    unless the path starts with "-": a relay to Postfix has no Maildir folder at all."""
    paths = [word for line in UNIT.read_text().splitlines()
             if line.startswith("ReadWritePaths=") for word in line.split("=", 1)[1].split()]
    assert paths and all(path.startswith("-") for path in paths), paths


def test_the_unit_waits_for_readiness() -> None:
    """``Type=notify``: ``systemctl start`` returns when saslsmtp says READY=1 (after every
    listener is bound and every worker serves) and fails when the start does; under
    ``Type=exec`` it succeeded as soon as twistd was executed."""
    lines = {line.strip() for line in UNIT.read_text().splitlines()}
    assert "Type=notify" in lines and "NotifyAccess=main" in lines
    assert "RuntimeDirectory=saslsmtp" in lines  # /run/saslsmtp for a control socket


def test_the_unit_has_a_watchdog() -> None:
    """``WatchdogSec=``: saslsmtp says WATCHDOG=1 from its reactor (tests/test_watchdog.py),
    so systemd restarts a process whose reactor is stuck; under ``Restart=on-failure``,
    which covers a watchdog kill."""
    lines = {line.strip() for line in UNIT.read_text().splitlines()}
    assert "WatchdogSec=60" in lines and "Restart=on-failure" in lines


def notified_start(tmp_path: Path, address: str, server: str = "",
                   port: int | None = None) -> tuple[subprocess.Popen, socket.socket, int, Path]:
    """twistd saslsmtp with ``NOTIFY_SOCKET=address`` (``@name``: abstract), and the
    datagram socket systemd would listen on."""
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listening.bind("\0" + address[1:] if address.startswith("@") else address)
    config, free = alice_config(tmp_path, server)
    if port is not None:
        config.write_text(config.read_text().replace(f"tcp:{free}:", f"tcp:{port}:"))
    log = tmp_path / "daemon.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), NOTIFY_SOCKET=address)
    with open(log, "wb") as out:
        proc = subprocess.Popen(twistd_command(config), cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    return proc, listening, port or free, log


@pytest.mark.parametrize("workers, where", [(1, "path"), (2, "path"), (1, "abstract")])
def test_ready_is_told_once_the_server_serves(tmp_path: Path, workers: int, where: str) -> None:
    """READY=1 (with MAINPID) arrives once, when the port already answers with a
    greeting and every worker said it was ready."""
    address = str(tmp_path / "notify") if where == "path" else f"@saslsmtp-test-{os.getpid()}"
    proc, listening, port, log = notified_start(tmp_path, address, f"workers = {workers}\n")
    try:
        listening.settimeout(30)
        assert listening.recv(4096) == f"READY=1\nMAINPID={proc.pid}".encode(), log.read_text()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert client.recv(100).startswith(b"220 ")
        assert log.read_text().count("saslsmtp ready") == workers
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
        listening.setblocking(False)
        with pytest.raises(BlockingIOError):
            listening.recv(4096)  # said once
    finally:
        kill_leftovers(proc, log)
        listening.close()


def test_a_start_that_fails_never_says_ready(tmp_path: Path) -> None:
    """A port in use: the process exits 1 and systemd hears nothing (it reports the failed
    start), where Type=exec had already called the service started."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        proc, listening, _, log = notified_start(tmp_path, str(tmp_path / "notify"),
                                                 port=busy.getsockname()[1])
        try:
            assert proc.wait(30) == 1, log.read_text()
            listening.setblocking(False)
            with pytest.raises(BlockingIOError):
                listening.recv(4096)
        finally:
            kill_leftovers(proc, log)
            listening.close()
    finally:
        busy.close()


def unit_lines(path: Path, section: str) -> list[str]:
    """The setting lines of ``[section]`` in a unit file (comments left out)."""
    lines, inside = [], False
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            inside = line == f"[{section}]"
        elif inside and line and not line.startswith("#"):
            lines.append(line)
    return lines


def test_restarting_the_service_leaves_the_socket_unit_alone() -> None:
    """systemd.unit(5), PartOf=: "When systemd stops or restarts the units listed here, the
    action is propagated to this unit".  With ``PartOf=saslsmtp.service`` in the socket
    unit, ``systemctl restart saslsmtp`` restarted saslsmtp.socket too: its ports closed,
    the clients waiting in the backlog were dropped and new ones refused, the very thing
    the socket unit is there to prevent.  No dependency of the socket on the service may
    propagate a stop or a restart (BindsTo= neither)."""
    for line in unit_lines(SOCKET, "Unit"):
        key, _, value = line.partition("=")
        assert not (key in ("PartOf", "BindsTo") and "saslsmtp.service" in value), line
    assert "Service=saslsmtp.service" in unit_lines(SOCKET, "Socket")


def switch_commands(text: str) -> list[str]:
    """The systemctl commands of a switch to socket activation, in the order given."""
    start = text.index("systemctl daemon-reload")
    return re.findall(r"systemctl (daemon-reload|stop saslsmtp|enable --now\s+(?:#\s*)?"
                      r"saslsmtp\.socket|start saslsmtp|restart saslsmtp)", text[start:start + 600])


def test_the_switch_stops_the_service_before_the_socket_unit_binds() -> None:
    """The documented switch enabled saslsmtp.socket while the service still listened on
    587 and 465: the socket unit's bind fails (Address already in use; the test suite's
    ``systemd-socket-activate -l`` against a running saslsmtp says the same), and the
    service's Requires= then fails its restart.  Every copy of the steps stops the
    service first and starts it after the socket."""
    for path in (UNIT, SOCKET, ROOT / "docs" / "operations.md"):
        steps = [" ".join(step.replace("#", " ").split()) for step in
                 switch_commands(path.read_text())]
        assert steps[:4] == ["daemon-reload", "stop saslsmtp", "enable --now saslsmtp.socket",
                             "start saslsmtp"], (path.name, steps)
