"""The ``dovecot`` backend: Dovecot's auth client protocol.

Two halves:

* unit tests with a scripted server over ``StringTransport`` and a ``Clock``: exact bytes
  of the handshake and AUTH lines, Dovecot 2.3 and 2.4 handshake timing, OK/FAIL/CONT,
  ``code=temp_fail``, escaping, multiplexing by id, timeouts, lost connections;
* integration tests against a real Dovecot 2.3 (``tests/dovecot.py``), over its UNIX socket
  and over TCP: right/wrong/unknown, down, back up, hung, many checks on one connection.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from saslsmtp.checkers.dovecot import (
    DovecotAuthClientProtocol,
    DovecotChecker,
    endpoint_description,
    from_config,
    tab_escape,
    tab_unescape,
)
from saslsmtp.checkers.registry import BackendDeps
from saslsmtp.config import ConfigError, DovecotBackendConfig, parse_config
from saslsmtp.credentials import PasswordCredentials
from saslsmtp.errors import TemporaryFailure
from saslsmtp.sasl.outcome import Session
from tests.dovecot import (HASHED_USER, PLAIN_USER, DovecotServer, require_dovecot,
                           running_dovecot)

PID = 4242
CLIENT_HELLO = b"VERSION\t1\t2\nCPID\t4242\n"
# what Dovecot 2.3.19 sends on connect (captured from the test instance)
SERVER_HANDSHAKE_23 = (b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\n"
                       b"SPID\t9553\nCUID\t1\nCOOKIE\t12fc83ccafc04ab9683b6d2b9904556d\nDONE\n")
# Dovecot 2.4: VERSION at once, the rest only after the client's VERSION (Dovecot's auth protocol)
SERVER_VERSION_24 = b"VERSION\t1\t3\n"
SERVER_REST_24 = (b"MECH\tPLAIN\tplaintext\nMECH\tSCRAM-SHA-256-PLUS\tmutual-auth\tchannel-binding\n"
                  b"SPID\t77\nCUID\t5\nCOOKIE\t0123456789abcdef0123456789abcdef\nDONE\n")
# Dovecot's auth protocol: PLAIN for user "u", password "p"
SESSION = Session(remote_ip="192.0.2.10", local_ip="198.51.100.1", tls=True)
AUTH_U_P = (b"AUTH\t1\tPLAIN\tservice=smtp\tnologin\tlip=198.51.100.1\trip=192.0.2.10"
            b"\tsecured\tresp=AHUAcA==\n")


# --------------------------------------------------------------------------
# In-memory plumbing
# --------------------------------------------------------------------------


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connects each protocol to a fresh in-memory transport, or fails like a dead socket."""

    def __init__(self) -> None:
        self.transports: list[StringTransportWithDisconnection] = []
        self.refuse = False
        self.hold = False  # leave the connect pending (a socket that never answers)
        self.pending: list[Deferred] = []

    def connect(self, factory: Any) -> Deferred:
        if self.refuse:
            return fail(ConnectionRefusedError("refused"))
        if self.hold:
            d: Deferred = Deferred()
            self.pending.append(d)
            return d
        protocol = factory.buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return succeed(protocol)

    @property
    def transport(self) -> StringTransportWithDisconnection:
        """The latest connection."""
        return self.transports[-1]

    def server_says(self, data: bytes) -> None:
        """Feed bytes from the fake server into the latest connection."""
        self.transport.protocol.dataReceived(data)

    def client_said(self) -> bytes:
        """What the client wrote on the latest connection since the last call."""
        value = self.transport.value()
        self.transport.clear()
        return value


def make_checker(timeout: float = 5.0, **kwargs: Any) -> tuple[DovecotChecker, FakeEndpoint, Clock]:
    """A checker over a fake endpoint and a Clock."""
    clock, endpoint = Clock(), FakeEndpoint()
    checker = DovecotChecker(reactor=clock, endpoint=endpoint, timeout=timeout, pid=PID,
                             **kwargs)
    return checker, endpoint, clock


def creds(user: bytes = b"u", password: bytes = b"p", session: Session = SESSION) -> PasswordCredentials:
    """PLAIN credentials with the test session."""
    return PasswordCredentials(user, password, session)


def outcome(d: Deferred) -> Any:
    """The result of a fired Deferred: a value or the exception instance (consumed)."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    result = box[0]
    return result.value if hasattr(result, "value") and hasattr(result, "trap") else result


def ready(endpoint: FakeEndpoint) -> None:
    """Answer the handshake of the latest connection and forget the client's hello."""
    assert endpoint.client_said() == CLIENT_HELLO
    endpoint.server_says(SERVER_HANDSHAKE_23)


# --------------------------------------------------------------------------
# Escaping
# --------------------------------------------------------------------------

