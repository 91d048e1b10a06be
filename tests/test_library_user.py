"""saslsmtp used as docs/library.md says, by an application with its own pieces: its own
checker (an asynchronous one, and one that fails), its own Portal and mail store around
``SubmissionESMTP``; mechanisms of its own written as ``async def``; the built-in
mechanisms driven without any server; the misuse a user makes first (one string for a
list, one checker for a list, no clock); and the whole daemon built as a service on a
socket systemd passed.  Public names only, except where noted."""

from __future__ import annotations

import base64
import smtplib
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.mail import smtp
from zope.interface import implementer

from saslsmtp import embed
from saslsmtp.protocol import EngineSettings, SubmissionESMTP
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.outcome import Accept, Lookup, Outcome, Reject, Reply, Secret, Session
from saslsmtp.testing import MemoryRealm, MemoryUsers, SMTPHarness
from tests.activate import activated_command
from tests.conftest import event_text
from tests.support import ROOT, terminate, wait_for

PASSWORD = "checker-canary-Pw-7"  # what a failing checker quotes: never in a log line


# the application's own pieces ----------------------------------------------------------


@implementer(ICredentialsChecker)
class Accounts:
    """Asks "the account service" (a Clock-driven wait stands for it) for the password;
    ``down`` makes it fail the way a careless checker does, quoting the password."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, clock: task.Clock, passwords: dict[str, str]) -> None:
        self.clock, self.passwords, self.down = clock, passwords, False

    async def _check(self, username: str, password: str) -> bytes:
        await task.deferLater(self.clock, 0.5, lambda: None)
        if self.down:
            raise RuntimeError(f"account service down while checking {username}/{password}")
        if self.passwords.get(username) == password:
            return username.encode()
        raise UnauthorizedLogin()

    def requestAvatarId(self, credentials: Any) -> "defer.Deferred[bytes]":
        return defer.ensureDeferred(self._check(credentials.username.decode(),
                                                credentials.password.decode()))


@implementer(smtp.IMessage)
class Message:
    def __init__(self, store: list[bytes]) -> None:
        self.store, self.lines = store, []  # type: list[bytes]

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> "defer.Deferred[None]":
        self.store.append(b"\n".join(self.lines))
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
class Mailbox:
    def __init__(self, store: list[bytes]) -> None:
        self.store = store

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], Message]:
        return lambda: Message(self.store)


@implementer(IRealm)
class Store:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> tuple[Any, ...]:
        return smtp.IMessageDelivery, Mailbox(self.messages), lambda: None


class PinMechanism:
    """X-PIN, written with ``async def`` steps (an ``AsyncMechanism``): the PIN is looked
    up as the user's stored secret."""

    def __init__(self, session: Session) -> None:
        self.user = ""

    async def start(self, initial: bytes | None) -> Outcome:
        return Reply(b"User:") if initial is None else await self.receive(initial)

    async def receive(self, response: bytes) -> Outcome:
        if not self.user:
            self.user = response.decode()
            return Reply(b"PIN:")
        self.pin = response.decode()
        return Lookup(self.user, ("plaintext",))

    async def resume(self, secret: Secret | None) -> Outcome:
        if secret is not None and secret.value == self.pin:
            return Accept(username=self.user)
        return Reject("Wrong PIN")


@implementer(embed.ISecretSource)
class Pins:
    def secret_kinds(self) -> frozenset[str]:
        return frozenset({"plaintext"})

    def lookup_secret(self, username: str, kinds: tuple[str, ...],
                      session: Session | None = None) -> "defer.Deferred[Secret | None]":
        return defer.succeed(Secret("plaintext", "4711") if username == "bob" else None)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data) + b"\r\n"


def connection(clock: task.Clock, portal: Portal, auth: embed.SubmissionAuth
               ) -> tuple[SubmissionESMTP, StringTransport]:
    server = SubmissionESMTP(
        portal=portal, clock=clock, mechanisms=auth.mechanisms, resolver=auth.resolver,
        settings=EngineSettings(hostname="mx.example.test", mechanisms=auth.names,
                                require_tls=False, failure_delay=0.0))
    transport = StringTransport()
    server.makeConnection(transport)
    transport.clear()
    return server, transport


def say(server: SubmissionESMTP, transport: StringTransport, data: bytes) -> bytes:
    server.dataReceived(data)
    out = transport.value()
    transport.clear()
    return out


