"""Reload and shutdown as clients see them, on a real ``twistd -n saslsmtp`` with one
process and with two workers:

* SIGHUP with an invalid file keeps the running configuration and logs file:line: key;
  with a valid one, a session opened before keeps its old AUTH script while a new
  session gets the new one;
* SIGTERM: an idle session gets ``421 4.3.2`` at once, a session inside DATA finishes its
  message (250, stored) and one inside AUTH finishes its login before they are closed;
  the exit status is 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import ROOT, free_port, kill_leftovers, twistd_command, wait_for, write_config
from tests.test_ops_traffic import plain
from tests.test_workers import Session

SCRIPT = '''
from saslsmtp.script import Accept, Reject

def auth(arguments, context):
    return Accept() if arguments["password"] == {password!r} else Reject()
'''


class Running:
    def __init__(self, tmp_path: Path, workers: int) -> None:
        self.port = free_port()
        self.workers = workers
        (tmp_path / "auth.py").write_text(SCRIPT.format(password="one"))
        self.config = write_config(tmp_path, mechanisms=["PLAIN"], script="auth.py",
                                   listen=[f"tcp:{self.port}:interface=127.0.0.1"])
        self.log = tmp_path / "daemon.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(twistd_command(self.config, "--workers", str(workers)),
                                         cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env)
        wait_for(lambda: self.text().count("saslsmtp ready") == workers or self.proc.poll() is not None,
                 what="the daemon")
        assert self.proc.poll() is None, self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def session(self) -> Session:
        session = Session(self.port)
        assert session.send(b"EHLO client.example").startswith(b"250")
        return session

    def sending(self) -> Session:
        """A logged-in session inside DATA, the first half of its message sent."""
        sending = self.session()
        assert sending.send(plain("alice", "one")).startswith(b"235 ")
        assert sending.send(b"MAIL FROM:<alice@example.test>").startswith(b"250 ")
        assert sending.send(b"RCPT TO:<bob@example.test>").startswith(b"250 ")
        assert sending.send(b"DATA").startswith(b"354 ")
        sending.sock.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
        return sending

    def stop(self) -> None:
        kill_leftovers(self.proc, self.log)


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def daemon(request, tmp_path: Path):
    running = Running(tmp_path, request.param)
    yield running
    running.stop()


def test_reload_keeps_the_old_script_for_open_sessions(daemon: Running) -> None:
    """An invalid file is refused with file:line: key; after a valid reload the session
    opened before still logs in with the old script's password, new sessions only with
    the new one."""
    good = daemon.config.read_text()
    daemon.config.write_text(good.replace("[auth]\n", "[auth]\nbogus = 1\n"))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in daemon.text(), what="the refusal")
    assert re.search(rf"reload refused, [a-z ]+ the running configuration: "
                     rf"{re.escape(str(daemon.config))}:\d+: auth.bogus: unknown key", daemon.text())
    assert daemon.session().send(plain("alice", "one")).startswith(b"235 ")

    daemon.config.write_text(good)
    opened_before = daemon.session()
    (daemon.config.parent / "auth.py").write_text(SCRIPT.format(password="two"))
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: daemon.text().count("new sessions use it") == daemon.workers, what="the reload")
    for _ in range(3):  # whichever worker accepts
        fresh = daemon.session()
        assert fresh.send(plain("alice", "one")).startswith(b"535 ")
        assert fresh.send(plain("alice", "two")).startswith(b"235 ")
        fresh.close()
    assert opened_before.send(plain("alice", "one")).startswith(b"235 ")
    assert opened_before.send(b"QUIT").startswith(b"221 ")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0, daemon.text()


def test_sigterm_lets_data_and_auth_finish(daemon: Running) -> None:
    """SIGTERM while one session is idle, one is inside DATA and one inside AUTH: the
    idle one gets 421 4.3.2 at once; the others finish (250 and the message stored; 235)
    and are then closed with 421 4.3.2; exit status 0."""
    idle = daemon.session()
    sending = daemon.sending()
    logging_in = daemon.session()
    # the 354 and the 334 put both sessions inside DATA and AUTH: the first half of the
    # message need not have been read yet
    assert logging_in.send(b"AUTH PLAIN").startswith(b"334")

    daemon.proc.send_signal(signal.SIGTERM)
    assert idle.reply() == b"421 4.3.2 Service shutting down, closing connection\r\n"
    time.sleep(0.5)  # still inside DATA and AUTH, well after the idle one was closed
    sending.sock.sendall(b"second half\r\n")
    assert sending.send(b".").startswith(b"250 ")
    assert sending.reply().startswith(b"421 4.3.2")
    import base64
    assert logging_in.send(base64.b64encode(b"\0alice\0one")).startswith(b"235 ")
    assert logging_in.reply().startswith(b"421 4.3.2")
    assert daemon.proc.wait(30) == 0, daemon.text()
    [message] = list((daemon.config.parent / "mail" / "new").iterdir())
    assert message.read_bytes().endswith(b"first half\nsecond half\n")
    assert "Traceback" not in daemon.text()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_sigterm_does_not_wait_for_a_tls_client_that_keeps_its_connection(
        tmp_path: Path, workers: int) -> None:
    """A logged-in client on an ``ssl:`` listener that neither reads nor hangs up (a mail
    client keeping its connection) gets its 421 4.3.2, and the stop does not wait for its
    TLS close_notify: it took the whole grace and more (9-11 s) before, during which a
    socket-activated restart kept every queued client waiting."""
    import smtplib
    import ssl

    from tests.tlsutil import issue_cert, make_ca
    ca = make_ca(tmp_path)
    cert = issue_cert(ca, tmp_path)
    (tmp_path / "auth.py").write_text(SCRIPT.format(password="one"))
    port = free_port()
    config = write_config(tmp_path, mechanisms=["PLAIN"], script="auth.py",
                          listen=[f"ssl:{port}:interface=127.0.0.1"],
                          tls=(str(cert.chain_path), str(cert.key_path)))
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(twistd_command(config, "--workers", str(workers)), cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        text = lambda: log.read_text(errors="replace")  # noqa: E731
        wait_for(lambda: text().count("saslsmtp ready") == workers or proc.poll() is not None,
                 what="the daemon")
        context = ssl.create_default_context(cafile=ca.cert_path)
        client = smtplib.SMTP_SSL("127.0.0.1", port, timeout=30, context=context)
        client.ehlo("client.example")
        client.login("alice", "one")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, text()
        stopped = time.monotonic() - started
        assert client.sock.recv(200) == b"421 4.3.2 Service shutting down, closing connection\r\n"
        assert stopped < 5.0, f"the stop took {stopped:.1f}s"
        client.sock.close()
        assert "Traceback" not in text()
    finally:
        kill_leftovers(proc, log)
