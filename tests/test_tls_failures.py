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
  not yet valid, another CA's or for servers only, the handshake completes (as with
  Postfix's ``smtpd_tls_ask_ccert``): PLAIN and SCRAM-PLUS work, EXTERNAL's 535 and
  the auth-failed line say why in OpenSSL's words, and a resumed session is judged
  again; a verified certificate without the configured identity (no CN, no e-mail
  subjectAltName) gets ``535 5.7.8 No identity in the client certificate``, not "No
  verified client certificate".

The servers run in this process (tests/support.start_server); the clients run in a
thread so the reactor keeps serving.
"""

from __future__ import annotations

import base64
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
                     identity: str = "cn", more: tuple[str, ...] = ()) -> tuple[RunningServer, IssuedCert, CA]:
    ca = make_ca(tmp_path, "server CA")
    cert = issue_cert(ca, tmp_path)
    (tmp_path / "users").write_text(USERS)
    tls = f'[tls]\ncertificate = "{cert.chain_path}"\nprivate_key = "{cert.key_path}"\n'
    mechanisms = ["PLAIN", *more]
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


def tls_client(cert: IssuedCert | None) -> ssl.SSLContext:
    """A client context that does not check our certificate, presenting ``cert``."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        context.load_cert_chain(cert.cert_path, cert.key_path)
    return context