ESCAPE_VECTORS = [
    (b"plain", b"plain"),
    (b"a\tb", b"a\x01tb"),
    (b"a\nb\rc", b"a\x01nb\x01rc"),
    (b"nul\x00", b"nul\x010"),
    (b"\x01", b"\x011"),
    (b"\x01t", b"\x011t"),  # the escape character itself, then a letter: not a TAB
]


@pytest.mark.parametrize("raw,escaped", ESCAPE_VECTORS)
def test_tab_escape_vectors(raw: bytes, escaped: bytes) -> None:
    """TAB, LF, CR, NUL and \\001 are escaped as Dovecot's str_tabescape does, reversibly."""
    assert tab_escape(raw) == escaped
    assert tab_unescape(escaped) == raw


def test_escaped_parameters_in_auth_and_user_in_ok() -> None:
    """A parameter value with a TAB is escaped on the AUTH line; user= in OK is unescaped."""
    checker, endpoint, _ = make_checker(service="sm\ttp")
    d = checker.requestAvatarId(creds())
    ready(endpoint)
    assert endpoint.client_said().split(b"\t")[3] == b"service=sm\x01ttp"
    endpoint.server_says(b"OK\t1\tuser=we\x01tird\x01nname\n")
    assert outcome(d) == b"we\tird\nname"


# --------------------------------------------------------------------------
# Handshake
# --------------------------------------------------------------------------


def _protocol() -> tuple[DovecotAuthClientProtocol, StringTransportWithDisconnection]:
    protocol = DovecotAuthClientProtocol(PID)
    transport = StringTransportWithDisconnection()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    return protocol, transport


def test_client_speaks_first_without_waiting() -> None:
    """VERSION and CPID go out on connect, before the server has said anything."""
    protocol, transport = _protocol()
    assert transport.value() == CLIENT_HELLO
    assert not protocol.handshake.called


def test_handshake_dovecot_23_all_at_once() -> None:
    """Dovecot 2.3 sends the whole handshake in one go; DONE completes it."""
    protocol, _ = _protocol()
    protocol.dataReceived(SERVER_HANDSHAKE_23)
    server = outcome(protocol.handshake)
    assert server.version == (1, 2)
    assert dict(server.mechanisms) == {"PLAIN": ("plaintext",), "LOGIN": ("plaintext",)}
    assert (server.spid, server.cuid, server.cookie) == ("9553", "1",
                                                         "12fc83ccafc04ab9683b6d2b9904556d")
    assert protocol.usable


def test_handshake_dovecot_24_after_client_version() -> None:
    """Dovecot 2.4 sends only VERSION until it has ours; the handshake waits for DONE."""
    protocol, transport = _protocol()
    protocol.dataReceived(SERVER_VERSION_24)
    assert not protocol.handshake.called and not protocol.usable
    assert transport.value() == CLIENT_HELLO  # already sent: no deadlock as with old Exim
    protocol.dataReceived(SERVER_REST_24)
    server = outcome(protocol.handshake)
    assert server.version == (1, 3)
    assert server.mechanisms["SCRAM-SHA-256-PLUS"] == ("mutual-auth", "channel-binding")


def test_handshake_split_across_reads_and_unknown_lines() -> None:
    """Lines may arrive byte by byte; unknown handshake lines are ignored."""
    protocol, _ = _protocol()
    data = SERVER_HANDSHAKE_23.replace(b"DONE\n", b"FUTURE\tthing\nDONE\n")
    for i in range(len(data)):
        protocol.dataReceived(data[i:i + 1])
    assert outcome(protocol.handshake).spid == "9553"


def test_handshake_wrong_major_version() -> None:
    """Only major version 1 is spoken: anything else fails the handshake and hangs up."""
    protocol, transport = _protocol()
    protocol.dataReceived(b"VERSION\t2\t0\n")
    error = outcome(protocol.handshake)
    assert isinstance(error, TemporaryFailure) and "version 2" in str(error)
    assert not transport.connected


def test_handshake_auth_master_socket_is_recognised() -> None:
    """SPID before any MECH is Dovecot's auth-master/userdb socket, not auth-client."""
    protocol, transport = _protocol()
    protocol.dataReceived(b"VERSION\t1\t1\nSPID\t123\n")
    error = outcome(protocol.handshake)
    assert isinstance(error, TemporaryFailure) and "auth-master" in str(error)
    assert not transport.connected


def test_connection_lost_during_handshake() -> None:
    """A socket closed before DONE fails the handshake temporarily."""
    protocol, transport = _protocol()
    protocol.dataReceived(b"VERSION\t1\t2\nMECH\tPLAIN\n")
    transport.loseConnection()
    assert isinstance(outcome(protocol.handshake), TemporaryFailure)