@pytest.fixture
def logged() -> Any:
    events: list[str] = []

    def observer(event: dict) -> None:
        events.append(event_text(event))
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def test_an_application_of_its_own_around_submission_esmtp() -> None:
    """Its async checker in its Portal, its mail store, an ``async def`` mechanism."""
    clock = task.Clock()
    accounts = Accounts(clock, {"alice": PASSWORD})
    store = Store()
    portal = Portal(store, [accounts, *embed.exchange_checkers()])
    auth = embed.submission_auth(["PLAIN", MechanismSpec("X-PIN", PinMechanism)],
                                 secrets=[Pins()])
    server, transport = connection(clock, portal, auth)
    assert say(server, transport, b"EHLO client.example\r\n").endswith(b"250 AUTH PLAIN X-PIN\r\n")
    plain = b"AUTH PLAIN " + b64(b"\0alice\0" + PASSWORD.encode())
    assert say(server, transport, plain) == b""  # the account service is asked
    clock.advance(0.5)
    assert transport.value() == b"235 2.7.0 Authentication successful\r\n"
    transport.clear()
    assert say(server, transport, b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>"
               b"\r\nDATA\r\n") == (b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n"
                                    b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert say(server, transport, b"Subject: hi\r\n\r\nhello\r\n.\r\n") == b"250 2.0.0 OK: queued\r\n"
    assert store.messages[0].endswith(b"Subject: hi\n\nhello")

    server, transport = connection(clock, portal, auth)  # the async def mechanism
    say(server, transport, b"EHLO client.example\r\n")
    assert say(server, transport, b"AUTH X-PIN\r\n") == b"334 VXNlcjo=\r\n"
    assert say(server, transport, b64(b"bob")) == b"334 UElOOg==\r\n"
    assert say(server, transport, b64(b"4711")) == b"235 2.7.0 Authentication successful\r\n"



def test_its_checker_failing_with_the_password_in_its_message(logged: list[str]) -> None:
    """454, and the log line (with the traceback: a bug in the checker) has no password."""
    clock = task.Clock()
    accounts = Accounts(clock, {"alice": PASSWORD})
    accounts.down = True
    auth = embed.submission_auth(["PLAIN"])
    server, transport = connection(clock, Portal(Store(), [accounts]), auth)
    say(server, transport, b"EHLO client.example\r\n")
    say(server, transport, b"AUTH PLAIN " + b64(b"\0alice\0" + PASSWORD.encode()))
    clock.advance(0.5)
    assert transport.value() == b"454 4.7.0 Temporary authentication failure\r\n"
    failed = [e for e in logged if "account service down" in e]
    assert failed and "alice/<redacted>" in failed[0]
    assert not [e for e in logged if PASSWORD in e]


def test_a_coroutine_step_that_fails_is_a_454_and_the_connection_goes_on(
        logged: list[str]) -> None:
    """An ``async def`` step that raises is the mechanism's failure, like a Deferred's:
    logged as what it raised."""
    class Broken(PinMechanism):
        async def start(self, initial: bytes | None) -> Outcome:
            raise RuntimeError("the PIN service is down")

    h = SMTPHarness(mechanisms={"X-PIN": MechanismSpec("X-PIN", Broken)})
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"AUTH X-PIN\r\n") == b"454 4.7.0 Temporary authentication failure\r\n"
    assert h.send(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"
    assert [e for e in logged if "RuntimeError: the PIN service is down" in e]


# the mechanisms without a server --------------------------------------------------------


def test_scram_against_stored_keys_step_by_step() -> None:
    """The keys ``scram_keys`` computes are what SCRAM-SHA-256 checks a client against;
    the outcome of each step is what a protocol of one's own acts on."""
    from tests.test_sasl_scram import reference_final  # an independent client side
    keys = embed.scram_keys("pencil", salt=b"0123456789abcdef", iterations=4096)
    assert keys[:2] == (4096, b"0123456789abcdef")
    mechanism = embed.mechanism("scram-sha-256", Session(hostname="imap.example.test"))
    assert mechanism.start(None) == Reply(b"")
    assert mechanism.receive(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO") == Lookup(
        "user", ("scram-sha-256", "plaintext"))
    first = mechanism.resume(Secret("scram-sha-256", keys))
    assert isinstance(first, Reply) and b"s=MDEyMzQ1Njc4OWFiY2RlZg==,i=4096" in first.payload_bytes()
    final, expected = reference_final("sha256", "pencil", b"n=user,r=rOprNGfwEbeRWgbNEkqO",
                                      first.payload_bytes(), b"n,,")
    assert mechanism.receive(final) == Reply(expected)
    assert mechanism.receive(b"") == Accept("user")
    plain = embed.mechanism("PLAIN")
    assert plain.start(b"\0alice\0pw").username == "alice"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="X-NOPE is not built in"):
        embed.mechanism("X-NOPE")
    with pytest.raises(ValueError, match="SCRAM-SHA-1, SCRAM-SHA-256"):
        embed.scram_keys("pencil", "CRAM-MD5")


