"""The ldap backend through the whole SMTP path: smtplib (and a Twisted client for load)
against an in-process saslsmtp whose only backend is a real slapd (tests/slapd.py).

Replies: 235 2.7.0 on success, 535 5.7.8 on wrong credentials, 454 4.7.0 when the
directory is down or hung.  The load test checks that LDAP work never stalls the
reactor: an unrelated connection's EHLO round trip stays fast during 32 concurrent
LDAP-backed logins.
"""

from __future__ import annotations

import base64
import re
import statistics
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.protocols.basic import LineOnlyReceiver

from tests.slapd import (ALICE, BOB, PEOPLE, READER_DN, READER_PASSWORD, TWIN1, SlapdServer,
                         parse_operations, running_slapd)
from tests.support import (Daemon, RunningServer, free_port, smtp_login, start_daemon,
                           start_server, write_config)

TIMEOUT = 1.0
MARGIN = 0.5  # on top of TIMEOUT for a 454 from a hung directory (measured: ~20 ms)
LOAD_CONCURRENCY = 32
LOAD_SECONDS = 3.0
EHLO_P99_LIMIT = 0.100
EHLO_INTERVAL = 0.005


def template_backend(url: str, **extra: Any) -> str:
    """A ``[backends.directory]`` table in DN-template mode."""
    lines = ["[backends.directory]", 'type = "ldap"', f'url = "{url}"',
             f'user_dn = "uid={{username}},{PEOPLE}"', f"timeout = {TIMEOUT}"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


def search_backend(url: str, **extra: Any) -> str:
    """A ``[backends.directory]`` table in search-then-bind mode with the reader account."""
    lines = ["[backends.directory]", 'type = "ldap"', f'url = ["{url}"]',
             f'search_base = "{PEOPLE}"', 'search_filter = "(uid={username})"',
             f'search_dn = "{READER_DN}"', f'search_password = "{READER_PASSWORD}"',
             f"timeout = {TIMEOUT}"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdServer]:
    """One seeded slapd for the module."""
    yield from running_slapd()


@pytest_twisted.async_yield_fixture(params=["template", "search"])
async def server(request: Any, slapd: SlapdServer, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """saslsmtp with the ldap backend, once per lookup mode."""
    make = template_backend if request.param == "template" else search_backend
    running = await start_server(tmp_path, make(slapd.url))
    yield running
    await running.stop()


def assert_reply(reply: tuple[int, bytes], code: int, enhanced: str) -> None:
    """``reply`` is ``code`` with the enhanced status code ``enhanced``."""
    assert reply[0] == code, reply
    assert reply[1].startswith(enhanced.encode()), reply


@pytest_twisted.ensureDeferred
async def test_plain_and_login(server: RunningServer) -> None:
    """PLAIN and LOGIN: right password 235 2.7.0, wrong password and unknown user 535 5.7.8."""
    for mechanism in ("PLAIN", "LOGIN"):
        assert_reply(await smtp_login(server.port, "alice", ALICE.password,
                                      mechanism=mechanism), 235, "2.7.0")
        assert_reply(await smtp_login(server.port, "twin1", TWIN1.password,
                                      mechanism=mechanism), 235, "2.7.0")
        assert_reply(await smtp_login(server.port, "alice", "wrong",
                                      mechanism=mechanism), 535, "5.7.8")
        assert_reply(await smtp_login(server.port, "nobody", "x",
                                      mechanism=mechanism), 535, "5.7.8")


@pytest.mark.parametrize("username", ["*", "al*", "*)(uid=*", "alice)(|(uid=*", "alice,", "\\",
                                      "alice+uid=alice"])
@pytest_twisted.ensureDeferred
async def test_injection_gets_535(server: RunningServer, username: str) -> None:
    """Filter and DN injection attempts with alice's password are a plain 535 5.7.8."""
    assert_reply(await smtp_login(server.port, username, ALICE.password), 535, "5.7.8")


@pytest_twisted.ensureDeferred
async def test_empty_password_535_without_bind(server: RunningServer,
                                               slapd: SlapdServer) -> None:
    """An empty password is a 535 and never reaches slapd as a bind (twin1's login after
    it proves the log is complete)."""
    before = len(slapd.bind_lines())
    assert_reply(await smtp_login(server.port, "alice", ""), 535, "5.7.8")
    assert_reply(await smtp_login(server.port, "twin1", TWIN1.password), 235, "2.7.0")
    binds = slapd.bind_lines()[before:]
    assert any(f'dn="{TWIN1.dn}"' in b for b in binds)
    assert not any(f'dn="{ALICE.dn}"' in b or 'BIND dn=""' in b for b in binds)


@pytest_twisted.ensureDeferred
async def test_down_454_then_restarted_235(server: RunningServer, slapd: SlapdServer) -> None:
    """slapd stopped -> 454 4.7.0; started again -> 235 with the same saslsmtp."""
    assert_reply(await smtp_login(server.port, "alice", ALICE.password), 235, "2.7.0")
    slapd.stop()
    try:
        for mechanism in ("PLAIN", "LOGIN"):
            assert_reply(await smtp_login(server.port, "alice", ALICE.password,
                                          mechanism=mechanism), 454, "4.7.0")
    finally:
        slapd.start()
    for mechanism in ("PLAIN", "LOGIN"):
        assert_reply(await smtp_login(server.port, "alice", ALICE.password,
                                      mechanism=mechanism), 235, "2.7.0")


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_hung_directory_454_within_timeout(server: RunningServer,
                                                 slapd: SlapdServer) -> None:
    """A SIGSTOPped slapd -> 454 4.7.0 within ``timeout`` (+ margin) of sending AUTH;
    SIGCONT -> 235 again."""
    assert_reply(await smtp_login(server.port, "alice", ALICE.password), 235, "2.7.0")
    slapd.pause()
    try:
        started = time.monotonic()
        reply = await smtp_login(server.port, "alice", ALICE.password)
        elapsed = time.monotonic() - started
    finally:
        slapd.resume()
    assert_reply(reply, 454, "4.7.0")
    assert TIMEOUT * 0.9 <= elapsed <= TIMEOUT + MARGIN, elapsed
    assert_reply(await smtp_login(server.port, "alice", ALICE.password), 235, "2.7.0")


@pytest_twisted.ensureDeferred
async def test_logins_reuse_ldap_connections(server: RunningServer, slapd: SlapdServer) -> None:
    """Ten logins in a row, right and wrong passwords mixed, through SMTP: slapd accepts one
    connection for the users (two with the reader's for search-then-bind) and never sees
    an unbind; every search for a user runs as the reader, every wrong password is a 535
    and the right one after it a 235 (the failed bind left nothing behind)."""
    lines = len(slapd.log_text().splitlines())
    for i in range(10):
        right = i % 2 == 0
        assert_reply(await smtp_login(server.port, "alice", ALICE.password if right else "bad"),
                     235 if right else 535, "2.7.0" if right else "5.7.8")
    log = slapd.log_text().splitlines()[lines:]
    # Only this server's connections: the previous parametrization's server closes its
    # own (with an UNBIND) as it stops, and slapd may log that a little later.
    mine = {int(m.group(1)) for m in map(re.compile(r"conn=(\d+) fd=\d+ ACCEPT from").search,
                                          log) if m}
    operations = [o for o in parse_operations(log) if o.conn in mine]
    searches = [o for o in operations if o.kind == "SRCH"]
    accepted = len(mine)
    assert accepted == (2 if searches else 1), accepted
    assert all(o.bound_as == READER_DN for o in searches)
    assert len(searches) in (0, 10)
    assert sum(o.kind == "BIND" and ALICE.dn in o.text for o in operations) == 10
    assert not [o for o in operations if o.kind == "UNBIND"]


@pytest_twisted.ensureDeferred
async def test_require_filter_through_smtp(slapd: SlapdServer, tmp_path: Path) -> None:
    """With require_filter (group membership): alice 235, twin1 (right password) 535."""
    server = await start_server(tmp_path, template_backend(
        slapd.url, require_filter='"(memberOf=cn=mailusers,ou=groups,dc=example,dc=test)"'))
    try:
        assert_reply(await smtp_login(server.port, "alice", ALICE.password), 235, "2.7.0")
        assert_reply(await smtp_login(server.port, "twin1", TWIN1.password), 535, "5.7.8")
    finally:
        await server.stop()


# ---- load: the reactor stays responsive --------------------------------------------


class SmtpClient(LineOnlyReceiver):
    """A minimal SMTP client: ``reply()`` for the greeting, ``command(line)`` for the rest;
    each fires with the reply's lines."""

    delimiter = b"\r\n"

    def __init__(self) -> None:
        self._pending: Deferred[list[bytes]] | None = Deferred()
        self._lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)
        if line[3:4] != b"-":
            lines, self._lines = self._lines, []
            pending, self._pending = self._pending, None
            if pending is not None:
                pending.callback(lines)

    def reply(self) -> "Deferred[list[bytes]]":
        assert self._pending is not None
        return self._pending

    def command(self, line: bytes) -> "Deferred[list[bytes]]":
        self._pending = Deferred()
        self.sendLine(line)
        return self._pending


async def connect(port: int) -> SmtpClient:
    """A connected ``SmtpClient`` that has read the greeting."""
    from twisted.internet import endpoints, reactor
    client = SmtpClient()
    await endpoints.connectProtocol(
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await client.reply()
    return client


async def plain_login(port: int, username: str, password: str) -> int:
    """One session: greeting, EHLO, AUTH PLAIN; the AUTH reply code."""
    client = await connect(port)
    try:
        await client.command(b"EHLO load.example")
        blob = base64.b64encode(f"\0{username}\0{password}".encode())
        reply = await client.command(b"AUTH PLAIN " + blob)
        return int(reply[-1][:3])
    finally:
        client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_utf8_password_plain(server: RunningServer) -> None:
    """A non-ASCII password goes to the directory as its UTF-8 octets (smtplib cannot send
    one, so this uses the raw client): 235, and a near miss 535."""
    assert await plain_login(server.port, "bob", BOB.password) == 235
    assert await plain_login(server.port, "bob", BOB.password.upper()) == 535


@pytest.fixture(scope="module")
def daemon(slapd: SlapdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """``twistd -n saslsmtp`` in its own process, search-then-bind, default ``threads``."""
    tmp = tmp_path_factory.mktemp("ldap-daemon")
    port = free_port()
    config = write_config(tmp, search_backend(slapd.url),
                          listen=[f"tcp:{port}:interface=127.0.0.1"])
    running = start_daemon(config, port, tmp / "saslsmtp.log")
    yield running
    running.stop()


def percentile(ordered: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of an ascending list (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def ehlo_latencies_while(port: int, busy: "Deferred[Any]") -> list[float]:
    """EHLO round trips on one connection, every ``EHLO_INTERVAL``, until ``busy`` fires;
    ascending."""
    from twisted.internet import reactor, task
    probe = await connect(port)
    done: list[bool] = []
    busy.addBoth(lambda result: (done.append(True), result)[1])
    latencies: list[float] = []
    try:
        while not done:
            started = time.monotonic()
            reply = await probe.command(b"EHLO probe.example")
            latencies.append(time.monotonic() - started)
            assert reply[-1].startswith(b"250 "), reply
            await task.deferLater(reactor, EHLO_INTERVAL, lambda: None)
    finally:
        probe.transport.loseConnection()
    return sorted(latencies)


def report(what: str, latencies: list[float], extra: str) -> str:
    """One line of figures (printed; run with ``-s`` to see it)."""
    line = (f"EHLO during {what}: n={len(latencies)} "
            f"p50={statistics.median(latencies) * 1000:.1f} ms "
            f"p99={percentile(latencies, 0.99) * 1000:.1f} ms "
            f"max={latencies[-1] * 1000:.1f} ms; {extra}")
    print("\n" + line)
    return line


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_ehlo_stays_fast_during_ldap_logins(daemon: Daemon) -> None:
    """32 concurrent LDAP-backed logins (search-then-bind) for 3 s against the daemon: an
    unrelated connection's EHLO round trip keeps p99 under 100 ms; every login gets 235.

    Prints EHLO p50/p99 and the login throughput.
    """
    deadline = time.monotonic() + LOAD_SECONDS
    codes: list[int] = []

    async def worker() -> None:
        while time.monotonic() < deadline:
            codes.append(await plain_login(daemon.port, "alice", ALICE.password))

    load = gatherResults([ensureDeferred(worker()) for _ in range(LOAD_CONCURRENCY)])
    latencies = await ehlo_latencies_while(daemon.port, load)
    await load
    report(f"{LOAD_CONCURRENCY} concurrent LDAP logins", latencies,
           f"logins: {len(codes)} in {LOAD_SECONDS:.0f} s = {len(codes) / LOAD_SECONDS:.0f}/s")
    assert set(codes) == {235}, sorted(set(codes))
    assert len(codes) >= LOAD_CONCURRENCY
    assert len(latencies) >= 50
    assert percentile(latencies, 0.99) < EHLO_P99_LIMIT


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_ehlo_stays_fast_while_directory_hangs(daemon: Daemon, slapd: SlapdServer) -> None:
    """32 logins at once against a SIGSTOPped slapd: EHLO p99 stays under 100 ms, and every
    login gets 454 4.7.0 within twice ``timeout`` (+ margin), queued ones included."""
    assert await plain_login(daemon.port, "alice", ALICE.password) == 235
    slapd.pause()
    try:
        started = time.monotonic()
        load = gatherResults([ensureDeferred(plain_login(daemon.port, "alice", ALICE.password))
                              for _ in range(LOAD_CONCURRENCY)])
        latencies = await ehlo_latencies_while(daemon.port, load)
        codes = await load
        elapsed = time.monotonic() - started
    finally:
        slapd.resume()
    report(f"{LOAD_CONCURRENCY} logins to a hung directory", latencies,
           f"all answered in {elapsed:.2f} s")
    assert codes == [454] * LOAD_CONCURRENCY
    assert elapsed <= 2 * TIMEOUT + MARGIN, elapsed
    assert len(latencies) >= 20
    assert percentile(latencies, 0.99) < EHLO_P99_LIMIT
    assert await plain_login(daemon.port, "alice", ALICE.password) == 235


def _send(port: int, user: str, password: str) -> dict[str, Any]:
    import smtplib
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as s:
        s.ehlo("client.example")
        s.login(user, password)
        return s.sendmail(user, ["rcpt@example.test"], b"Subject: id\r\n\r\nhello\r\n")


@pytest_twisted.ensureDeferred
async def test_identity_attribute_is_the_session_identity(slapd: SlapdServer,
                                                          tmp_path: Path) -> None:
    """Log in with a mail address; the Received header names the directory's uid."""
    from twisted.internet import threads
    backend = search_backend(slapd.url, identity_attribute='"uid"').replace(
        '"(uid={username})"', '"(mail={username})"')
    running = await start_server(tmp_path, backend)
    try:
        assert await threads.deferToThread(_send, running.port, ALICE.mail,
                                           ALICE.password) == {}
        [message] = running.messages()
        assert b"(authenticated user alice)" in message
    finally:
        await running.stop()
