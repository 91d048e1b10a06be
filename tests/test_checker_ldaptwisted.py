"""The ``ldap`` backend's Twisted-native client (saslsmtp/checkers/ldaptwisted.py).

The behaviour tests of tests/test_checker_ldap.py that do not reach into ldap3 are run
again here, unchanged, against a real slapd with ``TwistedLdapChecker`` (this module's
``make_checker``); then exact-byte transcript tests of the wire client over
``StringTransport`` with a fake clock, and the connection pool on its own.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from saslsmtp.checkers import ldapwire
from saslsmtp.checkers.ldap import LdapOptions, from_config
from saslsmtp.checkers.ldapclient import (LdapConnectionLost, LdapProtocol, LdapTimeout)
from saslsmtp.checkers.ldappool import ConnectionPool, PoolWaitTooLong
from saslsmtp.checkers.ldaptwisted import TwistedDirectory, TwistedLdapChecker
from saslsmtp.checkers.registry import BackendDeps
from tests.slapd import ALICE, BOB, READER_DN, SlapdServer, parse_operations
from tests.test_checker_ldap import (  # noqa: F401  (fixtures and tests run again here)
    TEMPLATE, TIMEOUT, blackhole, captured_log, outcome, search_options, slapd,
    test_template_bind, test_template_escapes_dn_specials, test_template_injection_rejected,
    test_directory_matching_rules_apply, test_search_then_bind,
    test_search_by_mail_and_ambiguity, test_search_anonymous,
    test_search_escapes_filter_specials, test_search_injection_rejected,
    test_wrong_service_password_is_temporary,
    test_template_logins_reuse_a_bounded_set_of_connections,
    test_searches_run_as_the_service_account_only,
    test_empty_or_undecodable_username_rejected, test_require_filter,
    test_identity_attribute_names_the_user,
    test_identity_attribute_with_require_filter_and_missing_values,
    test_ldaps_and_start_tls, test_tls_verification, test_down_then_restarted,
    test_unresponsive_server_times_out, test_failover,
    test_queued_logins_fail_fast_when_directory_hangs,
    test_outage_warned_once_and_recovery_logged)


@pytest.fixture
def make_checker(slapd: SlapdServer) -> Iterator[Callable[..., TwistedLdapChecker]]:
    """Factory: ``make_checker(**options)`` -> a Twisted-native checker on the test
    reactor, stopped afterwards.  Defaults as in tests/test_checker_ldap.py."""
    from twisted.internet import reactor
    made: list[TwistedLdapChecker] = []

    def make(**options: Any) -> TwistedLdapChecker:
        values: dict[str, Any] = {"url": (slapd.url,), "timeout": TIMEOUT, "threads": 4}
        if "search_base" not in options:
            values["user_dn"] = TEMPLATE
        values.update(options)
        checker = TwistedLdapChecker("test", TwistedDirectory(LdapOptions(**values), reactor))
        made.append(checker)
        return checker

    yield make
    for checker in made:
        checker.stop()


# ---- the wire client over StringTransport ------------------------------------------

BIND_ALICE = bytes.fromhex(  # RFC 4511 BindRequest, message 1, v3, simple "pw"
    "301c020101" "6017" "020103" "040e" + b"uid=alice,dc=x".hex() + "80027077")
BIND_OK_1 = bytes.fromhex("300c020101" "6107" "0a0100" "0400" "0400")


def bind_result(message_id: int, code: int, text: bytes = b"") -> bytes:
    """A BindResponse as a server writes it."""
    return ldapwire.message(message_id, ldapwire.tlv(
        0x61, bytes((0x0A, 1, code)) + b"\x04\x00" + ldapwire.tlv(0x04, text)))


def connected(timeout: float = 5.0) -> tuple[LdapProtocol, StringTransport, Clock]:
    """An ``LdapProtocol`` on a ``StringTransport`` with a fake clock."""
    clock = Clock()
    protocol = LdapProtocol(clock, timeout)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


def test_bind_request_bytes_and_answer() -> None:
    """A bind is written as exactly one BER LDAPMessage (ID 1, version 3, simple) and
    fires with the decoded result when the answer comes, even one byte at a time."""
    protocol, transport, _ = connected()
    results: list[ldapwire.Result] = []
    protocol.bind(b"uid=alice,dc=x", b"pw").addCallback(results.append)
    assert transport.value() == BIND_ALICE
    for i in range(len(BIND_OK_1)):
        protocol.dataReceived(BIND_OK_1[i:i + 1])
    assert results == [ldapwire.Result(0)]
    assert results[0].description == "success"


def test_wrong_password_answer_and_next_message_id() -> None:
    """invalidCredentials comes back as code 49 with the server's text; the next request
    on the connection gets message ID 2."""
    protocol, transport, _ = connected()
    results: list[ldapwire.Result] = []
    protocol.bind(b"uid=alice,dc=x", b"wrong").addCallback(results.append)
    protocol.dataReceived(bind_result(1, 49, b"bad"))
    assert results == [ldapwire.Result(49, "", "bad")]
    assert results[0].description == "invalidCredentials"
    transport.clear()
    protocol.bind(b"uid=bob,dc=x", b"pw")
    assert transport.value()[2:5] == b"\x02\x01\x02"


def test_pipelined_searches_answered_out_of_order() -> None:
    """Two searches in flight on one connection, answered in the other order and in one
    chunk: each gets its own entries and result (matched by message ID)."""
    protocol, transport, _ = connected()
    shape = ldapwire.SearchShape.of(ldapwire.SCOPE_SUBTREE, 2, (ldapwire.NO_ATTRIBUTES,))
    found = ldapwire.compile_filter("(uid={username})", True)
    got: dict[str, Any] = {}
    for name in ("alice", "bob"):
        protocol.search(shape.request(b"dc=x", found.encode(name.encode()))).addCallback(
            lambda r, name=name: got.__setitem__(name, r))
    sent = transport.value()
    assert sent.count(b"\x63") >= 2 and b"alice" in sent and b"bob" in sent
    entry = ldapwire.tlv(0x64, ldapwire.tlv(0x04, b"uid=bob,dc=x") + ldapwire.tlv(0x30, b""))
    done = ldapwire.tlv(0x65, b"\x0a\x01\x00\x04\x00\x04\x00")
    protocol.dataReceived(ldapwire.message(2, entry) + ldapwire.message(2, done)
                          + ldapwire.message(1, done))
    assert got["alice"] == (ldapwire.Result(0), [])
    assert got["bob"] == (ldapwire.Result(0), [ldapwire.Entry("uid=bob,dc=x", {})])


def test_search_request_bytes_match_ldap3() -> None:
    """The search-then-bind request is byte for byte what ldap3 (pyasn1) encodes."""
    from ldap3.operation.search import search_operation
    from ldap3.protocol.rfc4511 import LDAPMessage, MessageID, ProtocolOp
    from ldap3.utils.asn1 import encode
    text = "(&(objectClass=inetOrgPerson)(uid={username}))"
    shape = ldapwire.SearchShape.of(ldapwire.SCOPE_SUBTREE, 2, (ldapwire.NO_ATTRIBUTES,))
    ours = ldapwire.message(5, shape.request(
        b"ou=people,dc=x", ldapwire.compile_filter(text, True).encode(b"al*ce")))
    request = search_operation("ou=people,dc=x", text.replace("{username}", "al\\2ace"),
                               "SUBTREE", "NEVER", ["1.1"], 2, 0, False, False, False)
    message = LDAPMessage()
    message["messageID"] = MessageID(5)
    message["protocolOp"] = ProtocolOp().setComponentByName("searchRequest", request)
    assert ours == encode(message)


@pytest.mark.parametrize("text", [
    "(&(objectClass=inetOrgPerson)(uid=alice))",
    "(memberOf=cn=mail,ou=groups,dc=example,dc=test)",
    "(|(a=b*c*d)(!(c>=5))(x=*)(y<=z)(cn~=smith))",
    "(cn=Parens R Us \\28for all\\29)",
    "(uid=*x)", "(uid=x*)",
])
def test_filters_encode_like_ldap3(text: str) -> None:
    """RFC 4515 filters encode exactly as ldap3's parser and pyasn1 encode them."""
    from ldap3.operation.search import compile_filter, parse_filter
    from pyasn1.codec.ber import encoder
    theirs = encoder.encode(compile_filter(parse_filter(text, None, False, None, None,
                                                        False).elements[0]))
    assert ldapwire.compile_filter(text).encode() == theirs


