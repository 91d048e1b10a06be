"""``SubmissionESMTP.end``: the one way a session is ended from outside, by
``saslsmtp-ctl kick`` (``sessionctl``) and by a shutdown (``serving.MeteredFactory.close_all``),
byte for byte over string transports: idle, inside AUTH (the client's turn, and a
backend answering), inside DATA (the message discarded, its ``tmp/`` file removed) and
while a message is being stored (its 250 first)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer, task
from zope.interface import implementer

from saslsmtp.delivery import Maildir, MaildirRealm
from saslsmtp.replies import REPLIES
from saslsmtp.serving import SHUTDOWN_GRACE, MeteredFactory
from saslsmtp.testing import SMTPHarness
from saslsmtp.threads import SynchronousRunner
from tests.test_data_sinks import ManualRunner, files

KICKED = b"421 4.7.0 Session closed by the administrator, closing connection\r\n"
SHUTTING = b"421 4.3.2 Service shutting down, closing connection\r\n"
USERS = {"tim": "tanstaaftanstaaf"}
PLAIN = b"AUTH PLAIN " + base64.b64encode(b"\0tim\0tanstaaftanstaaf") + b"\r\n"
START = b"MAIL FROM:<tim@example.test>\r\nRCPT TO:<a@example.test>\r\nDATA\r\n"
PART = b"Subject: part\r\n\r\n" + b"first half\r\n" * 30000  # past a chunk: a tmp/ file
DATA_OK = b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"


def test_the_replies_are_the_tables() -> None:
    assert (REPLIES["kicked"].to_bytes(), REPLIES["shutting_down"].to_bytes()) == (KICKED, SHUTTING)


def maildir(tmp_path: Path, runner: Any) -> SMTPHarness:
    h = SMTPHarness(users=USERS, realm=MaildirRealm(Maildir(tmp_path / "mail", "mx.example.test"),
                                                    runner))
    assert h.login("tim", USERS["tim"]) == b"235 2.7.0 Authentication successful\r\n"
    return h


def closed(h: SMTPHarness) -> bool:
    """Closed, and nothing the client sends any more is read."""
    return bool(h.transport.disconnecting) and h.send(b"NOOP\r\n") == b""


@implementer(ICredentialsChecker)
class SlowBackend:
    """A password backend that answers when the test says so."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.asked: list[defer.Deferred] = []

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.asked.append(d)
        return d


def test_idle_gets_the_reply_at_once() -> None:
    h = SMTPHarness(users=USERS)
    assert h.send(b"EHLO client.example\r\n").startswith(b"250-")
    h.protocol.end(REPLIES["kicked"])
    assert h.take() == KICKED
    assert closed(h)


def test_inside_auth_on_the_clients_turn_gets_it_at_once() -> None:
    """After the 334 the client owes the next line: nothing to wait for; its response,
    sent after the 421, is not read (no login)."""
    h = SMTPHarness(users=USERS)
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"AUTH PLAIN\r\n") == b"334 \r\n"
    h.protocol.end(REPLIES["kicked"])
    assert h.take() == KICKED
    assert h.send(base64.b64encode(b"\0tim\0tanstaaftanstaaf") + b"\r\n") == b""
    assert h.realm.logins == [] and h.transport.disconnecting


def test_inside_auth_with_the_backend_answering_gets_the_answer_first() -> None:
    """The password is being checked: the 235 goes out when the backend answers, then
    the 421; nothing before."""
    backend = SlowBackend()
    h = SMTPHarness(checkers=[backend])
    h.send(b"EHLO client.example\r\n")
    assert h.send(PLAIN) == b""
    h.protocol.end(REPLIES["shutting_down"])
    assert h.take() == b"" and not h.transport.disconnecting
    backend.asked[0].callback(b"tim")
    assert h.take() == b"235 2.7.0 Authentication successful\r\n" + SHUTTING
    assert closed(h)


def test_answer_first_false_does_not_wait() -> None:
    """A shutdown whose grace is over: the 421 now; the answer that comes later is not
    written after it."""
    backend = SlowBackend()
    h = SMTPHarness(checkers=[backend])
    h.send(b"EHLO client.example\r\n")
    h.send(PLAIN)
    h.protocol.end(REPLIES["shutting_down"], answer_first=False)
    assert h.take() == SHUTTING and h.transport.disconnecting
    backend.asked[0].callback(b"tim")
    assert h.take() == b""


def test_inside_data_the_message_is_discarded_and_its_file_removed(tmp_path: Path) -> None:
    """Between the 354 and the final dot: the 421 at once, the ``tmp/`` file of the part
    received is gone (not left for the connection's end), the rest (final dot included)
    is not read, nothing is delivered."""
    h = maildir(tmp_path, SynchronousRunner())
    assert h.send(START) == DATA_OK
    assert h.send(PART) == b""
    assert len(files(tmp_path / "mail" / "tmp")) == 1
    h.protocol.end(REPLIES["kicked"])
    assert h.take() == KICKED
    assert files(tmp_path / "mail" / "tmp") == []
    assert h.send(b"second half\r\n.\r\nQUIT\r\n") == b""
    h.close()
    assert files(tmp_path / "mail" / "new") == []


def test_with_the_message_being_stored_its_250_comes_first(tmp_path: Path) -> None:
    """The final dot was read and the Maildir is writing: the message is complete, so its
    250 goes out once it is stored, then the 421, and the message is delivered."""
    runner = ManualRunner()
    h = maildir(tmp_path, runner)
    h.send(START)
    runner.run_all()
    assert h.send(b"Subject: late\r\n\r\nbody\r\n.\r\n") == b""
    assert runner.jobs  # being stored
    h.protocol.end(REPLIES["kicked"])
    assert h.take() == b"" and not h.transport.disconnecting
    runner.run_all()
    [name] = files(tmp_path / "mail" / "new")
    assert h.take() == (REPLIES["message_accepted"].with_text(f"OK: queued as {name}").to_bytes()
                        + KICKED)
    assert closed(h)


def test_a_session_already_closing_is_left_alone() -> None:
    h = SMTPHarness(users=USERS)
    assert h.send(b"QUIT\r\n") == b"221 2.0.0 Bye\r\n"
    h.protocol.end(REPLIES["kicked"])
    assert h.take() == b""


def test_the_shutdown_sweep_ends_sessions_the_same_way(tmp_path: Path) -> None:
    """SIGTERM's sweep: the idle session gets its 421 at once, the one inside DATA is given
    the grace; when that is over it is ended as a kick ends one: 421, and the part
    received is removed then, not when the connection is finally gone."""
    clock = task.Clock()
    idle = SMTPHarness(users=USERS, clock=clock)
    idle.send(b"EHLO client.example\r\n")
    sending = maildir(tmp_path, SynchronousRunner())
    assert sending.send(START) == DATA_OK
    assert sending.send(PART) == b""
    factory = MeteredFactory(wiring=None, clock=clock)  # type: ignore[arg-type]
    factory.connections = {idle.protocol, sending.protocol}
    factory.close_all()
    assert idle.take() == SHUTTING and idle.transport.disconnecting
    assert sending.take() == b"" and not sending.transport.disconnecting
    assert len(files(tmp_path / "mail" / "tmp")) == 1
    clock.advance(SHUTDOWN_GRACE)
    assert sending.take() == SHUTTING and sending.transport.disconnecting
    assert files(tmp_path / "mail" / "tmp") == []
