"""The server's TLS context and what a TLS connection tells mechanisms.

* one OpenSSL context per configuration load, shared by every STARTTLS connection;
* session resumption that really resumes: a TLS 1.3 ticket (STARTTLS and an ``ssl:``
  listener) and TLS 1.2, where ``tls-unique`` must then be the server's Finished;
* renegotiation off, tickets and the session cache on;
* channel bindings read from OpenSSL only when a mechanism asks;
* ECDSA P-256 and RSA 2048 certificates served to real clients (openssl s_client
  for the certificate and signature it got, swaks logging in) over STARTTLS and
  implicit TLS.

The servers run in this process (tests/support.start_server); the blocking clients run
in a thread so the reactor keeps serving.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import reactor, threads

from saslsmtp.config import TLSConfig
from saslsmtp.tlscontext import server_options
from saslsmtp.tlsinfo import ChannelBindings, session_reused
from tests.conftest import require_binary
from tests.support import RunningServer, start_server
from tests.tlsutil import issue_cert, make_ca

USERS = 'alice:{PLAIN}secret\n'


class LineClient:
    """A blocking SMTP client on a socket that may turn into TLS: whole replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: Any = sock
        self.buffer = b""

    def reply(self) -> bytes:
        """One (multi-line) reply."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError(f"closed after {lines!r}")
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(lines)

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()


def client_context(tls12: bool = False) -> ssl.SSLContext:
    """Python's client context, certificate unchecked (loopback, a test CA)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def tls_session(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None,
                implicit: bool = False, during: Callable[[], Any] | None = None,
                auth: bytes | None = None) -> dict[str, Any]:
    """One session: (STARTTLS or implicit TLS) offering ``session``, EHLO, ``during()``
    while the connection is up, the ``auth`` line if given, QUIT.  What the client saw."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if implicit:
            sock = context.wrap_socket(raw, session=session)
            client = LineClient(sock)
            assert client.reply().startswith(b"220 ")
        else:
            client = LineClient(raw)
            assert client.reply().startswith(b"220 ")
            assert client.command(b"EHLO client.example").startswith(b"250")
            assert client.command(b"STARTTLS").startswith(b"220 ")
            sock = context.wrap_socket(raw, session=session)
            client.sock = sock
        ehlo = client.command(b"EHLO client.example")  # after it a TLS 1.3 ticket is in
        seen = {"ehlo": ehlo, "version": sock.version(), "reused": sock.session_reused,
                "session": sock.session,
                "tls_unique": sock.get_channel_binding("tls-unique")
                if sock.version() == "TLSv1.2" else None,
                "during": during() if during is not None else None,
                "auth": client.command(auth) if auth is not None else None}
        assert client.command(b"QUIT").startswith(b"221 ")
        return seen
    finally:
        raw.close()


def server_bindings(server: RunningServer) -> Callable[[], dict[str, bytes]]:
    """A ``during`` for ``tls_session``: the server side's channel bindings, read in the
    reactor thread from the one open connection."""
    def read() -> dict[str, bytes]:
        (connection,) = list(server.factory.connections)
        return dict(ChannelBindings(connection.transport.getHandle()))
    return lambda: threads.blockingCallFromThread(reactor, read)


async def tls_server(tmp_path: Path, listen: str = "tcp:0:interface=127.0.0.1",
                     key_type: str = "ecdsa-p256") -> RunningServer:
    cert = issue_cert(make_ca(tmp_path), tmp_path, key_type=key_type)
    (tmp_path / "users").write_text(USERS)
    return await start_server(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                              listen=[listen], tls=(cert.chain_path, cert.key_path),
                              require_tls=True)


@pytest_twisted.ensureDeferred
async def test_one_context_for_every_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The OpenSSL context is made once when the configuration is loaded; three STARTTLS
    sessions use it and make no other."""
    from twisted.internet._sslverify import OpenSSLCertificateOptions
    made: list[object] = []
    original = OpenSSLCertificateOptions._makeContext

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        made.append(self)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(OpenSSLCertificateOptions, "_makeContext", counting)
    server = await tls_server(tmp_path)
    try:
        assert len(made) == 1  # at load, before any connection
        for _ in range(3):
            seen = await threads.deferToThread(tls_session, server.port, client_context())
            assert b"AUTH PLAIN LOGIN" in seen["ehlo"]
        assert len(made) == 1
    finally:
        await server.stop()