@pytest.mark.parametrize("text", ["(uid=x", "uid=x", "(uid=x))", "(&)", "(uid=\\zz)",
                                  "({username}=x)", "(uid=a(b)"])
def test_bad_filters_are_refused(text: str) -> None:
    """Malformed filters (and a placeholder outside a value) are a ``FilterError``."""
    with pytest.raises(ldapwire.FilterError):
        ldapwire.compile_filter(text, True)


def test_bad_search_filter_is_a_startup_problem() -> None:
    """A search_filter that does not parse is reported at startup, naming the key."""
    from saslsmtp.options import OptionsError
    with pytest.raises(OptionsError) as info:
        LdapOptions(url=("ldap://a",), search_base="o=x", search_filter="(uid={username})(x=y)")
    assert "search_filter" in str(info.value) and "(x=y)" in str(info.value)


def test_request_timeout_aborts_the_connection() -> None:
    """No answer within ``timeout`` (fake clock): the request fails with ``LdapTimeout``,
    the connection is aborted and the other request on it fails too; later requests
    fail at once.  One timer serves the connection, not one per request."""
    protocol, transport, clock = connected(timeout=2.0)
    failures: list[Failure] = []
    protocol.bind(b"uid=a,dc=x", b"pw").addErrback(failures.append)
    clock.advance(1.0)
    protocol.search(b"\x63\x00").addErrback(failures.append)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1.0)
    assert failures and failures[0].check(LdapTimeout)
    assert transport.disconnecting and protocol.closed
    protocol.connectionLost(Failure(ConnectionDone()))
    assert failures[1].check(LdapConnectionLost)
    assert "timed out" in str(failures[1].value)
    later: list[Failure] = []
    protocol.bind(b"uid=a,dc=x", b"pw").addErrback(later.append)
    assert later[0].check(LdapConnectionLost)