def test_overlong_line_drops_the_connection() -> None:
    """A line over 16384 bytes is a protocol error."""
    protocol, transport = _protocol()
    protocol.dataReceived(b"VERSION\t1\t2\nMECH\t" + b"X" * 17000 + b"\n")
    assert isinstance(outcome(protocol.handshake), TemporaryFailure)
    assert not transport.connected


# --------------------------------------------------------------------------
# Requests through the checker
# --------------------------------------------------------------------------


def test_auth_line_matches_the_specs_transcript() -> None:
    """AUTH carries service, nologin, lip, rip, secured and resp= last (Dovecot's auth protocol)."""
    checker, endpoint, clock = make_checker()
    d = checker.requestAvatarId(creds())
    assert not d.called
    ready(endpoint)
    assert endpoint.client_said() == AUTH_U_P
    endpoint.server_says(b"OK\t1\tuser=u\n")
    assert outcome(d) == b"u"
    assert clock.getDelayedCalls() == []  # the request's and the connection's timers are gone


def test_no_secured_without_tls_and_no_empty_ips() -> None:
    """Without TLS there is no ``secured``; unknown IPs are left out rather than sent empty."""
    checker, endpoint, _ = make_checker()
    checker.requestAvatarId(creds(session=Session(remote_ip="192.0.2.7")))
    ready(endpoint)
    assert endpoint.client_said() == (b"AUTH\t1\tPLAIN\tservice=smtp\tnologin\trip=192.0.2.7"
                                      b"\tresp=AHUAcA==\n")


def test_ok_user_is_the_identity_else_the_login_name() -> None:
    """Dovecot's user= (e.g. lower-cased) is the identity; without it, the login name."""
    checker, endpoint, _ = make_checker()
    d1 = checker.requestAvatarId(creds(b"U@Example.Test"))
    ready(endpoint)
    d2 = checker.requestAvatarId(creds(b"V"))
    endpoint.server_says(b"OK\t1\tuser=u@example.test\tother=x\nOK\t2\n")
    assert outcome(d1) == b"u@example.test"
    assert outcome(d2) == b"V"


@pytest.mark.parametrize("line,expected", [
    (b"FAIL\t1\tuser=u\n", UnauthorizedLogin),
    (b"FAIL\t1\tuser=u\tcode=authz_fail\treason=nope\n", UnauthorizedLogin),
    (b"FAIL\t1\tcode=user_disabled\n", UnauthorizedLogin),
    (b"FAIL\t1\tuser=u\tcode=temp_fail\treason=db down\n", TemporaryFailure),
    (b"FAIL\t1\tuser=u\ttemp\n", TemporaryFailure),
    (b"FAIL\t1\tcode=invalid_base64\n", TemporaryFailure),
])
def test_fail_lines(line: bytes, expected: type) -> None:
    """FAIL rejects; FAIL with code=temp_fail (or the old ``temp`` flag) is temporary."""
    checker, endpoint, _ = make_checker()
    d = checker.requestAvatarId(creds())
    ready(endpoint)
    endpoint.client_said()
    endpoint.server_says(line)
    assert type(outcome(d)) is expected


def test_concurrent_requests_multiplexed_out_of_order() -> None:
    """Ids count from 1 on one connection; answers are matched by id, in any order."""
    checker, endpoint, _ = make_checker()
    ds = [checker.requestAvatarId(creds(b"user%d" % i)) for i in range(1, 4)]
    ready(endpoint)
    lines = endpoint.client_said().splitlines()
    assert [line.split(b"\t")[1] for line in lines] == [b"1", b"2", b"3"]
    endpoint.server_says(b"FAIL\t3\nOK\t1\tuser=user1\nFAIL\t2\tcode=temp_fail\n")
    assert outcome(ds[0]) == b"user1"
    assert isinstance(outcome(ds[1]), TemporaryFailure)
    assert isinstance(outcome(ds[2]), UnauthorizedLogin)
    assert len(endpoint.transports) == 1


def test_cont_without_initial_response_sends_the_data() -> None:
    """Without resp=, the server's empty CONT is answered with the data (protocol level)."""
    protocol, transport = _protocol()
    protocol.dataReceived(SERVER_HANDSHAKE_23)
    transport.clear()
    d = protocol.authenticate("PLAIN", [("service", "smtp")], b"\0u\0p", initial=False)
    assert transport.value() == b"AUTH\t1\tPLAIN\tservice=smtp\n"
    transport.clear()
    protocol.dataReceived(b"CONT\t1\t\n")
    assert transport.value() == b"CONT\t1\tAHUAcA==\n"
    protocol.dataReceived(b"OK\t1\tuser=u\n")
    assert outcome(d).ok