# misuse --------------------------------------------------------------------------------


@pytest.mark.parametrize("build, message", [
    (lambda: embed.challengers("PLAIN"),  # type: ignore[arg-type]
     r"mechanisms must be a list of names, not one str: \['PLAIN'\]"),
    (lambda: embed.submission_auth("CRAM-MD5"), r"mechanisms must be a list of names"),
    (lambda: embed.challengers([b"PLAIN"]),  # type: ignore[list-item]
     "each item must be a name \\(str\\) or a MechanismSpec, not bytes"),
    (lambda: embed.challengers(["CRAM-MD5"], secrets=MemoryUsers({})),
     r"secrets must be a list \(secrets=\[file_checker\(...\)\]\), not MemoryUsers"),
    (lambda: embed.portal(MemoryRealm(), MemoryUsers({})),  # type: ignore[arg-type]
     r"checkers must be a list \(checkers=\[file_checker\(...\)\]\), not MemoryUsers"),
    (lambda: embed.portal(MemoryRealm(), [object()]),  # type: ignore[list-item]
     "checkers: every item must be a checker that provides ICredentialsChecker"),
    (lambda: embed.auth_script(lambda arguments, context: Accept(), clock=None),
     "clock must provide callLater"),
    (lambda: SMTPHarness(mechanism_names="PLAIN"), "mechanism_names must be a list of names"),
    (lambda: EngineSettings(mechanisms="PLAIN"),  # type: ignore[arg-type]
     r"EngineSettings: mechanisms must be a list of names, not one str: \['PLAIN'\]"),
    (lambda: EngineSettings(mechanisms=[b"PLAIN"]),  # type: ignore[list-item]
     r"EngineSettings: mechanisms: each item must be a name \(str\), not bytes"),
])
def test_a_wrong_argument_type_is_a_type_error_that_names_it(build: Any, message: str) -> None:
    """Not a ValueError about the letter P, nor a traceback at the first login."""
    with pytest.raises(TypeError, match=message):
        build()


# the whole daemon as a service, on a socket systemd passed --------------------------------

PROGRAM = """
import sys
from twisted.internet import defer, task
from saslsmtp.service import build, load

def main(reactor):
    service = build(load(sys.argv[1]), reactor)
    service.privilegedStartService()
    service.startService()
    print("serving", flush=True)
    return defer.Deferred()

task.react(main)
"""


def test_service_build_serves_the_socket_systemd_passed(tmp_path: Path) -> None:
    """``service.build`` with a ``systemd:name=...:port=...`` listener serves the passed
    socket, as the daemon does (Twisted's parser knew no ``port=`` and raised)."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen(8)
    port = held.getsockname()[1]
    (tmp_path / "users.passwd").write_text("alice:{PLAIN}wonderland\n")
    config = tmp_path / "saslsmtp.toml"
    config.write_text('[server]\nhostname = "mx.example.test"\n'
                      f'listen = ["systemd:name=submission:port={port}"]\n'
                      '[auth]\nmechanisms = ["PLAIN"]\nbackends = ["users"]\n'
                      'require_tls = false\nfailure_delay = 0.0\n'
                      '[backends.users]\ntype = "file"\npath = "users.passwd"\n')
    (tmp_path / "program.py").write_text(PROGRAM)
    argv, fds = activated_command([sys.executable, "program.py", str(config)], [held],
                                  ["submission"])
    log = tmp_path / "program.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, pass_fds=fds, cwd=tmp_path, stdout=out,
                                   stderr=subprocess.STDOUT, env={"PYTHONPATH": str(ROOT)})
    try:
        wait_for(lambda: "serving" in log.read_text() or process.poll() is not None,
                 what="the program to serve")
        assert process.poll() is None, log.read_text()
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            assert client.ehlo()[1].startswith(b"mx.example.test")
            assert client.login("alice", "wonderland") == (235, b"2.7.0 Authentication successful")
    finally:
        held.close()
        terminate(process)
    assert "Traceback" not in log.read_text()