def test_answered_requests_leave_no_timer_behind() -> None:
    """After the answers, the one timer finds nothing pending and is not re-armed."""
    protocol, _, clock = connected(timeout=2.0)
    protocol.bind(b"uid=a,dc=x", b"pw")
    protocol.dataReceived(BIND_OK_1)
    clock.advance(2.0)
    assert clock.getDelayedCalls() == []


def test_notice_of_disconnection_fails_pending_requests() -> None:
    """An unsolicited Notice of Disconnection (message ID 0) closes the connection; the
    pending bind fails naming the server's reason."""
    protocol, transport, _ = connected()
    failures: list[Failure] = []
    protocol.bind(b"uid=a,dc=x", b"pw").addErrback(failures.append)
    notice = ldapwire.tlv(0x78, b"\x0a\x01\x34\x04\x00" + ldapwire.tlv(0x04, b"bye")
                          + ldapwire.tlv(0x8A, ldapwire.NOTICE_OF_DISCONNECTION_OID))
    protocol.dataReceived(ldapwire.message(0, notice))
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert failures[0].check(LdapConnectionLost)
    assert "unavailable bye" in str(failures[0].value)


def test_garbage_from_the_server_closes_the_connection() -> None:
    """Bytes that are not an LDAPMessage abort the connection (no traceback)."""
    protocol, transport, _ = connected()
    failures: list[Failure] = []
    protocol.bind(b"uid=a,dc=x", b"pw").addErrback(failures.append)
    protocol.dataReceived(b"\x04\x03abc")
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert "protocol error" in str(failures[0].value)