def test_unexpected_cont_cancels_the_request_and_keeps_the_connection() -> None:
    """PLAIN with resp= needs no CONT: the request is cancelled (454), the connection lives."""
    checker, endpoint, _ = make_checker()
    d = checker.requestAvatarId(creds())
    ready(endpoint)
    endpoint.client_said()
    endpoint.server_says(b"CONT\t1\tc29tZXRoaW5n\n")
    assert endpoint.client_said() == b"CANCEL\t1\n"
    assert isinstance(outcome(d), TemporaryFailure)
    d2 = checker.requestAvatarId(creds())
    assert endpoint.client_said().startswith(b"AUTH\t2\t")
    endpoint.server_says(b"OK\t2\n")
    assert outcome(d2) == b"u"
    assert len(endpoint.transports) == 1


def test_answers_for_unknown_ids_are_ignored() -> None:
    """A late answer to a cancelled request does not disturb the others."""
    checker, endpoint, _ = make_checker()
    d = checker.requestAvatarId(creds())
    ready(endpoint)
    endpoint.server_says(b"OK\t99\tuser=x\nOK\t1\n")
    assert outcome(d) == b"u"


def test_nul_in_credentials_is_rejected_without_asking() -> None:
    """A NUL cannot be sent inside PLAIN, so such credentials are wrong; no connection."""
    checker, endpoint, _ = make_checker()
    assert isinstance(outcome(checker.requestAvatarId(creds(b"u\0x"))), UnauthorizedLogin)
    assert endpoint.transports == []


# --------------------------------------------------------------------------
# Connection management
# --------------------------------------------------------------------------


def test_requests_wait_for_the_handshake_on_one_connection() -> None:
    """Requests made before DONE wait for it; only one connection is opened."""
    checker, endpoint, _ = make_checker()
    d1, d2 = checker.requestAvatarId(creds()), checker.requestAvatarId(creds(b"v"))
    assert endpoint.client_said() == CLIENT_HELLO
    endpoint.server_says(SERVER_VERSION_24)
    assert endpoint.client_said() == b""
    endpoint.server_says(SERVER_REST_24)
    assert len(endpoint.client_said().splitlines()) == 2
    endpoint.server_says(b"OK\t1\nOK\t2\n")
    assert (outcome(d1), outcome(d2)) == (b"u", b"v")
    assert len(endpoint.transports) == 1


def test_lost_connection_fails_pending_and_reconnects_lazily() -> None:
    """A dead socket fails every pending request temporarily; the next one reconnects."""
    checker, endpoint, _ = make_checker()
    ds = [checker.requestAvatarId(creds()) for _ in range(3)]
    ready(endpoint)
    endpoint.transport.loseConnection()
    assert all(isinstance(outcome(d), TemporaryFailure) for d in ds)
    assert len(endpoint.transports) == 1  # nothing until the next request
    d = checker.requestAvatarId(creds())
    assert len(endpoint.transports) == 2
    ready(endpoint)
    assert endpoint.client_said().startswith(b"AUTH\t1\t")  # ids restart per connection
    endpoint.server_says(b"OK\t1\n")
    assert outcome(d) == b"u"


def test_refused_connection_is_temporary_and_retried() -> None:
    """A refused connection fails the waiting requests; the next request tries again."""
    checker, endpoint, _ = make_checker()
    endpoint.refuse = True
    error = outcome(checker.requestAvatarId(creds()))
    assert isinstance(error, TemporaryFailure) and "unavailable" in str(error)
    endpoint.refuse = False
    d = checker.requestAvatarId(creds())
    ready(endpoint)
    endpoint.server_says(b"OK\t1\n")
    assert outcome(d) == b"u"
    assert checker.connection_attempts == 2


def test_missing_plain_mechanism_is_temporary() -> None:
    """A Dovecot without PLAIN in auth_mechanisms cannot be used: 454, and say why."""
    checker, endpoint, _ = make_checker()
    d = checker.requestAvatarId(creds())
    endpoint.server_says(b"VERSION\t1\t2\nMECH\tLOGIN\tplaintext\nSPID\t1\nCUID\t1\n"
                         b"COOKIE\tx\nDONE\n")
    error = outcome(d)
    assert isinstance(error, TemporaryFailure) and "PLAIN" in str(error)
    assert not endpoint.transport.connected