@pytest.mark.parametrize("listen,implicit", [("tcp:0:interface=127.0.0.1", False),
                                             ("ssl:0:interface=127.0.0.1", True)],
                         ids=["starttls", "implicit"])
@pytest_twisted.ensureDeferred
async def test_tls13_ticket_resumes(tmp_path: Path, listen: str, implicit: bool) -> None:
    """A client offering the TLS 1.3 ticket of its previous session resumes it (no
    certificate signature), over STARTTLS and on an ssl: listener."""
    server = await tls_server(tmp_path, listen)
    try:
        context = client_context()
        first = await threads.deferToThread(tls_session, server.port, context, None, implicit)
        assert first["version"] == "TLSv1.3" and not first["reused"]
        assert first["session"].has_ticket
        second = await threads.deferToThread(tls_session, server.port, context,
                                             first["session"], implicit)
        assert second["reused"]
        assert b"AUTH PLAIN LOGIN" in second["ehlo"]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_tls12_resumes_and_tls_unique_follows(tmp_path: Path) -> None:
    """TLS 1.2 resumes too; tls-unique is the client's Finished on the full handshake and
    the server's on the resumed one, and the server's binding equals what the client
    computes both times."""
    server = await tls_server(tmp_path)
    try:
        context = client_context(tls12=True)
        during = server_bindings(server)
        first = await threads.deferToThread(tls_session, server.port, context, None, False, during)
        assert first["version"] == "TLSv1.2" and not first["reused"]
        assert first["during"]["tls-unique"] == first["tls_unique"]
        second = await threads.deferToThread(tls_session, server.port, context,
                                             first["session"], False, during)
        assert second["reused"]
        assert second["during"]["tls-unique"] == second["tls_unique"]
        assert second["tls_unique"] != first["tls_unique"]
        assert "tls-exporter" not in second["during"]
        assert len(second["during"]["tls-server-end-point"]) == 32
    finally:
        await server.stop()


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13-ticket", "tls12-session"])
@pytest_twisted.ensureDeferred
async def test_a_session_of_another_worker_falls_back_to_a_full_handshake(
        tmp_path: Path, tls12: bool) -> None:
    """With ``workers = N`` each process has its own context (ticket key, session cache,
    session ID context), and so has each load: a client offering a session another
    worker issued gets a full handshake, logs in, and nothing above info is logged.
    Two servers in this process with the same certificate are two such workers."""
    from twisted.logger import LogLevel, globalLogPublisher
    cert = issue_cert(make_ca(tmp_path), tmp_path)
    servers = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "users").write_text(USERS)
        servers.append(await start_server(
            tmp_path / name, f'[backends.users]\ntype = "file"\npath = "{tmp_path / name / "users"}"\n',
            tls=(cert.chain_path, cert.key_path), require_tls=True, mechanisms=["PLAIN"]))
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        context = client_context(tls12)
        first = await threads.deferToThread(tls_session, servers[0].port, context)
        again = await threads.deferToThread(tls_session, servers[0].port, context, first["session"])
        other = await threads.deferToThread(tls_session, servers[1].port, context, first["session"],
                                            auth=b"AUTH PLAIN AGFsaWNlAHNlY3JldA==")  # alice, secret
    finally:
        globalLogPublisher.removeObserver(events.append)
        for server in servers:
            await server.stop()
    assert not first["reused"] and again["reused"]  # the session resumes where it was made
    assert not other["reused"]  # elsewhere: a full handshake ...
    assert other["auth"] == b"235 2.7.0 Authentication successful"  # ... and a working session
    loud = [e for e in events if e.get("log_failure") is not None
            or e.get("log_level", LogLevel.info) > LogLevel.info]
    assert loud == []


