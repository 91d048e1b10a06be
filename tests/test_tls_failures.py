"""TLS handshakes that fail, and client certificates that do not serve EXTERNAL, as real
clients see them and as the operator reads them in the log:

* a plaintext client on an ``ssl:`` listener (an SMTP client that talks first, a
  browser) and plaintext sent after STARTTLS: the connection closes at once, and one
  info line says ``TLS handshake with IP failed: wrong version number`` (or ``http
  request``), not an error with a traceback;
* a client that refuses our certificate (``openssl s_client -verify_return_error``):
  the line carries its alert;
* client certificates against ``[tls] client_ca``: the certificate request names its
  CAs (so clients that choose by them send a fitting certificate or none); expired,
  not yet valid or from another CA fail the handshake (the client gets OpenSSL's alert) and the line says
  why in OpenSSL's words; a verified certificate without the configured identity (no
  CN, no e-mail subjectAltName) gets ``535 5.7.8 No identity in the client
  certificate``, not "No verified client certificate".

The servers run in this process (tests/support.start_server); the clients run in a
thread so the reactor keeps serving.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor, task, threads
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests.conftest import require_binary
from tests.support import RunningServer, start_server
from tests.tlsutil import CA, IssuedCert, issue_cert, issue_client_cert, make_ca

USERS = "alice:{PLAIN}wonderland\n"


class LogWatch:
    """Every log event while it is open; ``lines`` as an operator reads them."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __enter__(self) -> "LogWatch":
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def lines(self, needle: str = "") -> list[str]:
        return [text for text in (formatEvent(e) for e in self.events) if needle in text]

    async def wait_for(self, needle: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        """The lines holding ``needle`` once there are ``count`` (polled on the reactor)."""
        deadline = time.monotonic() + timeout
        while len(self.lines(needle)) < count:
            assert time.monotonic() < deadline, f"no log line with {needle!r}: {self.lines()}"
            await task.deferLater(reactor, 0.02, lambda: None)
        return self.lines(needle)

    def assert_calm(self) -> None:
        """Nothing logged above info, no traceback: a client's mistake is no incident."""
        loud = [formatEvent(e) for e in self.events
                if e.get("log_failure") is not None
                or e.get("log_level", LogLevel.info) > LogLevel.info]
        assert loud == [], loud


async def tls_server(tmp_path: Path, listen: str, client_ca: str | None = None,
                     identity: str = "cn") -> tuple[RunningServer, IssuedCert, CA]:
    ca = make_ca(tmp_path, "server CA")
    cert = issue_cert(ca, tmp_path)
    (tmp_path / "users").write_text(USERS)
    tls = f'[tls]\ncertificate = "{cert.chain_path}"\nprivate_key = "{cert.key_path}"\n'
    mechanisms = ["PLAIN"]
    if client_ca is not None:
        tls += f'client_ca = "{client_ca}"\nclient_identity = "{identity}"\n'
        mechanisms.append("EXTERNAL")
    server = await start_server(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                                listen=[listen], mechanisms=mechanisms, extra=tls, require_tls=True)
    return server, cert, ca


def until_closed(port: int, steps: Callable[[socket.socket], None]) -> tuple[bytes, float]:
    """Connect, run ``steps``, then read until the server closes: (what came, seconds)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        steps(sock)
        started, data = time.monotonic(), b""
        while chunk := sock.recv(4096):
            data += chunk
        return data, time.monotonic() - started


def talk_first(line: bytes) -> Callable[[socket.socket], None]:
    return lambda sock: sock.sendall(line)


def starttls_then(line: bytes) -> Callable[[socket.socket], None]:
    def steps(sock: socket.socket) -> None:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"EHLO client.example\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        sock.sendall(b"STARTTLS\r\n")
        assert reader.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        sock.sendall(line)  # plaintext where the ClientHello belongs
    return steps


@pytest.mark.parametrize("listen, steps, why", [
    ("ssl:0:interface=127.0.0.1", talk_first(b"EHLO client.example\r\n"), "wrong version number"),
    ("ssl:0:interface=127.0.0.1", talk_first(b"GET / HTTP/1.1\r\nHost: mx\r\n\r\n"), "http request"),
    ("tcp:0:interface=127.0.0.1", starttls_then(b"NOOP\r\n"), "wrong version number"),
], ids=["smtp-on-ssl", "http-on-ssl", "plaintext-after-starttls"])
@pytest_twisted.ensureDeferred
async def test_plaintext_where_tls_belongs_is_closed_and_logged(tmp_path: Path, listen: str,
                                                                steps: Any, why: str) -> None:
    """A plaintext client on the TLS port (or after STARTTLS) is closed at once, without a
    greeting, and the log says so in one info line naming the client."""
    server, _, _ = await tls_server(tmp_path, listen)
    try:
        with LogWatch() as watch:
            data, seconds = await threads.deferToThread(until_closed, server.port, steps)
            lines = await watch.wait_for("TLS handshake with")
    finally:
        await server.stop()
    assert data == b"" and seconds < 5, (data, seconds)
    assert lines == [f"TLS handshake with 127.0.0.1 failed: {why}"]
    watch.assert_calm()


@pytest_twisted.ensureDeferred
async def test_a_client_refusing_our_certificate_is_logged_with_its_alert(tmp_path: Path) -> None:
    """openssl s_client that does not trust our CA ends the STARTTLS handshake with an
    alert; the line carries it."""
    openssl = require_binary("openssl")
    server, _, _ = await tls_server(tmp_path, "tcp:0:interface=127.0.0.1")
    stranger = make_ca(tmp_path, "some other CA")
    try:
        with LogWatch() as watch:
            result = await threads.deferToThread(
                subprocess.run, [openssl, "s_client", "-connect", f"127.0.0.1:{server.port}",
                                 "-starttls", "smtp", "-verify_return_error",
                                 "-CAfile", stranger.cert_path],
                input=b"", capture_output=True, timeout=30)
            lines = await watch.wait_for("TLS handshake with")
    finally:
        await server.stop()
    assert result.returncode != 0, result
    assert lines == ["TLS handshake with 127.0.0.1 failed: tlsv1 alert unknown ca"]
    watch.assert_calm()


def external(port: int, cert: IssuedCert | None) -> Any:
    """STARTTLS with ``cert`` (and its key), EHLO, ``AUTH EXTERNAL =``: the reply, or the
    name of the error when TLS failed."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        context.load_cert_chain(cert.cert_path, cert.key_path)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("client.example")
            s.starttls(context=context)
            s.ehlo("client.example")
            return s.docmd("AUTH", "EXTERNAL =")
    except (ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError) as e:
        return type(e).__name__


@pytest_twisted.ensureDeferred
async def test_client_certificates_that_do_not_verify_are_refused_and_logged(tmp_path: Path) -> None:
    """Expired, not yet valid, another CA: the handshake fails (the client gets OpenSSL's
    alert, never an SMTP reply) and the log says which, in OpenSSL's words; a good one
    logs in."""
    client_ca = make_ca(tmp_path, "client CA")
    server, _, _ = await tls_server(tmp_path, "tcp:0:interface=127.0.0.1", client_ca.cert_path)
    certs = [issue_client_cert(client_ca, tmp_path),
             issue_client_cert(client_ca, tmp_path, valid_days=(-10, -1)),
             issue_client_cert(client_ca, tmp_path, valid_days=(1, 30)),
             issue_client_cert(make_ca(tmp_path, "rogue CA"), tmp_path)]
    try:
        with LogWatch() as watch:
            replies = [await threads.deferToThread(external, server.port, cert) for cert in certs]
            lines = await watch.wait_for("TLS handshake with", count=3)
    finally:
        await server.stop()
    assert replies[0] == (235, b"2.7.0 Authentication successful")
    assert all(isinstance(reply, str) for reply in replies[1:]), replies
    prefix = "TLS handshake with 127.0.0.1 failed: certificate verify failed (client certificate: "
    assert len(lines) == 3 and all(line.startswith(prefix) for line in lines), lines
    why = [line[len(prefix):-1] for line in lines]
    assert why[0] == "certificate has expired"
    assert why[1].startswith("certificate is not yet valid")  # OpenSSL 4 adds "or the system clock..."
    assert why[2] == "unable to get local issuer certificate"
    watch.assert_calm()


@pytest.mark.parametrize("identity, cert_names", [
    ("cn", {"cn": None, "email": "alice@example.test"}),
    ("email", {"cn": "alice"}),
])
@pytest_twisted.ensureDeferred
async def test_a_verified_certificate_without_the_identity_says_so(
        tmp_path: Path, identity: str, cert_names: dict[str, Any]) -> None:
    """A certificate that verifies but has no CN (``client_identity = "cn"``) or no e-mail
    subjectAltName (``"email"``): 535 names the missing identity; no certificate at all
    is still "No verified client certificate"."""
    client_ca = make_ca(tmp_path, "client CA")
    server, _, _ = await tls_server(tmp_path, "tcp:0:interface=127.0.0.1", client_ca.cert_path,
                                    identity)
    nameless = issue_client_cert(client_ca, tmp_path, **cert_names)
    try:
        with LogWatch() as watch:
            replies = [await threads.deferToThread(external, server.port, cert)
                       for cert in (nameless, None)]
    finally:
        await server.stop()
    assert replies == [(535, b"5.7.8 No identity in the client certificate"),
                       (535, b"5.7.8 No verified client certificate")]
    assert watch.lines("TLS handshake with") == []
    watch.assert_calm()


@pytest_twisted.ensureDeferred
async def test_the_certificate_request_names_the_client_cas(tmp_path: Path) -> None:
    """openssl s_client lists the CAs the server will accept client certificates from
    (Twisted sent "No client certificate CA names"): every CA in client_ca."""
    openssl = require_binary("openssl")
    first, second = make_ca(tmp_path, "client CA one"), make_ca(tmp_path, "client CA two")
    bundle = tmp_path / "client-cas.pem"
    bundle.write_bytes(Path(first.cert_path).read_bytes() + Path(second.cert_path).read_bytes())
    server, _, _ = await tls_server(tmp_path, "ssl:0:interface=127.0.0.1", str(bundle))
    try:
        result = await threads.deferToThread(
            subprocess.run, [openssl, "s_client", "-connect", f"127.0.0.1:{server.port}"],
            input=b"", capture_output=True, timeout=30)
    finally:
        await server.stop()
    out = result.stdout.decode(errors="replace")
    assert "Acceptable client certificate CA names\nCN = client CA one\nCN = client CA two\n" in out, out
