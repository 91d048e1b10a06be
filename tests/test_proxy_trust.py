"""``[server] proxy_trusted_networks``: a ``haproxy:`` listener believes a PROXY header
only from the proxies named there.  Before it, anyone who reached the port could name any
client address (and so pass ``allow_nets``, ``[limits] trusted_networks`` and the
per-address limits).  The decision and its log alone (a Clock), the configuration and
``--check``, and real daemons (one process and ``workers = 2``, a SIGHUP reload) behind a
real HAProxy."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent

from saslsmtp.config import ConfigError, parse_config
from saslsmtp.proxyheader import LOCAL_START_DELAY, HeaderFirstFactory
from saslsmtp.proxytrust import believed
from tests.limitsnet import PASSWORD, auth_plain, users_toml, wait_for_log
from tests.support import (ROOT, free_port, haproxy_checking, start_daemon, twistd_command,
                           wait_for, workers_daemon, write_config)
from tests.test_proxy_header import (HEADER_V2, LOCAL_V2, OWN_V1, _metric, _Recorder,
                                     logged)  # noqa: F401 (logged: a fixture)

#: HAProxy-style v2 header naming 203.0.113.9 as the client (HEADER_V2's address)
CLAIMED = "203.0.113.9"


def _refusals(events: list[dict]) -> list[str]:
    return [formatEvent(e) for e in events if "proxy_trusted_networks" in formatEvent(e)]


# ---- the decision -------------------------------------------------------------------

@pytest.mark.parametrize("host, trusted, expected", [
    ("127.0.0.2", None, True),  # unset: every peer, as before the setting
    ("127.0.0.2", ("127.0.0.1",), False),
    ("127.0.0.1", ("127.0.0.1",), True),
    ("10.1.2.3", ("10.0.0.0/8", "192.0.2.1"), True),
    ("10.1.2.3", ("10.0.0.1/8",), True),  # host bits ignored, as in [limits] trusted_networks
    ("::ffff:10.0.0.5", ("10.0.0.0/24",), True),  # a dual-stack socket's IPv4 peer
    ("2001:db8::7", ("2001:db8::/32",), True),
    ("2001:db8::7", ("10.0.0.0/8",), False),
    ("::ffff:127.0.0.2", ("127.0.0.1",), False),
    (None, ("127.0.0.1",), True),  # a UNIX-socket peer: its file's mode decides
])
def test_which_peers_are_believed(host: str | None, trusted: tuple[str, ...] | None,
                                  expected: bool) -> None:
    assert believed(host, trusted) is expected


def _factory(trusted: tuple[str, ...] | None) -> tuple[HeaderFirstFactory, Clock]:
    clock = Clock()
    return HeaderFirstFactory(Factory.forProtocol(_Recorder), clock, 5.0,
                              trusted=lambda: trusted, name="haproxy:tcp:2587"), clock


def test_an_untrusted_peer_gets_no_protocol_and_one_line_per_minute(logged: list[dict]) -> None:
    """``buildProtocol`` returns ``None`` (Twisted closes the socket before reading or
    sending a byte); the first refusal is one line with the peer's address, the next ones
    within the minute are one line counting them."""
    factory, clock = _factory(("127.0.0.1",))
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 40001)) is None
    assert _refusals(logged) == [
        "PROXY header from 127.0.0.2:40001 refused on haproxy:tcp:2587: 127.0.0.2 is not in"
        " server.proxy_trusted_networks; closed without a greeting"]
    for port in range(40002, 40012):
        assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.3", port)) is None
    assert len(_refusals(logged)) == 1
    clock.advance(60)
    assert _refusals(logged)[1:] == [
        "refused 10 more connections on haproxy:tcp:2587 from peers not in"
        " server.proxy_trusted_networks in 60 s (the last from 127.0.0.3:40011)"]
    clock.advance(60)  # a quiet minute: no line, no timer left
    assert len(_refusals(logged)) == 2 and clock.getDelayedCalls() == []
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 40020)) is None
    assert len(_refusals(logged)) == 3  # after the quiet minute: at once again


def test_an_ipv6_peer_outside_the_list_is_refused() -> None:
    factory, _ = _factory(("2001:db8::/32",))
    assert factory.buildProtocol(IPv6Address("TCP", "2001:db9::1", 40001)) is None
    assert factory.buildProtocol(IPv6Address("TCP", "2001:db8::1", 40001)) is not None


def test_a_unix_socket_peer_is_served() -> None:
    factory, _ = _factory(("127.0.0.1",))
    assert factory.buildProtocol(UNIXAddress(None)) is not None


def _connected(factory: HeaderFirstFactory, host: str, port: int = 50000):
    wrapper = factory.buildProtocol(IPv4Address("TCP", host, port))
    assert wrapper is not None
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    wrapper.makeConnection(transport)
    return wrapper, wrapper.wrappedProtocol, transport


def test_a_trusted_proxys_header_is_believed_as_before(logged: list[dict]) -> None:
    factory, clock = _factory(("10.0.0.0/24",))
    wrapper, recorder, transport = _connected(factory, "10.0.0.1")
    wrapper.dataReceived(HEADER_V2 + b"EHLO c.example\r\n")
    assert recorder.events == [("made", CLAIMED), ("data", b"EHLO c.example\r\n")]
    assert _refusals(logged) == []


@pytest.mark.parametrize("header", [LOCAL_V2, b"PROXY UNKNOWN\r\n", OWN_V1])
def test_a_trusted_proxys_health_checks_work_as_before(header: bytes) -> None:
    """``send-proxy-v2 check`` / ``send-proxy check`` and ``option smtpchk``: a header for
    the proxy's own connection starts a session of its address ``LOCAL_START_DELAY``
    later; one that resets before then starts none."""
    factory, clock = _factory(("10.0.0.1",))
    wrapper, recorder, transport = _connected(factory, "10.0.0.1")
    wrapper.dataReceived(header)
    assert recorder.events == []
    clock.advance(LOCAL_START_DELAY)
    assert recorder.events == [("made", "10.0.0.1")] and not transport.disconnecting


def test_the_setting_is_read_at_each_connection(logged: list[dict]) -> None:
    """What ``trusted()`` says now decides (a reload swaps the configuration it reads)."""
    current: list[tuple[str, ...] | None] = [("127.0.0.1",)]
    factory = HeaderFirstFactory(Factory.forProtocol(_Recorder), Clock(), 5.0,
                                 trusted=lambda: current[0])
    peer = IPv4Address("TCP", "127.0.0.2", 40001)
    assert factory.buildProtocol(peer) is None
    current[0] = ("127.0.0.0/8",)
    assert factory.buildProtocol(peer) is not None


# ---- the configuration and --check --------------------------------------------------

def _config(server: str, listen: str = "haproxy:tcp:2587") -> str:
    return (f'[server]\nlisten = ["{listen}"]\n{server}\n'
            f'[auth]\nmechanisms = ["PLAIN"]\nscript = "{__file__}"\n')  # a file that exists


@pytest.mark.parametrize("value, message", [
    ('["127.0.0.1", "haproxy.example"]', "'haproxy.example' is not an IP address or network"
                                         " (like 192.0.2.0/24)"),
    ("[]", "is empty: every haproxy: connection would be refused (leave it out to believe"
           " every peer)"),
    ("[1]", "must be an array of strings, not an array of integers"),
])
def test_a_bad_list_is_refused_at_its_line(value: str, message: str) -> None:
    text = _config(f"hostname = \"mx.example\"\nproxy_trusted_networks = {value}")
    with pytest.raises(ConfigError) as e:
        parse_config(text, "/etc/saslsmtp.toml")
    assert f"/etc/saslsmtp.toml:4: server.proxy_trusted_networks: {message}" in str(e.value)


def test_a_single_string_is_one_network() -> None:
    config = parse_config(_config('proxy_trusted_networks = "10.0.0.0/24"'), "x.toml")
    assert config.server.proxy_trusted_networks == ("10.0.0.0/24",)


def _check(tmp_path: Path, server: str, listen: str) -> tuple[int, str, Path]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    path = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                        listen=[listen])
    path.write_text(path.read_text().replace("[server]\n", "[server]\n" + server, 1))
    done = subprocess.run(twistd_command(path, "--check"), capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return done.returncode, done.stdout + done.stderr, path


def test_check_warns_when_a_haproxy_listener_believes_everyone(tmp_path: Path) -> None:
    status, out, path = _check(tmp_path, "", "haproxy:tcp:2587:interface=127.0.0.1")
    assert status == 0 and f"{path}: OK" in out, out
    assert (f"{path}:3: server.listen: warning: 'haproxy:tcp:2587:interface=127.0.0.1' believes"
            " the PROXY header of every peer that can connect") in out, out
    assert "set [server] proxy_trusted_networks to the proxies' addresses" in out


def test_check_is_quiet_with_the_list_and_refuses_a_bad_one_at_its_line(tmp_path: Path) -> None:
    status, out, path = _check(tmp_path / "good", 'proxy_trusted_networks = ["127.0.0.1"]\n',
                               "haproxy:tcp:2587:interface=127.0.0.1")
    assert status == 0 and "proxy" not in out.replace(str(path), ""), out
    status, out, path = _check(tmp_path / "bad", 'proxy_trusted_networks = ["10.0.0.300"]\n',
                               "haproxy:tcp:2587:interface=127.0.0.1")
    assert status == 1 and (f"{path}:2: server.proxy_trusted_networks: '10.0.0.300' is not an"
                            " IP address or network") in out, out
    assert "Traceback" not in out


def test_check_says_the_list_does_nothing_without_a_haproxy_listener(tmp_path: Path) -> None:
    status, out, path = _check(tmp_path, 'proxy_trusted_networks = ["127.0.0.1"]\n',
                               "tcp:2587:interface=127.0.0.1")
    assert status == 0 and (f"{path}:2: server.proxy_trusted_networks: warning: has no effect:"
                            " no server.listen entry starts with haproxy:") in out, out


# ---- real daemons -------------------------------------------------------------------

def _direct(port: int, source: str, first: bytes) -> bytes:
    """From ``source``, connect, send ``first`` (a PROXY header and EHLO), read until the
    server closes; QUIT once greeted and answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as s:
        got = b""
        try:
            s.sendall(first)
            while data := s.recv(4096):
                got += data
                if b"250 " in got and got.endswith(b"\r\n"):
                    s.sendall(b"QUIT\r\n")
        except (ConnectionResetError, BrokenPipeError):
            pass
        return got


