"""``server.listen`` strings as the master binds them and a worker adopts them."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import protocol

from saslsmtp.activation import Wanted
from saslsmtp.listeners import (ListenError, ListenerSpec, adopt, bind, interface_problem,
                                 parse)


def test_parse_the_endpoint_kinds() -> None:
    """tcp/tcp6/ssl/unix with Twisted's keywords and escapes; the haproxy: prefix."""
    assert parse("tcp:2525:interface=127.0.0.1") == ListenerSpec(
        "tcp:2525:interface=127.0.0.1", False, "tcp", "127.0.0.1", 2525, 50, ())
    assert parse("haproxy:tcp:port=587:backlog=200") == ListenerSpec(
        "haproxy:tcp:port=587:backlog=200", True, "tcp", "", 587, 200, ())
    six = parse("tcp6:465:interface=\\:\\:1")
    assert (six.address, six.family) == ("::1", socket.AF_INET6)
    assert parse("tcp6:465").address == "::"
    ssl = parse("ssl:465:interface=127.0.0.1:privateKey=k.pem")
    assert (ssl.kind, ssl.options) == ("ssl", (("privateKey", "k.pem"),))
    unix = parse("unix:/run/saslsmtp.sock:mode=660")
    assert (unix.kind, unix.address, unix.family, unix.options) == (
        "unix", "/run/saslsmtp.sock", socket.AF_UNIX, (("mode", "660"),))


def test_parse_systemd_listeners() -> None:
    """``systemd:name=`` (FileDescriptorName=) and/or ``port=``, or ``index=``, Twisted's ``domain=`` and
    positional form, ``ssl=yes`` for implicit TLS, ``haproxy:`` in front."""
    named = parse("systemd:name=submission")
    assert (named.kind, named.address, named.port, named.implicit_tls) == (
        "systemd", "submission", -1, False)
    assert named.wanted() == Wanted("systemd:name=submission", "submission", None, None)
    assert parse("systemd:INET:0").wanted() == Wanted("systemd:INET:0", None, 0, "INET")
    assert parse("systemd:name=saslsmtp:port=465").wanted() == Wanted(
        "systemd:name=saslsmtp:port=465", "saslsmtp", None, None, 465)
    assert parse("systemd:port=587").wanted() == Wanted("systemd:port=587", port=587)
    smtps = parse("haproxy:systemd:name=submissions:ssl=yes")
    assert (smtps.proxy, smtps.implicit_tls) == (True, True)
    assert parse("ssl:465").implicit_tls and not parse("tcp:587").implicit_tls


@pytest.mark.parametrize("description, message", [
    ("stdio:", "stdio: endpoints cannot be shared by workers"),
    ("systemd:index=0:name=submission", "needs name= .* and/or port=, or index= alone"),
    ("systemd:index=0:port=587", "needs name= .* and/or port=, or index= alone"),
    ("systemd:domain=INET", "needs name= .* and/or port=, or index= alone"),
    ("systemd:port=70000", "port 70000 is out of range"),
    ("systemd:name=x:port=smtp", "port=smtp is not a number"),
    ("systemd:nmae=submission", "unknown option nmae="),
    ("systemd:index=first", "index=first is not a number"),
    ("systemd:name=", "name= is empty"),
    ("systemd:name=smtps:ssl=on", "ssl=on is neither yes nor no"),
    ("systemd:domain=INET4:index=0", "domain=INET4 is none of INET, INET6, UNIX"),
    ("tcp:interface=127.0.0.1", "needs a port"),
    ("tcp:http", "port and backlog must be numbers"),
    ("tcp:70000", "port 70000 is out of range"),
])
def test_parse_refuses(description: str, message: str) -> None:
    """Each mistake names the listener."""
    with pytest.raises(ListenError, match=message):
        parse(description)