# ---- the connection pool -------------------------------------------------------------


class FakeConn:
    """A pooled connection stand-in."""

    def __init__(self, n: int) -> None:
        self.n, self.closed = n, False


def test_pool_bounds_connections_and_serves_waiters_in_order() -> None:
    """``size`` connections at most; further logins wait and get released ones first
    come, first served; one that waited too long fails; a discarded connection is
    replaced by a new one for the next waiter; ``shut`` fails the waiters."""
    now = [0.0]
    made: list[FakeConn] = []
    closed: list[int] = []

    def connect() -> "Deferred[FakeConn]":
        made.append(FakeConn(len(made)))
        return succeed(made[-1])

    pool = ConnectionPool(2, connect, lambda c: closed.append(c.n), clock=lambda: now[0],
                          max_wait=5.0)
    got: list[Any] = []
    for _ in range(4):
        pool.acquire().addBoth(got.append)
    assert [(c.n, reused) for c, reused in got] == [(0, False), (1, False)]
    pool.release(made[0])
    assert got[2] == (made[0], True)
    now[0] = 6.0
    pool.acquire().addBoth(got.append)
    pool.release(made[1])  # the 4th waited 6 s: refused; the 5th gets it
    assert isinstance(got[3], Failure) and got[3].check(PoolWaitTooLong)
    assert got[4] == (made[1], True)
    pool.acquire().addBoth(got.append)
    pool.discard(made[0])
    assert closed == [0] and got[5] == (made[2], False)
    pool.acquire().addBoth(got.append)
    pool.shut()
    assert got[6].check(PoolWaitTooLong)
    pool.release(made[1])
    assert closed == [0, 1]


# ---- the directory with in-memory servers ------------------------------------------