CLAIM = HEADER_V2 + b"EHLO spoof.example\r\n"



def _trusting_config(folder: Path, port: int, trusted: str, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = write_config(folder, users_toml(folder, {"alice": PASSWORD}),
                        listen=[f"haproxy:tcp:{port}:interface=127.0.0.1"], extra=extra)
    path.write_text(path.read_text().replace(
        "[server]\n", f"[server]\nproxy_trusted_networks = {trusted}\n", 1))
    return path


@pytest.mark.parametrize("smtpchk", [False, True], ids=["send-proxy-v2-check", "smtpchk"])
def test_a_direct_claim_is_refused_while_haproxy_and_its_checks_work(
        tmp_path: Path, smtpchk: bool) -> None:
    """Only 127.0.0.1 (HAProxy) is trusted: 127.0.0.2 sending a header that claims
    203.0.113.9 gets no greeting and one log line naming 127.0.0.2, and no session of
    203.0.113.9 exists; HAProxy's checks and a client through it work as before."""
    metrics, front, port = free_port(), free_port(), free_port()
    config = _trusting_config(tmp_path, port, '["127.0.0.1"]',
                              f'[metrics]\nlisten = "tcp:{metrics}:interface=127.0.0.1"\n')
    server = start_daemon(config, port, tmp_path / "daemon.log")
    proxy = haproxy_checking(tmp_path, front, port, smtpchk=smtpchk)
    try:
        base = _metric(metrics, "saslsmtp_connections_total")
        assert _direct(port, "127.0.0.2", CLAIM) == b""
        log = wait_for_log(server, "PROXY header from 127.0.0.2:")
        assert "127.0.0.2 is not in server.proxy_trusted_networks; closed without a greeting" in log
        wait_for(lambda: _metric(metrics, "saslsmtp_connections_total") >= base + 10,
                 what="ten HAProxy checks")
        if smtpchk:  # each check is a session of HAProxy's own address
            wait_for_log(server, "session end client=127.0.0.1 ", count=3)
        assert auth_plain(front, "alice", PASSWORD, "127.0.6.1").code == 235
        log = wait_for_log(server, "session end client=127.0.6.1")
        assert CLAIMED not in log and "spoof.example" not in log, log[-3000:]
        assert "PROXY protocol header" not in log, log[-3000:]  # no check was refused
    finally:
        proxy.terminate()
        proxy.wait(10)
        server.stop()


def test_workers_refuse_untrusted_peers_and_follow_a_reload(tmp_path: Path) -> None:
    """``workers = 2``: every worker refuses 127.0.0.2; after the list is widened and
    SIGHUP sent, both workers believe it (the setting is read per connection)."""
    port = free_port()
    config = _trusting_config(tmp_path, port, '["127.0.0.1"]')
    config.write_text(config.read_text().replace("[server]\n", "[server]\nworkers = 2\n", 1))
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, 2) as master:
        for _ in range(6):  # the kernel hands them to either worker
            assert _direct(port, "127.0.0.2", CLAIM) == b""
        trusted = _direct(port, "127.0.0.1", CLAIM)
        assert trusted.startswith(b"220 ") and b"250 " in trusted, trusted
        wait_for(lambda: "client=203.0.113.9" in log.read_text(), what="the trusted session")
        assert log.read_text().count("PROXY header from 127.0.0.2:") >= 1
        config.write_text(config.read_text().replace(
            'proxy_trusted_networks = ["127.0.0.1"]', 'proxy_trusted_networks = ["127.0.0.0/29"]'))
        master.send_signal(signal.SIGHUP)
        wait_for(lambda: log.read_text().count("new sessions use it") == 2, what="two reloads")
        for _ in range(4):
            got = _direct(port, "127.0.0.2", CLAIM)
            assert got.startswith(b"220 ") and b"250 " in got, got