def test_bind_reports_a_port_in_use() -> None:
    """A taken port is a one-line error naming the listener, not a traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"cannot listen on tcp:{port}:interface=127.0.0.1: "
                                              "Address already in use"):
            bind(parse(f"tcp:{port}:interface=127.0.0.1"))


class Hello(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello\r\n")
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_unix_socket_bound_then_adopted(tmp_path: Path) -> None:
    """A stale socket file is replaced, mode applied, and the adopted fd serves."""
    from twisted.internet import reactor, threads
    path = tmp_path / "smtp.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    spec = parse(f"unix:{path}:mode=600")
    sock = bind(spec)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    fd = sock.detach()  # the adopting endpoint closes the inherited fd itself
    endpoint, factory = adopt(reactor, fd, spec, protocol.Factory.forProtocol(Hello), None)
    port = await endpoint.listen(factory)

    def fetch() -> bytes:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            return client.recv(100)
    try:
        assert await threads.deferToThread(fetch) == b"hello\r\n"
    finally:
        await port.stopListening()


def test_interface_problem_knows_names_addresses_and_endpoint_kinds() -> None:
    """Names resolve in the family the listener binds, literals need no resolver, an
    address that is not this machine's is named, and endpoints without an interface
    (none given, unix:, systemd:) have nothing to check."""
    assert interface_problem("tcp:0:interface=127.0.0.1") is None
    assert interface_problem("tcp:0:interface=localhost") is None
    assert interface_problem("haproxy:ssl:465:interface=127.0.0.1") is None
    assert interface_problem("tcp6:0:interface=::1") is None
    assert interface_problem("tcp:0") is None and interface_problem("unix:/tmp/x.sock") is None
    assert interface_problem("systemd:domain=INET:index=0") is None
    assert interface_problem("tcp:0:192.0.2.1") == (  # Twisted's positional interface too
        "interface '192.0.2.1' is no address of this machine (Cannot assign requested address)")
    assert interface_problem("tcp:0:interface=no-such-host.invalid").startswith(
        "interface 'no-such-host.invalid' does not resolve (")
    families = []

    def resolver(host: str, port: object, family: int, kind: int) -> list:
        families.append(family)
        return [(family, kind, 6, "", ("::1", 0, 0, 0) if family == socket.AF_INET6 else ("127.0.0.1", 0))]
    assert interface_problem("tcp:0:interface=example.test", resolve=resolver) is None
    # Twisted binds a name with IPv4 even for tcp6 (an IPv6 literal only with IPv6); the
    # master binds tcp6 with IPv6
    assert interface_problem("tcp6:0:interface=example.test", resolve=resolver) is None
    assert interface_problem("tcp6:0:interface=example.test", resolve=resolver, master=True) is None
    assert families == [socket.AF_INET, socket.AF_INET, socket.AF_INET6]


def test_interface_problem_waits_for_dns_no_longer_than_its_bound() -> None:
    """A resolver that hangs (a DNS server that never answers) costs ``timeout`` seconds,
    not --check's whole run."""
    import threading
    import time
    release = threading.Event()

    def hanging(*args: object) -> list:
        release.wait(30)
        raise OSError("late")
    started = time.monotonic()
    try:
        assert interface_problem("tcp:0:interface=slow.example.test", timeout=0.3,
                                 resolve=hanging) == (
            "interface 'slow.example.test' did not resolve within 0.3 s")
        assert time.monotonic() - started < 5
    finally:
        release.set()


def test_positional_arguments_are_read_as_twisted_reads_them() -> None:
    """``tcp:2525:127.0.0.1`` is Twisted's port and interface: one process listened on
    loopback only, and the master of ``workers = 2`` bound every address (the interface
    was dropped).  Backlog, a unix socket's mode and ssl's key file are positional too."""
    sock = bind(parse("tcp:0:127.0.0.1"))
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()
    assert parse("tcp:2525:127.0.0.1:7").backlog == 7
    assert parse("tcp6:2525:9").backlog == 9  # tcp6's order: port, backlog, interface
    assert dict(parse("unix:/tmp/x.sock:600").options) == {"mode": "600"}
    assert dict(parse("ssl:465:key.pem").options) == {"privateKey": "key.pem"}
    assert parse("tcp:2525:interface=127.0.0.2").address == "127.0.0.2"