def external(port: int, cert: IssuedCert | None, then_plain: bool = False) -> Any:
    """STARTTLS with ``cert`` (and its key), EHLO, ``AUTH EXTERNAL =``: the reply, or the
    name of the error when TLS failed; with ``then_plain``, the replies to EXTERNAL and
    then to AUTH PLAIN on the same connection."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("client.example")
            s.starttls(context=tls_client(cert))
            s.ehlo("client.example")
            reply = s.docmd("AUTH", "EXTERNAL =")
            if then_plain:
                return reply, s.docmd("AUTH", "PLAIN AGFsaWNlAHdvbmRlcmxhbmQ=")  # alice, wonderland
            return reply
    except (ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError) as e:
        return type(e).__name__


@pytest_twisted.ensureDeferred
async def test_client_certificates_that_do_not_verify_complete_the_handshake(tmp_path: Path) -> None:
    """Expired, not yet valid, another CA's, or one for servers (no clientAuth): the
    handshake completes, as with Postfix's ``smtpd_tls_ask_ccert``; EXTERNAL answers 535
    naming why, in OpenSSL's words, the auth-failed line (fail2ban's) says the same, and
    AUTH PLAIN works on that very connection.  A good certificate logs in."""
    client_ca = make_ca(tmp_path, "client CA")
    server, _, _ = await tls_server(tmp_path, "tcp:0:interface=127.0.0.1", client_ca.cert_path)
    certs = [issue_client_cert(client_ca, tmp_path, valid_days=(-10, -1)),
             issue_client_cert(client_ca, tmp_path, valid_days=(1, 30)),
             issue_client_cert(make_ca(tmp_path, "rogue CA"), tmp_path),
             issue_cert(client_ca, tmp_path, names=["alice"])]  # serverAuth only
    try:
        with LogWatch() as watch:
            good = await threads.deferToThread(external, server.port,
                                               issue_client_cert(client_ca, tmp_path))
            replies = [await threads.deferToThread(external, server.port, cert, True)
                       for cert in certs]
            lines = await watch.wait_for("auth failed:", count=4)
    finally:
        await server.stop()
    assert good == (235, b"2.7.0 Authentication successful")
    why = ["certificate has expired", "certificate is not yet valid",
           "unable to get local issuer certificate", "unsuitable certificate purpose"]
    for (refused, plain), reason in zip(replies, why):
        code, text = refused
        assert code == 535 and text.startswith(b"5.7.8 Client certificate not verified: "
                                               + reason.encode()), refused
        assert plain == (235, b"2.7.0 Authentication successful")
    assert len(lines) == 4, lines
    for line, reason in zip(lines, why):
        assert ('auth failed: client=127.0.0.1 mechanism=EXTERNAL user="" '
                f'reason="client certificate not verified: {reason}') in line, line
    assert watch.lines("TLS handshake with") == []
    watch.assert_calm()


@pytest_twisted.ensureDeferred
async def test_swaks_with_an_expired_certificate_logs_in_with_plain(tmp_path: Path) -> None:
    """A real client (swaks) presenting an expired client certificate completes STARTTLS
    and logs in with PLAIN; before, its handshake failed and it could not log in at all."""
    swaks = require_binary("swaks")
    client_ca = make_ca(tmp_path, "client CA")
    server, _, _ = await tls_server(tmp_path, "tcp:0:interface=127.0.0.1", client_ca.cert_path)
    stale = issue_client_cert(client_ca, tmp_path, valid_days=(-10, -1))
    try:
        result = await threads.deferToThread(
            subprocess.run, [swaks, "--server", f"127.0.0.1:{server.port}", "-tls",
                             "--tls-cert", stale.cert_path, "--tls-key", stale.key_path,
                             "--auth", "PLAIN", "--auth-user", "alice",
                             "--auth-password", "wonderland", "--quit-after", "AUTH"],
            capture_output=True, timeout=30)
    finally:
        await server.stop()
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    assert "<~  235 2.7.0 Authentication successful" in out, out


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


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13-ticket", "tls12-session"])
@pytest_twisted.ensureDeferred
async def test_a_resumed_session_is_judged_again(tmp_path: Path, tls12: bool) -> None:
    """A session resumed with a ticket (or a TLS 1.2 session ID) runs no verification in
    the handshake: the certificate it carries is judged again, so an expired one stays
    refused on the resumed connection and a good one still logs in."""
    from tests.test_tls_context import client_context, tls_session
    client_ca = make_ca(tmp_path, "client CA")
    server, _, _ = await tls_server(tmp_path, "tcp:0:interface=127.0.0.1", client_ca.cert_path)
    seen: dict[str, list[dict]] = {}
    try:
        for name, valid_days in (("good", (-1, 30)), ("expired", (-10, -1))):
            cert = issue_client_cert(client_ca, tmp_path, valid_days=valid_days)
            context = client_context(tls12)
            context.load_cert_chain(cert.cert_path, cert.key_path)
            first = await threads.deferToThread(tls_session, server.port, context,
                                                auth=b"AUTH EXTERNAL =")
            again = await threads.deferToThread(tls_session, server.port, context, first["session"],
                                                auth=b"AUTH EXTERNAL =")
            seen[name] = [first, again]
    finally:
        await server.stop()
    assert [s["reused"] for s in seen["good"] + seen["expired"]] == [False, True, False, True]
    assert [s["auth"] for s in seen["good"]] == [b"235 2.7.0 Authentication successful"] * 2
    assert [s["auth"] for s in seen["expired"]] == [
        b"535 5.7.8 Client certificate not verified: certificate has expired"] * 2


@pytest.mark.parametrize("priority", ["NORMAL", "NORMAL:-VERS-TLS1.3"], ids=["tls13", "tls12"])
@pytest_twisted.ensureDeferred
async def test_scram_plus_binds_with_an_unverified_certificate(tmp_path: Path, priority: str) -> None:
    """gsasl (GnuTLS) presenting an expired certificate from client_ca gets through the
    handshake and logs in with SCRAM-SHA-256-PLUS, bound to that very TLS connection
    (tls-exporter on TLS 1.3, tls-unique on TLS 1.2)."""
    gsasl = require_binary("gsasl")
    client_ca = make_ca(tmp_path, "client CA")
    server, _, server_ca = await tls_server(tmp_path, "tcp:0:interface=127.0.0.1", client_ca.cert_path,
                                            more=("SCRAM-SHA-256-PLUS",))
    stale = issue_client_cert(client_ca, tmp_path, valid_days=(-10, -1))
    try:
        done = await threads.deferToThread(
            subprocess.run, [gsasl, "--smtp", "--starttls", f"--x509-ca-file={server_ca.cert_path}",
                             f"--x509-cert-file={stale.cert_path}", f"--x509-key-file={stale.key_path}",
                             f"--priority={priority}", "-m", "SCRAM-SHA-256-PLUS", "-a", "alice",
                             "-p", "wonderland", "--quiet", "127.0.0.1", str(server.port)],
            capture_output=True, timeout=30)
    finally:
        await server.stop()
    out = done.stdout.decode(errors="replace")
    binding = "tls-exporter" if priority == "NORMAL" else "tls-unique"
    lines = out.splitlines()
    client_first = base64.b64decode(lines[lines.index("334 ") + 1]) if "334 " in lines else b""
    assert client_first.startswith(f"p={binding},,n=alice,".encode()), out
    assert done.returncode == 0 and "235 2.7.0" in out, out + done.stderr.decode(errors="replace")


def test_fail2ban_sees_the_refusal_and_the_documented_ignoreregex_exempts_it(tmp_path: Path) -> None:
    """The shipped filter matches EXTERNAL's "client certificate not verified: ..." line
    like any failed AUTH; the ignoreregex docs/limits.md gives for exempting EXTERNAL's
    failures exempts it too (and not a PLAIN failure)."""
    import re

    from saslsmtp.limits.faillog import log_auth_failure
    from tests.test_limits_faillog import FILTER, twisted_lines
    binary = require_binary("fail2ban-regex", "fail2ban")
    docs = (Path(__file__).resolve().parent.parent / "docs" / "limits.md").read_text()
    found = re.search(r"`ignoreregex = (.*?)`", docs)
    assert found is not None
    reasons = ["no client certificate", "no identity in the client certificate",
               "client certificate not verified: certificate has expired",
               "client certificate not verified: unable to get local issuer certificate"]
    calls: list[Any] = [(log_auth_failure, (f"192.0.2.{n + 1}", "EXTERNAL", "", reason))
                        for n, reason in enumerate(reasons)]
    calls.append((log_auth_failure, ("198.51.100.9", "PLAIN", "alice")))
    log = tmp_path / "saslsmtp.log"
    log.write_text("".join(twisted_lines(calls)))
    every = subprocess.run([binary, "-o", "ip", str(log), str(FILTER)], capture_output=True,
                           text=True, timeout=60)
    exempt = subprocess.run([binary, "-o", "ip", str(log), str(FILTER), found.group(1)],
                            capture_output=True, text=True, timeout=60)
    assert every.stdout.split() == ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4",
                                    "198.51.100.9"], every
    assert exempt.stdout.split() == ["198.51.100.9"], exempt