def test_timeout_cancels_that_request_alone_and_keeps_the_connection() -> None:
    """No answer within timeout: 454 and CANCEL for that request; the others in flight on
    the silent connection keep it and get their (late) answers."""
    checker, endpoint, clock = make_checker(timeout=2.0)
    slow = checker.requestAvatarId(creds())
    ready(endpoint)
    endpoint.client_said()
    clock.advance(1.0)
    other = checker.requestAvatarId(creds(b"v", b"q", Session(remote_ip="192.0.2.11")))
    endpoint.client_said()
    clock.advance(1.0)
    error = outcome(slow)
    assert isinstance(error, TemporaryFailure) and "within 2s" in str(error)
    assert endpoint.client_said() == b"CANCEL\t1\n"
    assert endpoint.transport.connected
    endpoint.server_says(b"FAIL\t1\nOK\t2\tuser=v\n")  # the cancelled answer is ignored
    assert outcome(other) == b"v"
    assert endpoint.transport.connected and len(endpoint.transports) == 1


def test_server_silent_for_hung_after_is_dropped() -> None:
    """A server that owes answers and says nothing for ``hung_after`` is hung: the request
    that times out then drops the connection, and the next check opens a new one."""
    checker, endpoint, clock = make_checker(timeout=2.0, hung_after=3.0)
    first = checker.requestAvatarId(creds())
    ready(endpoint)
    endpoint.client_said()
    clock.advance(1.5)
    second = checker.requestAvatarId(creds())
    clock.advance(0.5)
    assert isinstance(outcome(first), TemporaryFailure)
    assert endpoint.transport.connected  # silent for 2 s only
    clock.advance(1.5)
    assert isinstance(outcome(second), TemporaryFailure)
    assert not endpoint.transport.connected  # silent for 3.5 s with answers owed
    third = checker.requestAvatarId(creds())
    assert len(endpoint.transports) == 2
    ready(endpoint)
    endpoint.client_said()
    endpoint.server_says(b"OK\t1\tuser=u\n")
    assert outcome(third) == b"u"


def test_an_address_that_failed_gets_time_for_dovecots_penalty() -> None:
    """After a FAIL for an address, Dovecot delays its next answers by up to 15 s plus its
    failure delay: that address's checks may take timeout + 17 s and end in 535, not 454;
    other addresses keep the plain timeout."""
    checker, endpoint, clock = make_checker(timeout=5.0)
    first = checker.requestAvatarId(creds())
    ready(endpoint)
    endpoint.client_said()
    endpoint.server_says(b"FAIL\t1\tuser=u\n")
    assert isinstance(outcome(first), UnauthorizedLogin)
    assert checker.time_limit("192.0.2.10") == 5.0 + 17.0
    assert checker.time_limit("192.0.2.99") == 5.0
    penalized = checker.requestAvatarId(creds())
    endpoint.client_said()
    clock.advance(20.0)
    assert not penalized.called
    endpoint.server_says(b"FAIL\t2\tuser=u\n")
    assert isinstance(outcome(penalized), UnauthorizedLogin)
    assert endpoint.transport.connected and len(endpoint.transports) == 1
    clock.advance(3601.0)
    assert checker.time_limit("192.0.2.10") == 5.0  # forgotten after an hour


def test_ok_user_is_canonical_not_original_user() -> None:
    """``OK user=henry original_user=HENRY``: the identity is ``henry``."""
    checker, endpoint, _ = make_checker()
    d = checker.requestAvatarId(creds(b"HENRY"))
    ready(endpoint)
    endpoint.server_says(b"OK\t1\tuser=henry\toriginal_user=HENRY\n")
    assert outcome(d) == b"henry"


def test_timeout_keeps_a_connection_that_is_still_talking() -> None:
    """A timed-out request on a server that answered others meanwhile keeps the connection."""
    checker, endpoint, clock = make_checker(timeout=2.0)
    slow = checker.requestAvatarId(creds())
    ready(endpoint)
    clock.advance(1.0)
    quick = checker.requestAvatarId(creds())
    endpoint.client_said()
    endpoint.server_says(b"OK\t2\n")
    clock.advance(1.1)
    assert isinstance(outcome(slow), TemporaryFailure)
    assert outcome(quick) == b"u"
    assert endpoint.client_said() == b"CANCEL\t1\n"
    assert endpoint.transport.connected


def test_handshake_that_never_completes_times_out() -> None:
    """A server that accepts but never says DONE: 454 within timeout, connection dropped."""
    checker, endpoint, clock = make_checker(timeout=1.0)
    d = checker.requestAvatarId(creds())
    endpoint.server_says(b"VERSION\t1\t2\n")
    clock.advance(1.0)
    assert isinstance(outcome(d), TemporaryFailure)
    assert not endpoint.transport.connected
    assert clock.getDelayedCalls() == []


def test_connect_that_never_completes_times_out() -> None:
    """A connect that hangs is cancelled at timeout; the request fails temporarily."""
    checker, endpoint, clock = make_checker(timeout=1.0)
    endpoint.hold = True
    d = checker.requestAvatarId(creds())
    clock.advance(1.0)
    assert isinstance(outcome(d), TemporaryFailure)
    assert endpoint.pending[0].called  # cancelled
    assert clock.getDelayedCalls() == []