def test_a_reload_narrows_the_list_of_a_single_process(tmp_path: Path) -> None:
    port = free_port()
    config = _trusting_config(tmp_path, port, '["127.0.0.0/29"]')
    server = start_daemon(config, port, tmp_path / "daemon.log")
    try:
        assert _direct(port, "127.0.0.2", CLAIM).startswith(b"220 ")
        config.write_text(config.read_text().replace('["127.0.0.0/29"]', '["127.0.0.1"]'))
        server.process.send_signal(signal.SIGHUP)
        wait_for_log(server, "new sessions use it")
        assert _direct(port, "127.0.0.2", CLAIM) == b""
        wait_for_log(server, "PROXY header from 127.0.0.2:")
    finally:
        server.stop()


# ---- a flood of refused connections: exact lines, counts by reason -------------------

def _from(port: int, source: str, first: bytes) -> tuple[bytes, int]:
    """From ``source``, connect, send ``first``, read until the server closes: (what came,
    the client's port, as the log names it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as s:
        sport = s.getsockname()[1]
        got = b""
        try:
            if first:
                s.sendall(first)
            while data := s.recv(4096):
                got += data
        except (ConnectionResetError, BrokenPipeError):
            pass
        return got, sport


def _refusal_samples(port: int) -> dict[tuple[str, str], float]:
    """``saslsmtp_proxy_refusals_total`` from the daemon's /metrics, by (listener, reason)."""
    import re
    import urllib.request
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {}
    for m in re.finditer(r'^saslsmtp_proxy_refusals_total\{listener="((?:[^"\\]|\\.)*)",'
                         r'reason="([a-z_0-9]+)"\} (\S+)$', body, re.M):
        found[(m.group(1).replace("\\\\", "\\"), m.group(2))] = float(m.group(3))
    return found


