"""Started as root with ``[server] user = "nobody"``: the listeners (a port below 1024,
which nobody could not bind) are bound first, then every process runs as nobody and
still serves them; with one process and with a master and two workers."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import require
from tests.support import ROOT, alive, twistd_command, wait_for, worker_pids, write_config
from tests.test_workers import Session

USERS = "alice:{PLAIN}wonderland\n"


def low_port() -> int:
    """A free privileged port on 127.0.0.1 (never 25)."""
    for port in range(1023, 900, -1):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.fail("no free port between 901 and 1023 on 127.0.0.1")


def uids(pid: int) -> list[int]:
    """Real, effective, saved and filesystem uid of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(v) for v in line.split()[1:]]
    raise AssertionError("no Uid line")


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A folder nobody can read (pytest's tmp_path is root's, mode 0700), its Maildir
    writable by nobody."""
    require(os.geteuid() == 0,
            "needs root: the test starts the daemon as root to watch it drop to nobody")
    nobody = pwd.getpwnam("nobody")
    path = Path(tempfile.mkdtemp(prefix="saslsmtp-privileges-"))
    os.chmod(path, 0o755)
    (path / "mail").mkdir()
    os.chown(path / "mail", nobody.pw_uid, nobody.pw_gid)
    (path / "users").write_text(USERS)
    os.chmod(path / "users", 0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_root_binds_then_runs_as_nobody(nobody_dir: Path, workers: int) -> None:
    """Every saslsmtp process runs as nobody, AUTH and delivery work on the low port."""
    port = low_port()
    config = write_config(nobody_dir, f'[backends.users]\ntype = "file"\npath = "{nobody_dir / "users"}"\n',
                          mechanisms=["PLAIN"], listen=[f"tcp:{port}:interface=127.0.0.1"],
                          extra="")
    text = config.read_text().replace("[server]\n", f'[server]\nuser = "nobody"\nworkers = {workers}\n')
    config.write_text(text)
    os.chmod(config, 0o644)
    log = nobody_dir / "daemon.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as out:
        proc = subprocess.Popen(twistd_command(config), cwd=nobody_dir, stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        if workers == 1:
            wait_for(lambda: "running as uid" in log.read_text() or proc.poll() is not None,
                     what="the privilege drop")
            served_by = [proc.pid]
        else:
            wait_for(lambda: log.read_text().count(" serving ") == 2 or proc.poll() is not None,
                     what="two workers serving")
            served_by = list(worker_pids(log).values())
        assert proc.poll() is None, log.read_text()
        nobody = pwd.getpwnam("nobody").pw_uid
        for pid in served_by:
            assert uids(pid) == [nobody] * 4, (pid, log.read_text())
        session = Session(port)
        assert session.login().startswith(b"235 "), log.read_text()
        assert session.send(b"MAIL FROM:<alice@example.test>").startswith(b"250 ")
        assert session.send(b"RCPT TO:<bob@example.test>").startswith(b"250 ")
        assert session.send(b"DATA").startswith(b"354 ")
        assert session.send(b"Subject: low port\r\n\r\nhi\r\n.").startswith(b"250 "), log.read_text()
        session.close()
        delivered = list((nobody_dir / "mail" / "new").iterdir())
        assert len(delivered) == 1 and delivered[0].stat().st_uid == nobody
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        assert not any(alive(pid) for pid in served_by)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
