"""A ``haproxy:`` listener reads the whole PROXY header before the SMTP session starts (the
greeting, the admission and the logs see the real client), waits for it a bounded time,
and logs a connection that comes without one (one line, with the peer's address) instead
of closing it silently.  Real listener on loopback, and the wrapper alone over a
StringTransport and a Clock for the timing."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from saslsmtp.proxyheader import LOCAL_START_DELAY, HeaderFirstFactory, HeaderFirstWrapper
from saslsmtp.service import SubmissionFactory, listener, load, wire
from tests.limitsnet import PASSWORD, auth_plain, daemon, users_toml, wait_for_log
from tests.support import free_port, haproxy_checking, wait_for, write_config


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _talk(port: int, first: bytes) -> bytes:
    """Connect, send ``first``, read until the server closes (nothing is sent before a
    PROXY header)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        got = b""
        s.sendall(first)
        try:
            while data := s.recv(4096):
                got += data
                if first.startswith(b"PROXY") and got.endswith(b"\r\n") and b"250 " in got:
                    s.sendall(b"QUIT\r\n")
        except ConnectionResetError:
            pass
        return got


async def _serve(tmp_path: Path, first: bytes) -> bytes:
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    listen = "haproxy:tcp:0:interface=127.0.0.1"
    path = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                        listen=[listen])
    config = load(str(path))
    wiring = wire(config, reactor)
    factory = SubmissionFactory(wiring, reactor)
    endpoint, wrapped = listener(listen, config, reactor, factory, None)
    port = await endpoint.listen(wrapped)
    try:
        return await threads.deferToThread(_talk, port.getHost().port, first)
    finally:
        await port.stopListening()


def _proxy_lines(events: list[dict]) -> list[str]:
    from twisted.logger import formatEvent
    return [formatEvent(e) for e in events if "PROXY protocol header" in formatEvent(e)]


@pytest_twisted.ensureDeferred
async def test_connection_without_proxy_header_is_logged(tmp_path: Path, logged: list[dict]) -> None:
    """EHLO straight to a haproxy: listener: closed at once with no greeting (nothing is
    said before the header), and one log line names the peer."""
    got = await _serve(tmp_path, b"EHLO client.example\r\n")
    assert got == b""
    lines = _proxy_lines(logged)
    assert len(lines) == 1 and "127.0.0.1:" in lines[0], lines


@pytest_twisted.ensureDeferred
async def test_connection_with_proxy_header_is_served_quietly(tmp_path: Path, logged: list[dict]) -> None:
    """A valid PROXY v1 header: the session runs and nothing is logged about the header."""
    got = await _serve(tmp_path, b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\nEHLO c.example\r\n")
    assert got.startswith(b"220 ") and b"250-" in got
    assert _proxy_lines(logged) == []


def _proxied_starttls_then_pause(port: int, pause: float) -> bytes:
    """PROXY header, EHLO, STARTTLS, handshake, then ``pause`` seconds of silence, EHLO."""
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\nEHLO c.example\r\nSTARTTLS\r\n")
        got = b""
        while b"220 2.0.0" not in got:
            got += raw.recv(4096)
        with ctx.wrap_socket(raw) as tls:
            import time
            time.sleep(pause)
            tls.sendall(b"EHLO c.example\r\n")
            return tls.recv(4096)


@pytest_twisted.ensureDeferred
async def test_starttls_behind_proxy_header_finishes_its_handshake(tmp_path: Path) -> None:
    """The wrapper passes the TLS handshake notification on: a client that completed the
    handshake and then thinks for longer than ``tls_handshake_timeout`` is still served."""
    from tests.tlsutil import issue_cert, make_ca
    ca = make_ca(tmp_path)
    cert = issue_cert(ca, tmp_path, names=["localhost", "127.0.0.1"])
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    listen = "haproxy:tcp:0:interface=127.0.0.1"
    path = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                        listen=[listen], tls=(cert.chain_path, cert.key_path))
    path.write_text(path.read_text().replace("[server]\n", "[server]\ntls_handshake_timeout = 0.5\n", 1))
    config = load(str(path))
    wiring = wire(config, reactor)
    factory = SubmissionFactory(wiring, reactor)
    endpoint, wrapped = listener(listen, config, reactor, factory, wiring.tls_context)
    port = await endpoint.listen(wrapped)
    try:
        got = await threads.deferToThread(_proxied_starttls_then_pause, port.getHost().port, 1.5)
    finally:
        for p in list(factory.connections):
            p.transport.abortConnection()
        await port.stopListening()
    assert got.startswith(b"250-")


# ---- the wrapper alone: header first, in pieces, bounded wait ------------------------