@pytest_twisted.ensureDeferred
async def test_tls_unique_is_not_offered_on_a_resumed_session_without_extended_master_secret(
        tmp_path: Path) -> None:
    """RFC 7627: a TLS 1.2 client without the extended master secret resumes, and the
    server no longer offers tls-unique (a triple handshake could give an attacker's
    session the same value); tls-server-end-point stays.  Its full handshake keeps it."""
    server = await tls_server(tmp_path)
    try:
        context = client_context(tls12=True)
        context.options |= 0x1  # SSL_OP_NO_EXTENDED_MASTER_SECRET (OpenSSL 3), not in Python's ssl
        during = server_bindings(server)
        first = await threads.deferToThread(tls_session, server.port, context, None, False, during)
        second = await threads.deferToThread(tls_session, server.port, context,
                                             first["session"], False, during)
    finally:
        await server.stop()
    assert not first["reused"] and first["during"]["tls-unique"] == first["tls_unique"]
    assert second["reused"]
    assert sorted(second["during"]) == ["tls-server-end-point"]


def test_context_options(tmp_path: Path) -> None:
    """Renegotiation off; tickets on (OP_NO_TICKET clear); OpenSSL's server-side session
    cache on; TLS 1.0/1.1 off."""
    cert = issue_cert(make_ca(tmp_path), tmp_path)
    context = server_options(TLSConfig(certificate=cert.chain_path, private_key=cert.key_path)).getContext()
    options = context.set_options(0)  # adds nothing, returns what is set
    assert options & SSL.OP_NO_RENEGOTIATION
    assert not options & SSL.OP_NO_TICKET
    assert options & SSL.OP_NO_TLSv1 and options & SSL.OP_NO_TLSv1_1
    assert context.get_session_cache_mode() & SSL.SESS_CACHE_SERVER


class CountingConnection:
    """An ``OpenSSL.SSL.Connection`` stand-in that counts what is read from it."""

    def __init__(self, version: str = "TLSv1.3") -> None:
        self.version = version
        self.calls: list[str] = []

    def get_protocol_version_name(self) -> str:
        return self.version

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        self.calls.append("export")
        return b"x" * length

    def get_peer_finished(self) -> bytes:
        self.calls.append("peer_finished")
        return b"client-finished"

    def get_finished(self) -> bytes:
        self.calls.append("finished")
        return b"server-finished"

    def get_certificate(self) -> None:
        self.calls.append("certificate")
        return None


def test_the_reloadable_context_starts_an_ssl_listener_without_a_warning(tmp_path: Path) -> None:
    """An ``ssl:`` listener's context follows reloads (``LiveTLSContext``); wrapping it
    must not print Twisted's LegacyContextFactoryWarning on the operator's terminal at
    every start and ``--check``."""
    import warnings

    from twisted.internet.protocol import ServerFactory
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from saslsmtp.serving import LiveTLSContext
    cert = issue_cert(make_ca(tmp_path), tmp_path)
    options = server_options(TLSConfig(certificate=cert.cert_path, private_key=cert.key_path))

    class Wiring:
        tls_context = options

    class Factory:
        wiring = Wiring()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TLSMemoryBIOFactory(LiveTLSContext(Factory()), False, ServerFactory())  # type: ignore[arg-type]
    assert [str(w.message) for w in caught] == []


def test_channel_bindings_are_read_on_demand() -> None:
    """Which bindings exist is known without reading any (what SCRAM asks before
    offering -PLUS); a value is read once, when asked for; one that cannot be read
    (no certificate here) is missing."""
    conn = CountingConnection()
    bindings = ChannelBindings(conn)
    assert set(bindings) == {"tls-exporter", "tls-server-end-point"} and len(bindings) == 2
    assert bool(bindings) and conn.calls == []
    assert bindings["tls-exporter"] == b"x" * 32
    assert bindings.get("tls-exporter") == b"x" * 32
    assert conn.calls == ["export"]
    assert bindings.get("tls-server-end-point") is None
    assert bindings.get("tls-unique") is None
    assert conn.calls == ["export", "certificate"]