def test_stop_drops_the_connection() -> None:
    """stop() hangs up; pending requests fail temporarily."""
    checker, endpoint, _ = make_checker()
    d = checker.requestAvatarId(creds())
    ready(endpoint)
    checker.stop()
    assert isinstance(outcome(d), TemporaryFailure)
    assert not endpoint.transport.connected


def test_password_never_logged_nor_in_errors() -> None:
    """Neither the password nor its base64 reaches a log event, an error or a repr."""
    secret = b"s3cret-Pa55"
    b64 = base64.b64encode(b"\0u\0" + secret)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        checker, endpoint, clock = make_checker(timeout=1.0)
        results = [checker.requestAvatarId(creds(password=secret)) for _ in range(3)]
        ready(endpoint)
        endpoint.server_says(b"FAIL\t1\nCONT\t2\tx\n")
        clock.advance(1.0)
        endpoint.transport.loseConnection()
        endpoint.refuse = True
        results.append(checker.requestAvatarId(creds(password=secret)))
    finally:
        globalLogPublisher.removeObserver(events.append)
    texts = [repr(checker)] + [repr(e) + str(e) for e in events]
    errors = [outcome(d) for d in results]
    assert all(isinstance(e, Exception) for e in errors), errors
    texts += [repr(e) + str(e) for e in errors]
    assert events, "expected some log events"
    for text in texts:
        assert secret.decode() not in text and b64.decode() not in text


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@pytest.mark.parametrize("socket,expected", [
    ("/run/dovecot/auth-client", "unix:path=/run/dovecot/auth-client:timeout=5"),
    ("unix:/var/spool/postfix/private/auth", "unix:path=/var/spool/postfix/private/auth:timeout=5"),
    ("tcp:127.0.0.1:12345", "tcp:host=127.0.0.1:port=12345:timeout=5"),
    ("tcp:[::1]:12345", "tcp:host=\\:\\:1:port=12345:timeout=5"),
    ("tcp:auth.example.test:12345", "tcp:host=auth.example.test:port=12345:timeout=5"),
])
def test_endpoint_description(socket: str, expected: str) -> None:
    """``socket`` is a UNIX path or tcp:HOST:PORT, turned into a Twisted endpoint string."""
    assert endpoint_description(socket, 4.5) == expected


MALFORMED_SOCKETS = ["tcp:127.0.0.1", "tcp:host:0", "tcp::12345", "tcp:h:99999", "tcp::1:25",
                     "tcp:h:25x"]


@pytest.mark.parametrize("socket", MALFORMED_SOCKETS + ["unix:"])
def test_endpoint_description_rejects_malformed(socket: str) -> None:
    """Malformed socket values are refused with a message naming them."""
    with pytest.raises(ValueError, match="socket|tcp:HOST:PORT|path"):
        endpoint_description(socket, 5.0)


CONFIG = """\
[auth]
backends = ["dovecot"]
[backends.dovecot]
type = "dovecot"
socket = "{socket}"
"""


@pytest.mark.parametrize("socket", MALFORMED_SOCKETS)
def test_config_rejects_malformed_tcp_socket(socket: str) -> None:
    """``--check`` already names a malformed tcp: socket, with its key and line."""
    with pytest.raises(ConfigError) as info:
        parse_config(CONFIG.format(socket=socket), "/etc/saslsmtp/saslsmtp.toml")
    assert "/etc/saslsmtp/saslsmtp.toml:5: backends.dovecot.socket:" in str(info.value)


@pytest.mark.parametrize("socket,expected", [
    ("auth-client", "/etc/saslsmtp/auth-client"),
    ("/run/dovecot/auth-client", "/run/dovecot/auth-client"),
    ("tcp:127.0.0.1:12345", "tcp:127.0.0.1:12345"),
    ("tcp:[::1]:12345", "tcp:[::1]:12345"),
])
def test_config_socket_forms(socket: str, expected: str) -> None:
    """A relative socket path is relative to the config file; tcp: values stay as given."""
    config = parse_config(CONFIG.format(socket=socket), "/etc/saslsmtp/saslsmtp.toml")
    options = config.backends["dovecot"].options
    assert (options.socket, options.timeout, options.service) == (expected, 5.0, "smtp")


# --------------------------------------------------------------------------
# Against a real Dovecot
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dovecot():
    """One real Dovecot for the module (tests that stop or pause it use their own)."""
    yield from running_dovecot()


@pytest.fixture
def own_dovecot():
    """A real Dovecot for one test that stops, restarts or pauses it."""
    yield from running_dovecot()