HEADER_V1 = b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 587\r\n"
HEADER_V2 = (b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c"  # v2, PROXY, TCP over IPv4
             + bytes([203, 0, 113, 9]) + bytes([192, 0, 2, 1]) + (40000).to_bytes(2, "big")
             + (587).to_bytes(2, "big"))


class _Recorder(Protocol):
    """What the SMTP protocol would see: when it starts, its peer, its bytes, its end."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def connectionMade(self) -> None:
        self.events.append(("made", self.transport.getPeer().host))

    def dataReceived(self, data: bytes) -> None:
        self.events.append(("data", data))

    def connectionLost(self, reason: object = None) -> None:
        self.events.append(("lost", None))


def _wrapped(timeout: float = 5.0) -> tuple[HeaderFirstWrapper, _Recorder, StringTransport, Clock]:
    clock = Clock()
    inner = Factory.forProtocol(_Recorder)
    factory = HeaderFirstFactory(inner, clock, timeout)
    wrapper = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 50000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 50000))
    wrapper.makeConnection(transport)
    return wrapper, wrapper.wrappedProtocol, transport, clock


@pytest.mark.parametrize("header, client", [(HEADER_V1, "198.51.100.7"), (HEADER_V2, "203.0.113.9")])
def test_session_starts_after_a_header_sent_one_byte_at_a_time(header: bytes, client: str) -> None:
    """Nothing starts until the last byte of the header (Twisted's wrapper gave up on a
    first read under 16 bytes); then the session starts with the header's address and
    gets the bytes that followed it."""
    wrapper, recorder, transport, clock = _wrapped()
    for byte in header[:-1]:
        wrapper.dataReceived(bytes([byte]))
    assert recorder.events == [] and not transport.disconnecting
    wrapper.dataReceived(header[-1:] + b"EHLO c.example\r\n")
    assert recorder.events == [("made", client), ("data", b"EHLO c.example\r\n")]
    clock.advance(60)
    assert not transport.disconnecting  # the header's wait ended with the header


def test_silence_is_closed_at_the_header_timeout_with_one_line(logged: list[dict]) -> None:
    wrapper, recorder, transport, clock = _wrapped(timeout=5.0)
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and recorder.events == []
    assert _proxy_lines(logged) == ["no PROXY protocol header within 5 s from 10.0.0.1:50000"
                                    " on a haproxy: listener (nothing); closing"]


def test_half_a_header_is_closed_at_the_header_timeout() -> None:
    wrapper, recorder, transport, clock = _wrapped(timeout=5.0)
    wrapper.dataReceived(HEADER_V1[:20])
    clock.advance(5.0)
    assert transport.disconnecting and recorder.events == []


def test_health_check_that_leaves_without_a_header_starts_no_session(logged: list[dict]) -> None:
    """HAProxy's plain TCP check connects and closes: no session, no log line, no timer."""
    wrapper, recorder, transport, clock = _wrapped()
    wrapper.connectionLost(Failure(ConnectionDone()))
    assert recorder.events == [] and clock.getDelayedCalls() == [] and _proxy_lines(logged) == []


def test_bytes_that_cannot_start_a_header_close_at_once(logged: list[dict]) -> None:
    wrapper, recorder, transport, clock = _wrapped()
    wrapper.dataReceived(b"E")
    assert transport.disconnecting and recorder.events == []
    assert len(_proxy_lines(logged)) == 1


# ---- many connections without a header: one line, then a count; metrics by reason ------

BAD_V2 = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x04" + b"\x01" * 4  # TCP4 needs 12 bytes
WRONG_VERSION_V2 = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x11\x11\x00\x0c"  # version 1 in a v2 frame


def _refusal_counts(registry) -> dict[tuple[str, str], float]:
    return {(sample.labels["listener"], sample.labels["reason"]): sample.value
            for family in registry.collect() if family.name == "saslsmtp_proxy_refusals"
            for sample in family.samples if sample.name.endswith("_total")}


def _peer_wrapper(factory: HeaderFirstFactory, peer) -> tuple[HeaderFirstWrapper, StringTransport]:
    wrapper = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    wrapper.makeConnection(transport)
    return wrapper, transport