def test_tls12_unique_without_a_resumption_flag_is_the_clients_finished() -> None:
    """A connection object that cannot say whether it resumed counts as a full handshake:
    tls-unique is the peer's (the client's) Finished."""
    conn = CountingConnection("TLSv1.2")
    assert not session_reused(conn)
    assert ChannelBindings(conn)["tls-unique"] == b"client-finished"


def s_client(port: int, starttls: bool) -> str:
    """``openssl s_client -brief`` against the server: its report (stderr and stdout)."""
    openssl = require_binary("openssl")
    argv = [openssl, "s_client", "-brief", "-connect", f"127.0.0.1:{port}"]
    if starttls:
        argv += ["-starttls", "smtp"]
    done = subprocess.run(argv, input=b"QUIT\r\n", capture_output=True, timeout=30)
    return (done.stderr + done.stdout).decode(errors="replace")


def swaks_login(port: int, implicit: bool) -> str:
    """swaks logging in with PLAIN over STARTTLS or implicit TLS; its transcript."""
    swaks = require_binary("/usr/bin/swaks", "swaks")
    argv = [swaks, "--server", f"127.0.0.1:{port}", "--quit-after", "AUTH",
            "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "secret",
            "--tls-on-connect" if implicit else "--tls"]
    done = subprocess.run(argv, capture_output=True, timeout=30)
    return (done.stdout + done.stderr).decode(errors="replace")


@pytest.mark.parametrize("key_type,signature", [("ecdsa-p256", "ECDSA"),
                                                ("rsa2048", "RSA-PSS")])
@pytest.mark.parametrize("listen,implicit", [("tcp:0:interface=127.0.0.1", False),
                                             ("ssl:0:interface=127.0.0.1", True)],
                         ids=["starttls", "implicit"])
@pytest_twisted.ensureDeferred
async def test_certificate_kinds_with_real_clients(tmp_path: Path, key_type: str, signature: str,
                                                   listen: str, implicit: bool) -> None:
    """An ECDSA P-256 certificate (the cheap one) and an RSA 2048 one are served over
    STARTTLS and implicit TLS: openssl s_client reports TLS 1.3 signed with the
    certificate's algorithm, and swaks logs in with PLAIN."""
    server = await tls_server(tmp_path, listen, key_type)
    try:
        report = await threads.deferToThread(s_client, server.port, not implicit)
        assert "Protocol version: TLSv1.3" in report, report
        assert f"Signature type: {signature}" in report, report
        transcript = await threads.deferToThread(swaks_login, server.port, implicit)
        assert "235 2.7.0 Authentication successful" in transcript, transcript
    finally:
        await server.stop()


def run_load_generator(port: int) -> dict[str, Any]:
    """benchmarks/smtp_auth_load.py --starttls --tls-resume: six sessions on one slot."""
    import json
    import sys
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "smtp_auth_load.py"),
                           "--port", str(port), "--starttls", "--tls-resume", "-c", "1",
                           "-n", "6", "--user", "alice", "--password", "secret", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest_twisted.ensureDeferred
async def test_load_generator_resumes(tmp_path: Path) -> None:
    """The benchmark's generator with --tls-resume offers each session the previous one's
    TLS session: five of six sessions offer one, and all five resume."""
    server = await tls_server(tmp_path)
    try:
        result = await threads.deferToThread(run_load_generator, server.port)
    finally:
        await server.stop()
    assert result["ok"] == 6 and result["errors"] == 0
    assert (result["tls_offered"], result["tls_resumed"]) == (5, 5)