def _proxy_log_lines(text: str) -> list[str]:
    """The daemon's PROXY lines without their time and namespace prefix."""
    return [line.split("] ", 1)[1] for line in text.splitlines()
            if "PROXY protocol header" in line or "PROXY header from" in line
            or "proxy_trusted_networks from" in line]


def test_refused_connections_are_logged_once_and_counted_by_reason(tmp_path: Path) -> None:
    """A real daemon with two haproxy: listeners, one of them an IPv6 socket bound to
    ``::ffff:127.0.0.1`` (an IPv4 client there is ``::ffff:127.0.0.1``, as on a
    dual-stack ``[::]`` listener).  Ten connections without a valid header and four from
    an untrusted peer make one line each kind per listener (they were a line each), with
    the peer as its IPv4 address; /metrics counts every one by reason."""
    metrics, port, mapped = free_port(), free_port(), free_port()
    plain = f"haproxy:tcp:{port}:interface=127.0.0.1"
    dual = f"haproxy:tcp6:{mapped}:interface=\\:\\:ffff\\:127.0.0.1"
    config = _trusting_config(tmp_path, port, '["127.0.0.1"]',
                              f'[metrics]\nlisten = "tcp:{metrics}:interface=127.0.0.1"\n')
    config.write_text(config.read_text().replace(
        f'listen = ["{plain}"]', f'listen = ["{plain}", "{dual.replace(chr(92), chr(92) * 2)}"]'))
    server = start_daemon(config, port, tmp_path / "daemon.log")
    try:
        sent = [b"EHLO scanner.example\r\n", b"GET / HTTP/1.0\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS on the plain port
                b"PROXY TCP4 198.51.100.7\r\n", b"PROXY TCP4 198.51.100.7 192.0.2.1 x 587\r\n",
                b"PROXY TCP4 mail.example 192.0.2.1 40000 587\r\n",
                b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04\x01\x01\x01\x01",
                b"\r\n\r\n\x00\r\nQUIT\n\x21\x99\x00\x00"]
        answers = [_from(port, "127.0.0.1", first) for first in sent]
        assert [got for got, _ in answers] == [b""] * len(sent)
        untrusted = [_from(port, "127.0.0.2", CLAIM) for _ in range(4)]
        assert [got for got, _ in untrusted] == [b""] * 4
        silent = [_from(port, "127.0.0.1", b""), _from(port, "127.0.0.1", b"PROXY TCP4 1")]
        assert [got for got, _ in silent] == [b""] * 2  # closed after 5 s each (in turn)
        on_dual = _from(mapped, "127.0.0.1", b"EHLO scanner.example\r\n")
        refused_dual = _from(mapped, "127.0.0.2", CLAIM)
        assert on_dual[0] == refused_dual[0] == b""
        expected = {(plain, "not_proxy"): 3.0, (plain, "invalid_v1"): 3.0,
                    (plain, "invalid_v2"): 2.0, (plain, "untrusted"): 4.0,
                    (plain, "timeout"): 2.0, (dual, "not_proxy"): 1.0, (dual, "untrusted"): 1.0}
        wait_for(lambda: _refusal_samples(metrics) == expected, timeout=5,
                 what=f"the refusals counted (got {_refusal_samples(metrics)})")
        log = server.log_text()
        assert _proxy_log_lines(log) == [
            f"no valid PROXY protocol header from 127.0.0.1:{answers[0][1]} on {plain}"
            " (not a PROXY header); closing",
            f"PROXY header from 127.0.0.2:{untrusted[0][1]} refused on {plain}: 127.0.0.2 is"
            " not in server.proxy_trusted_networks; closed without a greeting",
            f"no valid PROXY protocol header from 127.0.0.1:{on_dual[1]} on {dual}"
            " (not a PROXY header); closing",
            f"PROXY header from 127.0.0.2:{refused_dual[1]} refused on {dual}: 127.0.0.2 is"
            " not in server.proxy_trusted_networks; closed without a greeting",
        ], log[-4000:]
        assert "::ffff:" not in log and "Traceback" not in log, log[-4000:]
    finally:
        server.stop()