def test_bad_headers_are_one_line_then_one_count_per_minute(logged: list[dict]) -> None:
    """A scanner sending junk: the first connection is a line naming the peer and the
    listener; the next ones within the minute are one line counting them (they were one
    line each); a quiet minute ends it.  A dual-stack socket's IPv4 peer is written as
    its IPv4 address, as the session lines write it."""
    from twisted.internet.address import IPv6Address
    clock = Clock()
    factory = HeaderFirstFactory(Factory.forProtocol(_Recorder), clock, 5.0,
                                 name="haproxy:tcp6:2587")
    for port in range(40000, 40020):
        wrapper, transport = _peer_wrapper(factory, IPv6Address("TCP", "::ffff:192.0.2.7", port))
        wrapper.dataReceived(b"EHLO scanner.example\r\n")
        assert transport.disconnecting
    wrapper, transport = _peer_wrapper(factory, IPv6Address("TCP", "::ffff:192.0.2.8", 40100))
    clock.advance(5)  # the last one says nothing
    assert _proxy_lines(logged) == [
        "no valid PROXY protocol header from 192.0.2.7:40000 on haproxy:tcp6:2587 (not a PROXY"
        " header); closing"]
    clock.advance(55)
    assert _proxy_lines(logged)[1:] == [
        "closed 20 more connections without a valid PROXY protocol header on haproxy:tcp6:2587"
        " in 60 s (the last from 192.0.2.8:40100: nothing within 5 s)"]
    clock.advance(60)  # a quiet minute: no line, no timer left
    assert len(_proxy_lines(logged)) == 2 and clock.getDelayedCalls() == []
    wrapper, transport = _peer_wrapper(factory, IPv6Address("TCP", "2001:db8::5", 40200))
    wrapper.dataReceived(b"PROXY TCP4 1.2.3.4\r\n")
    assert _proxy_lines(logged)[2:] == [
        "no valid PROXY protocol header from 2001:db8::5:40200 on haproxy:tcp6:2587 (an invalid"
        " v1 header); closing"]


def test_an_untrusted_dual_stack_peer_is_written_as_its_ipv4_address(logged: list[dict]) -> None:
    from twisted.internet.address import IPv6Address
    factory = HeaderFirstFactory(Factory.forProtocol(_Recorder), Clock(), 5.0,
                                 trusted=lambda: ("127.0.0.1",), name="haproxy:tcp6:2587")
    assert factory.buildProtocol(IPv6Address("TCP", "::ffff:127.0.0.2", 40001)) is None
    from twisted.logger import formatEvent
    assert [formatEvent(e) for e in logged if "proxy_trusted" in formatEvent(e)] == [
        "PROXY header from 127.0.0.2:40001 refused on haproxy:tcp6:2587: 127.0.0.2 is not in"
        " server.proxy_trusted_networks; closed without a greeting"]


@pytest.mark.parametrize("first, reason", [
    (b"EHLO c.example\r\n", "not_proxy"),
    (b"\x16\x03\x01\x02\x00\x01", "not_proxy"),  # a TLS ClientHello on a plain haproxy: port
    (b"PROXY TCP4 198.51.100.7\r\n", "invalid_v1"),
    (b"PROXY TCP4 198.51.100.7 192.0.2.1 x 587\r\n", "invalid_v1"),  # was a traceback
    (b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 70000\r\n", "invalid_v1"),
    (b"PROXY TCP4 mail.example 192.0.2.1 40000 587\r\n", "invalid_v1"),  # was believed
    (b"PROXY TCP6 198.51.100.7 192.0.2.1 40000 587\r\n", "invalid_v1"),
    (b"PROXY " + b"1" * 120, "invalid_v1"),  # no line end within v1's 107 bytes
    (BAD_V2, "invalid_v2"),
    (b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x99\x00\x00", "invalid_v2"),  # no such family
    (WRONG_VERSION_V2, "invalid_v2"),
    (HEADER_V1[:20], "timeout"),
    (b"", "timeout"),
])
def test_each_refusal_is_counted_by_reason(first: bytes, reason: str) -> None:
    """``saslsmtp_proxy_refusals_total{listener, reason}``: one sample per connection
    closed without a valid header, by a reason from a small fixed set."""
    from prometheus_client import CollectorRegistry
    from saslsmtp.metrics import Metrics
    registry = CollectorRegistry()
    clock = Clock()
    factory = HeaderFirstFactory(Factory.forProtocol(_Recorder), clock, 5.0,
                                 name="haproxy:tcp:2587", metrics=Metrics(registry))
    wrapper, transport = _peer_wrapper(factory, IPv4Address("TCP", "10.0.0.1", 50000))
    if first:
        wrapper.dataReceived(first)
    clock.advance(5)
    assert transport.disconnecting
    assert _refusal_counts(registry) == {("haproxy:tcp:2587", reason): 1.0}


def test_untrusted_peers_are_counted() -> None:
    from prometheus_client import CollectorRegistry
    from saslsmtp.metrics import Metrics
    registry = CollectorRegistry()
    factory = HeaderFirstFactory(Factory.forProtocol(_Recorder), Clock(), 5.0,
                                 trusted=lambda: ("10.0.0.1",), name="haproxy:tcp:2587",
                                 metrics=Metrics(registry))
    for port in (40001, 40002, 40003):
        assert factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", port)) is None
    wrapper, transport = _peer_wrapper(factory, IPv4Address("TCP", "10.0.0.1", 40004))
    wrapper.dataReceived(HEADER_V2)  # the trusted proxy: served, not counted
    assert _refusal_counts(registry) == {("haproxy:tcp:2587", "untrusted"): 3.0}


# ---- the proxy's own connections (a header without a client address) --------------------

OWN_V1 = b"PROXY TCP4 10.0.0.1 10.0.0.2 50000 587\r\n"  # HAProxy's v1 check: its own connection
LOCAL_V2 = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00]) + (0).to_bytes(2, "big"))


