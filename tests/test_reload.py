"""SIGHUP reload: an invalid file keeps the running configuration (logged as
file:line: key: message); a valid one is used by new sessions while open sessions keep
theirs; the served certificate changes (its serial, seen by a TLS client) without a
restart, with one process and with workers."""

from __future__ import annotations

import datetime
import signal
import socket
import ssl
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from saslsmtp.serving import Reloader, build_factory, start_runners, stop_wiring
from saslsmtp.service import load
from tests.support import free_port, wait_for, workers_daemon, write_config

BACKEND = '[backends.users]\ntype = "file"\npath = "{path}"\n'


def write_cert(folder: Path, serial: int) -> tuple[Path, Path]:
    """A self-signed certificate for mx.example.test with ``serial``, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.example.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.example.test")]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TLSSession:
    """An implicit-TLS SMTP client that remembers the server certificate's serial."""

    def __init__(self, port: int) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="mx.example.test")
        self.serial = x509.load_der_x509_certificate(self.sock.getpeercert(binary_form=True)).serial_number
        self.greeting = self.sock.recv(1000)

    def send(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        data = b""
        while not data.endswith(b"\r\n") or data.splitlines()[-1][3:4] != b" ":
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


@pytest_twisted.ensureDeferred
async def test_reloader_swaps_for_new_sessions_and_refuses_broken_files(tmp_path: Path) -> None:
    """Reloader in-process: a broken file changes nothing and names file:line: key; a
    valid one gives new protocols the new portal while an open one keeps the old; the
    old wiring stops once its last session is gone."""
    from twisted.internet import reactor
    (tmp_path / "users").write_text("alice:{PLAIN}wonderland\n")
    config = write_config(tmp_path, BACKEND.format(path=tmp_path / "users"))
    factory = build_factory(load(str(config)), reactor)
    start_runners(factory.wiring)
    clock = Clock()
    reloader = Reloader(str(config), factory, reactor, clock=clock)
    old = factory.wiring
    before = factory.buildProtocol(None)
    factory.connections.add(before)  # an open session
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        good = config.read_text()
        config.write_text(good.replace("[auth]\n", "[auth]\nscript_max_steps = 0\n"))
        assert reloader.reload() is False
        assert factory.wiring is old
        from twisted.logger import formatEvent
        messages = [formatEvent(e) for e in events]
        assert any(f"{config}:" in m and ": auth.script_max_steps: must be at least 1" in m
                   and "keeping the running configuration" in m for m in messages), messages

        config.write_text(good.replace("failure_delay = 0.0", "failure_delay = 2.5"))
        assert reloader.reload() is True
        new = factory.wiring
        assert new is not old and new.settings.failure_delay == 2.5
        after = factory.buildProtocol(None)
        assert after.portal is new.portal and before.portal is old.portal
        assert all(r.pool.started for r in new.runners)  # started for new sessions
        clock.advance(1)
        assert old.runners[0].pool.started  # `before` still open: the old pools keep going
        factory.forget(before)
        clock.advance(1)
        assert not any(r.pool.started for r in old.runners)
        assert reloader.retiring == []
    finally:
        globalLogPublisher.removeObserver(events.append)
        reloader.stop()
        stop_wiring(factory.wiring)


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_rotates_the_certificate(tmp_path: Path, workers: int) -> None:
    """The daemon serves serial 1001; the files are replaced by serial 2002 and SIGHUP
    is sent: new connections get 2002, a session opened before keeps working."""
    (tmp_path / "users").write_text("alice:{PLAIN}wonderland\n")
    cert, key = write_cert(tmp_path, 1001)
    port = free_port()
    config = write_config(tmp_path, BACKEND.format(path=tmp_path / "users"), tls=(str(cert), str(key)),
                          listen=[f"ssl:{port}:interface=127.0.0.1"])
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, workers, "--workers", str(workers)) as proc:
        opened_before = TLSSession(port)
        assert opened_before.serial == 1001
        assert opened_before.send(b"EHLO client.example").startswith(b"250")
        write_cert(tmp_path, 2002)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: log.read_text().count("new sessions use it") == workers, what="the reload")
        for _ in range(4):  # whichever worker accepts
            fresh = TLSSession(port)
            assert fresh.serial == 2002
            fresh.close()
        assert opened_before.send(b"NOOP").startswith(b"250")
        opened_before.close()
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
        assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_deleted_script_is_refused_in_one_line(tmp_path: Path, workers: int) -> None:
    """The AUTH script is deleted, then SIGHUP: one line says the file is missing.  A
    second one followed, "auth.backends: is empty and no auth.script is set" (the table
    was checked again without the refused key), which sent the operator to the wrong
    key; and the running script still answers."""
    import base64
    import os
    (tmp_path / "auth.py").write_text("from saslsmtp.script import Accept, Reject\n\n"
                                      "def auth(arguments, context):\n"
                                      "    return Accept() if arguments['password'] == 'pw'"
                                      " else Reject()\n")
    port = free_port()
    config = write_config(tmp_path, mechanisms=["PLAIN"], backends=[], script="auth.py",
                          listen=[f"tcp:{port}:interface=127.0.0.1"])
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, workers, "--workers", str(workers)) as master:
        (tmp_path / "auth.py").unlink()
        os.kill(master.pid, signal.SIGHUP)
        wait_for(lambda: "reload refused" in log.read_text(), what="the reload refused")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"EHLO c\r\nAUTH PLAIN " + base64.b64encode(b"\0u\0pw") + b"\r\n")
            got = b""
            while b"\r\n235 " not in got and not got.startswith(b"235 "):
                chunk = client.recv(4096)
                assert chunk, got
                got += chunk
        refused = [line for line in log.read_text().splitlines() if "reload refused" in line]
    assert len(refused) == 1, refused
    from saslsmtp.config import key_lines
    line = key_lines(config.read_text())["auth.script"]
    assert refused[0].endswith(f"{config}:{line}: auth.script: no such file: {tmp_path / 'auth.py'}")


def test_a_missing_script_is_one_problem_for_custom_mechanisms_too(tmp_path: Path) -> None:
    """A mechanism only the script serves: the missing file is the one problem, not also
    "X-TOKEN is not built in and no auth.script is set to serve it"."""
    from saslsmtp.config import ConfigError
    config = write_config(tmp_path, mechanisms=["PLAIN", "X-TOKEN"], backends=[],
                          script="gone.py")
    with pytest.raises(ConfigError) as e:
        load(str(config))
    assert [p.key for p in e.value.problems] == ["auth.script"], str(e.value)