@pytest.mark.parametrize("listen,implicit", [("tcp:0:interface=127.0.0.1", False),
                                             ("ssl:0:interface=127.0.0.1", True)],
                         ids=["starttls", "implicit"])
@pytest_twisted.ensureDeferred
async def test_sessions_run_without_nagle(tmp_path: Path, listen: str, implicit: bool) -> None:
    """Every session's TCP socket has TCP_NODELAY, under an ssl: listener's TLS layer too
    (with Nagle, the EHLO reply after a TLS handshake waits for the client's delayed ACK
    of the session tickets)."""
    server = await tls_server(tmp_path, listen)

    def nodelay_of_open_connection() -> bool:
        (connection,) = list(server.factory.connections)
        return bool(connection.transport.getTcpNoDelay())  # through the TLS wrapper too
    during = lambda: threads.blockingCallFromThread(reactor, nodelay_of_open_connection)  # noqa: E731
    try:
        seen = await threads.deferToThread(tls_session, server.port, client_context(), None,
                                           implicit, during)
    finally:
        await server.stop()
    assert seen["during"] is True


def test_no_delay_without_a_tcp_connection() -> None:
    """A transport with no TCP connection under it (a UNIX socket) is left alone."""
    from saslsmtp.nodelay import no_delay

    class Unix:
        transport = None
    assert no_delay(Unix()) is False
    assert no_delay(None) is False


def starttls_serial(port: int) -> int:
    """A STARTTLS session's view of the server certificate: its serial number."""
    from cryptography import x509
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        client = LineClient(raw)
        assert client.reply().startswith(b"220 ")
        assert client.command(b"EHLO client.example").startswith(b"250")
        assert client.command(b"STARTTLS").startswith(b"220 ")
        sock = client_context().wrap_socket(raw)
        der = sock.getpeercert(binary_form=True)
        assert der is not None
        client.sock = sock
        assert client.command(b"QUIT").startswith(b"221 ")
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        raw.close()


@pytest_twisted.ensureDeferred
async def test_reload_gives_new_starttls_sessions_the_new_certificate(tmp_path: Path) -> None:
    """SIGHUP's reload with the certificate and key files replaced: the next STARTTLS
    session gets the new certificate.  Only the certificate replaced (the old key left):
    the reload is refused with the mismatch named, and sessions keep the running one."""
    from twisted.logger import formatEvent, globalLogPublisher
    from saslsmtp.serving import Reloader, build_factory, listening_factory, start_runners, stop_wiring
    from saslsmtp.service import load
    from tests.support import write_config
    from tests.test_reload import write_cert
    (tmp_path / "users").write_text(USERS)
    cert, key = write_cert(tmp_path, 1001)
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                          tls=(str(cert), str(key)))
    factory = build_factory(load(str(config)), reactor)
    start_runners(factory.wiring)
    reloader = Reloader(str(config), factory, reactor)
    port = reactor.listenTCP(0, listening_factory(factory, "tcp"), interface="127.0.0.1")
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        number = port.getHost().port
        assert await threads.deferToThread(starttls_serial, number) == 1001
        write_cert(tmp_path, 2002)
        assert reloader.reload() is True
        assert await threads.deferToThread(starttls_serial, number) == 2002
        other = tmp_path / "other"
        other.mkdir()
        new_cert, _ = write_cert(other, 3003)
        cert.write_bytes(new_cert.read_bytes())  # the key not replaced yet
        assert reloader.reload() is False
        assert await threads.deferToThread(starttls_serial, number) == 2002
    finally:
        globalLogPublisher.removeObserver(events.append)
        await port.stopListening()
        reloader.stop()
        stop_wiring(factory.wiring)
    refused = [formatEvent(e) for e in events if "reload refused" in formatEvent(e)]
    line = config.read_text().splitlines().index(f'private_key = "{key}"') + 1
    assert refused == [f"reload refused, keeping the running configuration: {config}:{line}:"
                       f" tls.private_key: {key} does not match the certificate in {cert}"], refused