@pytest.mark.parametrize("header", [LOCAL_V2, OWN_V1])
def test_check_that_sends_its_own_header_and_resets_starts_no_session(
        header: bytes, logged: list[dict]) -> None:
    """HAProxy's check of a ``send-proxy-v2 check`` server: a LOCAL header (the exact bytes
    HAProxy 2.6 sends; with ``send-proxy``, a v1 header naming the check's own connection),
    then a reset some microseconds later: no session, no line."""
    wrapper, recorder, transport, clock = _wrapped()
    wrapper.dataReceived(header)
    clock.advance(LOCAL_START_DELAY / 2)
    wrapper.connectionLost(Failure(ConnectionDone()))
    assert recorder.events == [] and clock.getDelayedCalls() == [] and _proxy_lines(logged) == []


@pytest.mark.parametrize("header", [LOCAL_V2, b"PROXY UNKNOWN\r\n", OWN_V1])
def test_local_header_that_stays_starts_its_session_with_the_connection_address(header: bytes) -> None:
    """An SMTP health check (``option smtpchk``) waits for the greeting: it gets it
    ``LOCAL_START_DELAY`` later, as a session of the proxy's own address."""
    wrapper, recorder, transport, clock = _wrapped()
    wrapper.dataReceived(header)
    assert recorder.events == []
    clock.advance(LOCAL_START_DELAY)
    assert recorder.events == [("made", "10.0.0.1")] and not transport.disconnecting


def test_bytes_after_a_local_header_start_the_session_at_once() -> None:
    wrapper, recorder, transport, clock = _wrapped()
    wrapper.dataReceived(LOCAL_V2)
    wrapper.dataReceived(b"EHLO check.example\r\n")
    assert recorder.events == [("made", "10.0.0.1"), ("data", b"EHLO check.example\r\n")]
    assert clock.getDelayedCalls() == []



def _metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


@pytest.mark.parametrize("send", ["send-proxy-v2", "send-proxy"])
def test_haproxy_checks_start_no_sessions(tmp_path: Path, send: str) -> None:
    """The README's HAProxy recipe against a real daemon: twenty checks (counted as
    accepted connections) leave no session line; a client through HAProxy gets one."""
    metrics, front = free_port(), free_port()
    backends = users_toml(tmp_path, {"alice": PASSWORD})
    server = daemon(tmp_path, "d", "", backends, listen="haproxy:tcp",
                    extra=f'[metrics]\nlisten = "tcp:{metrics}:interface=127.0.0.1"\n')
    proxy = haproxy_checking(tmp_path, front, server.port, send)
    try:
        base = _metric(metrics, "saslsmtp_connections_total")
        wait_for(lambda: _metric(metrics, "saslsmtp_connections_total") >= base + 20,
                 what="twenty HAProxy checks")
        assert auth_plain(front, "alice", PASSWORD, "127.0.6.1").code == 235
        log = wait_for_log(server, "session end client=127.0.6.1")
        # one session of HAProxy's address: start_daemon's probe ("PROXY UNKNOWN" that waits)
        assert log.count("session end client=127.0.0.1 ") == 1, log[-3000:]
    finally:
        proxy.terminate()
        proxy.wait(10)
        server.stop()


def test_connections_that_start_no_session_leave_the_sessions_gauge(tmp_path: Path) -> None:
    """``saslsmtp_sessions`` counts a connection from its accept: one that never became a
    session (a check that left, bytes that are no header) must be taken off again when it
    closes (each stayed counted forever: 'open sessions' grew by one per HAProxy check)."""
    metrics = free_port()
    backends = users_toml(tmp_path, {"alice": PASSWORD})
    server = daemon(tmp_path, "d", "", backends, listen="haproxy:tcp",
                    extra=f'[metrics]\nlisten = "tcp:{metrics}:interface=127.0.0.1"\n')
    try:
        base = _metric(metrics, "saslsmtp_connections_total")
        socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
        assert _talk(server.port, b"GET / HTTP/1.0\r\n\r\n") == b""
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(LOCAL_V2)
        wait_for(lambda: _metric(metrics, "saslsmtp_connections_total") == base + 3,
                 what="three accepted connections")
        wait_for(lambda: _metric(metrics, "saslsmtp_sessions") == 0, timeout=5,
                 what="no open session")
        assert _metric(metrics, "saslsmtp_sessions") == 0
    finally:
        server.stop()
