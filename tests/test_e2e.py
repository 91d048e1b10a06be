"""End to end over real loopback TCP: smtplib and swaks against saslsmtp, in plaintext,
with STARTTLS and with implicit TLS; mail lands in the Maildir; each password scheme
logs in over the wire."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.conftest import require_binary
from tests.support import smtp_login, start_server
from tests.tlsutil import issue_cert, make_ca

SWAKS = "/usr/bin/swaks"

# Dovecot's vectors for the password "test" (made with `doveadm pw`), one user per scheme.
SCHEME_VECTORS = {
    "plain": "{PLAIN}test",
    "crypt": "{CRYPT}//EsnG9FLTKjo",
    "md5crypt": "{MD5-CRYPT}$1$GgvxyNz8$OjZhLh4P.gF1lxYEbLZ3e/",
    "blf": "{BLF-CRYPT}$2y$05$11ipvo5dR6CwkzwmhwM26OXgzXwhV2PyPuLV.Qi31ILcRcThQpEiW",
    "argon2id": "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$vBb99oJ12p3WAdYlaMHz1A$jtFOtbo/sYV9OSlTxDo/nVNq3uArHd5GJSEx0ty85Cc",
    "sha1": "{SHA1}qUqP5cyxm6YcTAhz05Hph5gvu9M=",
    "ssha": "{SSHA}H/zrDv8FXUu1JmwvVYijfrYEF34jVZcO",
    "sha256": "{SHA256}n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=",
    "smd5": "{SMD5}JTu1KRwptKZJg/RLd+6Vn5GUd0M=",
    "ldapmd5": "{LDAP-MD5}CY9rzUYh03PK3k6DJie09g==",
    "crammd5": "{CRAM-MD5}e02d374fde0dc75a17a557039a3a5338c7743304777dccd376f332bee68d2cf6",
    "scram1": "{SCRAM-SHA-1}4096,GetyLXdBuHzf1FWf8SLz2Q==,NA/OqmF4hhrsrB9KR7po+dliTGM=,QBiURvQaE6H6qYTmeghDHLANBFQ=",
    "scram256": "{SCRAM-SHA-256}4096,LfNGSFqiFykEZ1xDAYlnKQ==,HACNf9CII7cMz3XjRy/Oh3Ae2LHApoDyNw74d3YtFws=,AQH0j7Hf8J12g8eNBadvzlNB2am3PxgNwFCFd3RxEaw=",
    "pbkdf2": "{PBKDF2}$1$bUnT4Pl7yFtYX0KU$5000$50a83cafdc517b9f46519415e53c6a858908680a",
}


def users_backend(tmp_path: Path, lines: dict[str, str]) -> str:
    path = tmp_path / "users"
    path.write_text("".join(f"{user}:{secret}\n" for user, secret in lines.items()))
    return f'[backends.users]\ntype = "file"\npath = "{path}"\n'


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str, str]:
    ca = make_ca(tmp_path)
    cert = issue_cert(ca, tmp_path, names=["localhost", "127.0.0.1"])
    return cert.chain_path, cert.key_path, ca.cert_path


def client_context(ca_path: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_path)
    ctx.check_hostname = False  # the certificate names localhost and 127.0.0.1; smtplib passes the IP
    return ctx


def send_with_smtplib(port: int, user: str, password: str, *, starttls_ca: str | None = None,
                      implicit_ca: str | None = None) -> dict:
    if implicit_ca:
        s = smtplib.SMTP_SSL("127.0.0.1", port, context=client_context(implicit_ca), timeout=10)
    else:
        s = smtplib.SMTP("127.0.0.1", port, timeout=10)
    with s:
        s.ehlo("client.example")
        if starttls_ca:
            s.starttls(context=client_context(starttls_ca))
            s.ehlo("client.example")
        s.login(user, password)
        return s.sendmail(f"{user}@example.test", ["rcpt@example.test"],
                          b"Subject: e2e\r\n\r\nhello over the wire\r\n")


@pytest_twisted.ensureDeferred
async def test_smtplib_plaintext_submission(tmp_path: Path) -> None:
    """smtplib logs in and sends; the Maildir has the message with an ESMTPA Received line."""
    server = await start_server(tmp_path, users_backend(tmp_path, {"alice": "{PLAIN}wonderland"}))
    try:
        refused = await threads.deferToThread(send_with_smtplib, server.port, "alice", "wonderland")
        assert refused == {}
        [message] = server.messages()
        assert b"with ESMTPA\n\t(authenticated user alice)" in message
        assert message.endswith(b"\nhello over the wire\n")
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_smtplib_starttls_submission(tmp_path: Path, tls_files) -> None:
    """require_tls: PLAIN only after STARTTLS; the Received line then says ESMTPSA."""
    cert, key, ca = tls_files
    server = await start_server(tmp_path, users_backend(tmp_path, {"alice": "{PLAIN}wonderland"}),
                                require_tls=True, tls=(cert, key))
    try:
        await threads.deferToThread(send_with_smtplib, server.port, "alice", "wonderland",
                                    starttls_ca=ca)
        [message] = server.messages()
        assert b"with ESMTPSA\n\t(authenticated user alice)" in message
        with pytest.raises(smtplib.SMTPNotSupportedError):
            await threads.deferToThread(send_with_smtplib, server.port, "alice", "wonderland")
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_smtplib_implicit_tls_submission(tmp_path: Path, tls_files) -> None:
    """An ssl: listener (465 style) uses the [tls] certificate; ESMTPSA."""
    cert, key, ca = tls_files
    server = await start_server(tmp_path, users_backend(tmp_path, {"alice": "{PLAIN}wonderland"}),
                                require_tls=True, tls=(cert, key),
                                listen=["ssl:0:interface=127.0.0.1"])
    try:
        await threads.deferToThread(send_with_smtplib, server.port, "alice", "wonderland",
                                    implicit_ca=ca)
        [message] = server.messages()
        assert b"with ESMTPSA" in message
    finally:
        await server.stop()


def swaks(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SWAKS, "--server", f"127.0.0.1:{port}", "--to", "rcpt@example.test",
                           "--from", "alice@example.test", "--helo", "swaks.example", *args],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
@pytest_twisted.ensureDeferred
async def test_swaks(tmp_path: Path, tls_files, mechanism: str, tls: str) -> None:
    """swaks --auth PLAIN/LOGIN in plaintext, STARTTLS and implicit TLS: 235 and 250;
    a wrong password: 535 5.7.8."""
    require_binary(SWAKS)
    cert, key, _ca = tls_files
    listen = ["ssl:0:interface=127.0.0.1"] if tls == "implicit" else None
    server = await start_server(tmp_path, users_backend(tmp_path, {"alice": "{PLAIN}wonderland"}),
                                require_tls=tls != "none", tls=(cert, key), listen=listen)
    flags = {"none": [], "starttls": ["--tls"], "implicit": ["--tlsc"]}[tls]
    try:
        ok = await threads.deferToThread(swaks, server.port, "--auth", mechanism, "--auth-user",
                                         "alice", "--auth-password", "wonderland", *flags)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "<~  235 2.7.0 Authentication successful" in ok.stdout or \
            "<-  235 2.7.0 Authentication successful" in ok.stdout
        assert "250 2.0.0 OK: queued" in ok.stdout
        bad = await threads.deferToThread(swaks, server.port, "--auth", mechanism, "--auth-user",
                                          "alice", "--auth-password", "nope", *flags)
        assert "535 5.7.8 Authentication credentials invalid" in bad.stdout
        assert len(server.messages()) == 1
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_every_password_scheme_over_the_wire(tmp_path: Path) -> None:
    """Each Dovecot scheme vector (password "test") logs in with smtplib PLAIN; a wrong
    password does not."""
    server = await start_server(tmp_path, users_backend(tmp_path, SCHEME_VECTORS), max_failures=50)
    try:
        for user in SCHEME_VECTORS:
            assert await smtp_login(server.port, user, "test") == (
                235, b"2.7.0 Authentication successful"), user
            code, _ = await smtp_login(server.port, user, "wrong")
            assert code == 535, user
    finally:
        await server.stop()


def raw_session(port: int, payload: bytes, after: bytes = b"", then: bytes = b"") -> bytes:
    """What the server sent after its greeting, up to its close (which must come: a
    server still silent after 5 s fails the test).  With ``after``, ``then`` is sent once
    the server's output ends with ``after``."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.recv(200)
        s.sendall(payload)
        chunks = []
        if after:
            while not b"".join(chunks).endswith(after):
                chunks.append(s.recv(65536))
            s.sendall(then)
        try:
            while data := s.recv(65536):
                chunks.append(data)
        except socket.timeout:
            raise AssertionError(f"no close within 5 s; the server sent {b''.join(chunks)!r}")
        return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_bad_input_over_tcp_and_others_still_served(tmp_path: Path, tls_files) -> None:
    """Garbage after STARTTLS, bare LF (served as CRLF), a 1 MB line, NUL bytes: each gets
    a reply or a clean close, and a well-behaved client is served afterwards."""
    cert, key, _ = tls_files
    server = await start_server(tmp_path, users_backend(tmp_path, {"alice": "{PLAIN}wonderland"}),
                                tls=(cert, key))
    try:
        out = await threads.deferToThread(raw_session, server.port,
                                          b"EHLO x\r\nSTARTTLS\r\n", b"Ready to start TLS\r\n",
                                          b"garbage-not-tls\r\n" * 10)
        # (garbage sent together with STARTTLS would be discarded as injected plaintext,
        # and the server would wait for a handshake until tls_handshake_timeout)
        assert out.endswith(b"220 2.0.0 Ready to start TLS\r\n")  # then the close
        out = await threads.deferToThread(raw_session, server.port, b"EHLO x\nQUIT\n")
        assert out.startswith(b"250-mx.example.test\r\n") and out.endswith(b"221 2.0.0 Bye\r\n")
        out = await threads.deferToThread(raw_session, server.port,
                                          b"EHLO x\r\n" + b"A" * (1 << 20) + b"\r\nQUIT\r\n")
        assert b"500 5.5.2 Line too long\r\n" in out and out.endswith(b"221 2.0.0 Bye\r\n")
        out = await threads.deferToThread(raw_session, server.port, b"EH\0LO x\r\nQUIT\r\n")
        assert out == b"500 5.5.2 NUL characters are not allowed\r\n221 2.0.0 Bye\r\n"
        out = await threads.deferToThread(raw_session, server.port,
                                          "EHLO \u00e9\r\n\u00c4UTH\r\nQUIT\r\n".encode("utf-8"))
        assert out == (b"501 5.5.4 Syntax: EHLO hostname\r\n500 5.5.2 Command not recognized\r\n"
                       b"221 2.0.0 Bye\r\n")
        assert await smtp_login(server.port, "alice", "wonderland") == (
            235, b"2.7.0 Authentication successful")
    finally:
        await server.stop()