def real_checker(server: DovecotServer, transport: str, timeout: float = 5.0) -> DovecotChecker:
    """A checker built by ``from_config`` exactly as the daemon builds it."""
    from twisted.internet import reactor

    socket = server.unix_socket if transport == "unix" else server.tcp
    deps = BackendDeps(reactor=reactor, hash_runner=None, make_runner=None)  # type: ignore[arg-type]
    return from_config("dovecot", DovecotBackendConfig(socket=socket, timeout=timeout), deps)


@implementer(IStreamClientEndpoint)
class CountingEndpoint:
    """Wraps a real endpoint and counts the connections made through it."""

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self.inner = inner
        self.connections = 0

    def connect(self, factory: Any) -> Deferred:
        self.connections += 1
        return self.inner.connect(factory)


async def check(checker: DovecotChecker, user: str, password: str, rip: str = "127.0.0.1") -> Any:
    """The avatar id, or the exception the check failed with."""
    try:
        return await checker.requestAvatarId(creds(user.encode(), password.encode(),
                                                   Session(remote_ip=rip,
                                                           local_ip="127.0.0.1")))
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return e


TRANSPORTS = ["unix", "tcp"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_real_right_wrong_unknown(dovecot: DovecotServer, transport: str) -> None:
    """{PLAIN} and hashed users accept; a wrong password and an unknown user reject."""
    checker = real_checker(dovecot, transport)
    try:
        assert await check(checker, *PLAIN_USER) == b"alice"
        assert await check(checker, *HASHED_USER) == b"bob"
        wrong = await check(checker, PLAIN_USER[0], "not it")
        unknown = await check(checker, "mallory", "whatever")
        for error in (wrong, unknown):
            assert isinstance(error, UnauthorizedLogin), error
            assert not isinstance(error, TemporaryFailure)
        assert checker.connection_attempts == 1
    finally:
        checker.stop()


@pytest_twisted.ensureDeferred
async def test_real_user_is_canonicalised_by_dovecot(dovecot: DovecotServer) -> None:
    """Dovecot lower-cases the login (auth_username_format=%Lu); its user= is the identity."""
    checker = real_checker(dovecot, "unix")
    try:
        assert await check(checker, "ALICE", PLAIN_USER[1]) == b"alice"
    finally:
        checker.stop()


@pytest.mark.alone
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_real_many_concurrent_checks_share_one_connection(dovecot: DovecotServer,
                                                                transport: str) -> None:
    """60 concurrent checks (half wrong) run over a single connection, in parallel."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import clientFromString

    socket = dovecot.unix_socket if transport == "unix" else dovecot.tcp
    endpoint = CountingEndpoint(clientFromString(reactor, endpoint_description(socket, 5.0)))
    checker = DovecotChecker(reactor=reactor, endpoint=endpoint, timeout=5.0)
    try:
        started = time.monotonic()
        results = await gatherResults([
            Deferred.fromCoroutine(check(checker, *(PLAIN_USER if i % 2 else
                                                    (PLAIN_USER[0], f"wrong{i}"))))
            for i in range(60)])
        elapsed = time.monotonic() - started
        for i, result in enumerate(results):
            if i % 2:
                assert result == b"alice"
            else:
                assert isinstance(result, UnauthorizedLogin), result
        assert endpoint.connections == 1
        # 30 FAILs answered one after another would take 30 x 0.5 s
        assert elapsed < 3.0, elapsed
    finally:
        checker.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_real_down_then_back(own_dovecot: DovecotServer, transport: str) -> None:
    """Dovecot stopped: temporary failure; started again: the same checker accepts."""
    from twisted.internet import reactor

    checker = real_checker(own_dovecot, transport, timeout=2.0)
    try:
        assert await check(checker, *PLAIN_USER) == b"alice"
        protocol = checker._protocol
        assert protocol is not None and protocol.usable
        own_dovecot.stop()
        deadline = time.monotonic() + 10
        while protocol.usable:  # else the next check would go out on the dead connection
            assert time.monotonic() < deadline, "the checker never saw Dovecot close"
            await deferLater(reactor, 0.01)
        error = await check(checker, *PLAIN_USER)
        assert isinstance(error, TemporaryFailure), error
        own_dovecot.start()
        assert await check(checker, *PLAIN_USER) == b"alice"
        assert checker.connection_attempts == 3
    finally:
        checker.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest_twisted.ensureDeferred
async def test_real_hung_server_times_out(own_dovecot: DovecotServer, transport: str) -> None:
    """A SIGSTOPped Dovecot: 454 after ``timeout`` (not before, not much later); then back."""
    timeout = 1.0
    checker = real_checker(own_dovecot, transport, timeout=timeout)
    try:
        assert await check(checker, *PLAIN_USER) == b"alice"
        own_dovecot.pause()
        timings = []
        for _ in range(2):  # both on the open connection (one slow answer is not a hang)
            started = time.monotonic()
            error = await check(checker, *PLAIN_USER)
            timings.append(time.monotonic() - started)
            assert isinstance(error, TemporaryFailure), error
        assert all(timeout * 0.95 <= t < timeout + 0.5 for t in timings), timings
        own_dovecot.resume()
        assert await check(checker, *PLAIN_USER) == b"alice"
    finally:
        own_dovecot.resume()
        checker.stop()


@pytest.fixture
def stock_dovecot():
    """A real Dovecot with its stock auth penalty and ``auth_failure_delay = 2 secs``."""
    require_dovecot()
    server = DovecotServer(stock_penalty=True)
    server.start()
    yield server
    server.cleanup()


@pytest_twisted.ensureDeferred
async def test_real_penalty_gives_535_and_keeps_the_connection(stock_dovecot: DovecotServer) -> None:
    """Stock Dovecot: the second wrong password from one address is answered after its
    penalty (~6 s, past ``timeout``) with 535, not 454; a check from another address that
    was in flight while the penalized one waited gets its own answer on the same
    connection, which is never dropped."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import clientFromString

    endpoint = CountingEndpoint(clientFromString(
        reactor, endpoint_description(stock_dovecot.unix_socket, 3.0)))
    checker = DovecotChecker(reactor=reactor, endpoint=endpoint, timeout=3.0)
    try:
        assert isinstance(await check(checker, PLAIN_USER[0], "wrong 1"), UnauthorizedLogin)
        started = time.monotonic()
        penalized = Deferred.fromCoroutine(check(checker, PLAIN_USER[0], "wrong 2"))
        await deferLater(reactor, 2.0)
        # in flight across the penalized check's old deadline (3 s), answered at ~4 s
        other = Deferred.fromCoroutine(check(checker, HASHED_USER[0], "wrong", rip="127.0.0.2"))
        other_result = await other
        assert isinstance(other_result, UnauthorizedLogin), other_result
        result = await penalized
        elapsed = time.monotonic() - started
        assert isinstance(result, UnauthorizedLogin) and not isinstance(result, TemporaryFailure), result
        assert elapsed > 3.0, elapsed  # Dovecot really penalized it beyond timeout
        assert await check(checker, *PLAIN_USER, rip="127.0.0.3") == b"alice"
        assert endpoint.connections == 1
    finally:
        checker.stop()


@pytest_twisted.ensureDeferred
async def test_a_socket_that_is_not_dovecot_warns_once_with_its_bytes_escaped() -> None:
    """``socket`` names a port that greets with something else (a terminal escape, then
    an SMTP greeting): every check fails temporarily, the log has one warning for the
    outage, naming the line with its control bytes escaped, then the recovery when a real
    server answers again; before, each login logged the raw bytes at error level and a
    warning of its own."""
    from twisted.internet import protocol, reactor

    class Impostor(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"\x1b]0;owned\x07220 mx.example ESMTP\r\n")

    class Honest(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(SERVER_HANDSHAKE_23)

        def dataReceived(self, data: bytes) -> None:
            for line in data.split(b"\n"):
                if line.startswith(b"AUTH\t"):
                    self.transport.write(b"OK\t" + line.split(b"\t")[1] + b"\tuser=alice\n")

    server = protocol.ServerFactory()
    server.protocol = Impostor
    listening = reactor.listenTCP(0, server, interface="127.0.0.1")
    port = listening.getHost().port
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    deps = BackendDeps(reactor=reactor, hash_runner=None, make_runner=None)  # type: ignore[arg-type]
    checker = from_config("impostor", DovecotBackendConfig(socket=f"tcp:127.0.0.1:{port}",
                                                           timeout=2.0), deps)
    try:
        for _ in range(3):
            assert isinstance(await check(checker, "alice", "wonderland"), TemporaryFailure)
        server.protocol = Honest
        assert await check(checker, "alice", "wonderland") == b"alice"
    finally:
        globalLogPublisher.removeObserver(events.append)
        checker.stop()
        await listening.stopListening()
    from twisted.logger import LogLevel, formatEvent
    texts = [(e["log_level"], formatEvent(e)) for e in events
             if str(e.get("log_namespace", "")).startswith("saslsmtp")]
    loud = [text for level, text in texts if level in (LogLevel.warn, LogLevel.error)]
    assert loud == ["backend impostor unreachable: Dovecot auth at tcp:127.0.0.1:%d unavailable:"
                    " Dovecot auth protocol error: \\x1b]0;owned\\x07220 mx.example ESMTP\\x0d"
                    " before VERSION; logins that need it get 454 until it answers again" % port]
    assert any("backend impostor reachable again" in text for _, text in texts)
    assert not any("\x1b" in text or "wonderland" in text for _, text in texts)
