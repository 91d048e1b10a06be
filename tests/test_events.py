"""``SessionEvents``: what one session reports, without a server (a fake clock, a
recording metrics object, the log captured)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogPublisher, formatEvent

from saslsmtp import events as module
from saslsmtp.events import NO_METRICS, NoSessionEvents, SessionEvents


class Recorder:
    """Records every metrics call as (method, args)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __getattr__(self, name: str):
        return lambda *args: self.calls.append((name, *args))


class TLSTransport:
    def getHandle(self):
        class Connection:
            def get_protocol_version_name(self) -> str:
                return "TLSv1.2"
        return Connection()


def captured(monkeypatch) -> list[str]:
    lines: list[str] = []
    publisher = LogPublisher(lambda event: lines.append(formatEvent(event)))
    monkeypatch.setattr(module.log, "observer", publisher)
    return lines


def test_a_session_counts_and_ends_with_one_line(monkeypatch) -> None:
    """AUTH results, TLS, messages go to the metrics; the end line has who, how, what,
    how long; a second ``ended`` (a late call) writes nothing more."""
    lines = captured(monkeypatch)
    clock, metrics = Clock(), Recorder()
    clock.advance(100)
    session = SessionEvents(metrics, clock)
    session.tls_established(TLSTransport())
    session.auth_finished("PLAIN", "failure", None, "192.0.2.1")
    session.auth_finished("PLAIN", "aborted", None, "192.0.2.1")
    session.auth_finished("LOGIN", "success", "alice", "192.0.2.1")
    session.message_accepted(1000)
    session.message_accepted(24)
    session.delivery_failed()
    clock.advance(2.5)
    session.ended("192.0.2.1", True)
    session.ended("192.0.2.1", True)
    assert metrics.calls == [
        ("tls_handshake", True), ("auth_finished", "PLAIN", "failure"),
        ("auth_finished", "PLAIN", "aborted"), ("auth_finished", "LOGIN", "success"),
        ("message_accepted", 1000), ("message_accepted", 24), ("delivery_failed",)]
    assert lines == ["AUTH PLAIN aborted ip=192.0.2.1",
                     "session end client=192.0.2.1 user=alice mechanism=LOGIN tls=TLSv1.2"
                     " messages=2 bytes=1024 duration=2.500s"]


def test_a_handshake_started_and_never_finished_is_a_failure(monkeypatch) -> None:
    """TLS was started (STARTTLS or an ssl: listener) and the connection ended before the
    handshake completed: one failed handshake, and the end line says no TLS."""
    lines = captured(monkeypatch)
    metrics = Recorder()
    SessionEvents(metrics, Clock()).ended("192.0.2.9", True)
    SessionEvents(metrics, Clock()).ended("192.0.2.9", False)  # plain text: nothing
    assert metrics.calls == [("tls_handshake", False)]
    assert lines[0].startswith("session end client=192.0.2.9 user=- mechanism=- tls=none")


def test_the_null_objects_do_nothing(monkeypatch) -> None:
    """``NoSessionEvents`` (a protocol without a factory) and ``NO_METRICS`` count and log
    nothing, and accept every call the real ones do."""
    lines = captured(monkeypatch)
    quiet = NoSessionEvents()
    quiet.auth_finished("PLAIN", "aborted", None, "192.0.2.1")
    quiet.tls_established(TLSTransport())
    quiet.message_accepted(10)
    quiet.delivery_failed()
    quiet.ended("192.0.2.1", True)
    assert (quiet.messages, quiet.tls, lines) == (0, None, [])
    from saslsmtp.metrics import Metrics
    public = {n for n in vars(Metrics) if not n.startswith("_")}
    assert public <= set(vars(type(NO_METRICS)))


def test_the_end_line_names_no_login_that_starttls_made_the_server_forget(monkeypatch) -> None:
    """AUTH in plain text, then STARTTLS: RFC 3207 4.2 makes the server forget the login
    (MAIL gets 530), so the session-end line must not name it; a login made again inside
    TLS is the one named."""
    from saslsmtp.testing import SMTPHarness
    lines = captured(monkeypatch)
    for again, named in ((False, "user=- mechanism=-"), (True, "user=bob mechanism=PLAIN")):
        h = SMTPHarness(users={"alice": "wonderland", "bob": "builder"}, starttls=True)
        h.protocol.events = SessionEvents(NO_METRICS, Clock())
        assert h.login("alice", "wonderland") == b"235 2.7.0 Authentication successful\r\n"
        assert h.send(b"STARTTLS\r\n") == b"220 2.0.0 Ready to start TLS\r\n"
        h.send(b"EHLO client.example\r\n")
        if again:
            assert h.login("bob", "builder") == b"235 2.7.0 Authentication successful\r\n"
        else:
            assert h.send(b"MAIL FROM:<alice@example.test>\r\n").startswith(b"530 5.7.0 ")
        h.close()
        assert lines.pop().startswith(f"session end client=192.0.2.10 {named} tls=")