def proxied_session(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 587\r\n")
        assert s.recv(200).startswith(b"220 ")
        blob = base64.b64encode(b"\0alice\0wonderland")
        s.sendall(b"EHLO proxied.example\r\nAUTH PLAIN " + blob + b"\r\nMAIL FROM:<alice@example.test>\r\n"
                  b"RCPT TO:<r@example.test>\r\nDATA\r\n")
        out = b""
        while not out.endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n"):
            out += s.recv(4096)
        s.sendall(b"Subject: proxied\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        while not out.endswith(b"221 2.0.0 Bye\r\n"):
            out += s.recv(4096)
        return out


@pytest_twisted.ensureDeferred
async def test_haproxy_listener_sees_the_real_client(tmp_path: Path) -> None:
    """A haproxy: listener takes the PROXY v1 header; the Received line names the client."""
    server = await start_server(tmp_path, users_backend(tmp_path, {"alice": "{PLAIN}wonderland"}),
                                listen=["haproxy:tcp:0:interface=127.0.0.1"])
    try:
        out = await threads.deferToThread(proxied_session, server.port)
        assert b"235 2.7.0 Authentication successful" in out
        [message] = server.messages()
        assert message.startswith(b"Received: from proxied.example ([203.0.113.7])")
    finally:
        await server.stop()