class ScriptedServers:
    """``endpoint_factory`` for ``TwistedDirectory``: each connection is an
    ``LdapProtocol`` on a ``StringTransport``; ``answer(url, bytes)`` feeds the newest
    connection to that server."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.connections: dict[str, list[tuple[LdapProtocol, StringTransport]]] = {}

    def __call__(self, endpoint: Any) -> Any:
        servers = self

        class Endpoint:
            def connect(self, factory: Any) -> "Deferred[Any]":
                protocol = factory.buildProtocol(None)
                transport = StringTransport()
                protocol.makeConnection(transport)
                servers.connections.setdefault(str(endpoint), []).append((protocol, transport))
                return succeed(protocol)
        return Endpoint()

    def answer(self, url: str, data: bytes) -> None:
        self.connections[url][-1][0].dataReceived(data)


def test_busy_server_fails_over_and_goes_last_for_a_while() -> None:
    """A bind answered busy (51) moves on to the next server, which accepts; the busy
    one is tried last for DOWN_SECONDS (fake clock), then first again."""
    from saslsmtp.checkers.ldap import DOWN_SECONDS
    from saslsmtp.credentials import PasswordCredentials
    clock = Clock()
    servers = ScriptedServers(clock)
    options = LdapOptions(url=("ldap://a", "ldap://b"), user_dn=TEMPLATE, timeout=TIMEOUT)
    directory = TwistedDirectory(options, None, endpoint_factory=servers, clock=clock)
    checker = TwistedLdapChecker("t", directory)
    got: list[Any] = []
    checker.requestAvatarId(PasswordCredentials(b"alice", b"pw")).addBoth(got.append)
    servers.answer("ldap://a:389", bind_result(1, 51, b"busy"))
    assert servers.connections["ldap://a:389"][0][0].closed
    servers.answer("ldap://b:389", bind_result(1, 0))
    assert got == [b"alice"]
    a, b = directory.endpoints
    assert list(directory._servers.ordered()) == [b, a]
    clock.advance(DOWN_SECONDS + 0.1)
    assert list(directory._servers.ordered()) == [a, b]
    directory.close()


def test_wrong_password_keeps_the_connection_and_sends_no_password_to_logs(
        captured_log: Any) -> None:
    """invalidCredentials rejects and the (now anonymous) connection goes back to the
    pool for the next login, which re-binds on it: one connection in all."""
    from twisted.cred.error import UnauthorizedLogin
    from saslsmtp.credentials import PasswordCredentials
    clock = Clock()
    servers = ScriptedServers(clock)
    options = LdapOptions(url=("ldap://a",), user_dn=TEMPLATE, timeout=TIMEOUT)
    checker = TwistedLdapChecker("t", TwistedDirectory(options, None, endpoint_factory=servers,
                                                       clock=clock))
    got: list[Any] = []
    checker.requestAvatarId(PasswordCredentials(b"alice", b"s3cret-pw")).addBoth(got.append)
    servers.answer("ldap://a:389", bind_result(1, 49))
    checker.requestAvatarId(PasswordCredentials(b"alice", b"right-pw")).addBoth(got.append)
    servers.answer("ldap://a:389", bind_result(2, 0))
    assert got[0].check(UnauthorizedLogin) and got[1] == b"alice"
    assert len(servers.connections["ldap://a:389"]) == 1
    assert not any("s3cret-pw" in line for line in captured_log.lines)
    checker.stop()
    [(protocol, transport)] = servers.connections["ldap://a:389"]
    assert protocol.closed and transport.value().endswith(b"\x42\x00")  # unbound


@pytest_twisted.ensureDeferred
async def test_connections_kept_open_one_service_connection(
        slapd: SlapdServer, make_checker: Callable[..., TwistedLdapChecker]) -> None:
    """16 concurrent search-then-bind logins with pool_size 4: slapd accepts at most 5
    connections (4 for users, one for the reader), the reader binds once, every search
    runs as the reader, nothing is unbound until the checker stops."""
    checker = make_checker(**search_options(pool_size=4))
    lines = len(slapd.log_text().splitlines())
    results = await gatherResults([ensureDeferred(outcome(checker, u.uid, u.password))
                                   for u in (ALICE, BOB) * 8])
    assert results == ["accept"] * 16
    log = slapd.log_text().splitlines()[lines:]
    # this checker's connections only (an earlier test's checker may unbind late)
    mine = {int(m.group(1)) for m in map(re.compile(r"conn=(\d+) fd=\d+ ACCEPT from").search,
                                          log) if m}
    operations = [o for o in parse_operations(log) if o.conn in mine]
    assert sum(f'dn="{READER_DN}"' in o.text for o in operations if o.kind == "BIND") == 1
    assert all(o.bound_as == READER_DN for o in operations if o.kind == "SRCH")
    assert 2 <= len(mine) <= 5
    assert not [o for o in operations if o.kind == "UNBIND"]
    from twisted.internet import reactor
    checker.stop()

    def unbound() -> list[Any]:
        return [o for o in parse_operations(slapd.log_text().splitlines()[lines:])
                if o.kind == "UNBIND" and o.conn in mine]
    deadline = time.monotonic() + 10
    while len(unbound()) < len(mine):  # slapd logs each UNBIND when it reads it
        assert time.monotonic() < deadline, unbound()
        await deferLater(reactor, 0.02, lambda: None)
    assert len(unbound()) == len(mine)  # stop() says goodbye on every connection


def test_from_config_builds_the_twisted_client_by_default() -> None:
    """``client`` defaults to "twisted": no thread pool is asked for."""
    def no_runner(name: str, threads: int) -> Any:
        raise AssertionError("the Twisted client uses no threads")

    deps = BackendDeps(reactor=Clock(), hash_runner=None, make_runner=no_runner)  # type: ignore
    checker = from_config("dir", LdapOptions(url=("ldap://127.0.0.1",), user_dn=TEMPLATE), deps)
    assert isinstance(checker, TwistedLdapChecker)
    checker.stop()


def test_idle_service_connection_is_replaced() -> None:
    """The service connection serves searches back to back; unused for longer than
    MAX_IDLE_SECONDS it is closed (unbound) and the next search opens a new one."""
    from saslsmtp.checkers.ldappool import MAX_IDLE_SECONDS
    from saslsmtp.credentials import PasswordCredentials
    clock = Clock()
    servers = ScriptedServers(clock)
    options = LdapOptions(url=("ldap://a",), search_base="dc=x", search_filter="(uid={username})",
                          timeout=TIMEOUT, pool_size=1)
    checker = TwistedLdapChecker("t", TwistedDirectory(options, None, endpoint_factory=servers,
                                                       clock=clock))
    entry = ldapwire.tlv(0x64, ldapwire.tlv(0x04, b"uid=alice,dc=x") + ldapwire.tlv(0x30, b""))
    done = ldapwire.tlv(0x65, b"\x0a\x01\x00\x04\x00\x04\x00")
    got: list[Any] = []

    def login(search_id: int, bind_id: int) -> None:
        """One login: the search answered on the service connection (the first one
        made), the bind on the user connection (the second)."""
        checker.requestAvatarId(PasswordCredentials(b"alice", b"pw")).addBoth(got.append)
        service = servers.connections["ldap://a:389"][0]
        service[0].dataReceived(ldapwire.message(search_id, entry)
                                + ldapwire.message(search_id, done))
        user = servers.connections["ldap://a:389"][1]
        user[0].dataReceived(bind_result(bind_id, 0))

    login(1, 1)
    clock.advance(MAX_IDLE_SECONDS - 1)
    login(2, 2)
    assert got == [b"alice", b"alice"] and len(servers.connections["ldap://a:389"]) == 2
    clock.advance(MAX_IDLE_SECONDS + 1)
    first_service = servers.connections["ldap://a:389"][0]
    checker.requestAvatarId(PasswordCredentials(b"alice", b"pw")).addBoth(got.append)
    assert first_service[0].closed and first_service[1].value().endswith(b"\x42\x00")
    assert len(servers.connections["ldap://a:389"]) == 3
    checker.stop()


@pytest_twisted.ensureDeferred
async def test_real_connections_have_tcp_nodelay(
        slapd: SlapdServer, make_checker: Callable[..., TwistedLdapChecker]) -> None:
    """Against slapd, plain and ldaps://: the pooled connections have TCP_NODELAY set
    (a login is a few dozen bytes each way; Nagle would hold them back)."""
    import socket
    for options in ({}, {"url": (slapd.tls_url,), "ca_file": str(slapd.ca_file)}):
        checker = make_checker(**options)
        assert await outcome(checker, "alice", ALICE.password) == "accept"
        [pool] = checker.directory._user_pools.values()
        [idle] = pool._idle
        transport = idle.conn.transport
        while type(transport).__module__ != "twisted.internet.tcp":  # under TLS: TCP's
            transport = transport.transport
        sock = transport.getHandle()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_pool_size_defaults_to_sixteen_user_connections_per_server() -> None:
    """Without ``pool_size`` every server gets 16 user connections whatever ``threads``
    says (threads are ldap3's); a set ``pool_size`` is taken as it is."""
    from twisted.internet.testing import MemoryReactorClock
    urls = ("ldap://127.0.0.1:1", "ldap://127.0.0.1:2")
    default = TwistedDirectory(LdapOptions(url=urls, user_dn=TEMPLATE, threads=2),
                               MemoryReactorClock())
    assert [p.size for p in default._user_pools.values()] == [16, 16]
    chosen = TwistedDirectory(LdapOptions(url=urls[:1], user_dn=TEMPLATE, pool_size=3),
                              MemoryReactorClock())
    assert [p.size for p in chosen._user_pools.values()] == [3]
