"""SMTPHarness imports an AUTH script the way the daemon does: once per server start."""

from __future__ import annotations

from pathlib import Path

from saslsmtp.testing import SMTPHarness

COUNTING = '''
from saslsmtp.script import Accept, Reply

CALLS = 0


def auth(arguments, context):
    global CALLS
    CALLS += 1
    seen = context.get("seen", 0)
    context["seen"] = seen + 1
    return Accept(reason=f"call {CALLS} context {seen}")
'''


def test_connections_of_one_harness_share_the_module_not_the_context(tmp_path: Path) -> None:
    """Like the daemon: module globals live as long as the server, ``context`` as long as
    the connection; a new harness is a restart (the module is imported again)."""
    script = tmp_path / "counting.py"
    script.write_text(COUNTING)
    h = SMTPHarness(script=str(script))
    assert h.login("alice", "pw") == b"235 2.7.0 call 1 context 0\r\n"
    second = h.connect()
    assert second.login("alice", "pw") == b"235 2.7.0 call 2 context 0\r\n"
    assert second.transport is not h.transport
    assert second.realm is h.realm and h.realm.logins == ["alice", "alice"]
    restarted = SMTPHarness(script=str(script))
    assert restarted.login("alice", "pw") == b"235 2.7.0 call 1 context 0\r\n"


def test_connect_keeps_the_server_settings(tmp_path: Path) -> None:
    """A second connection gets the same mechanisms and users, and its own peer address."""
    h = SMTPHarness(users={"alice": "secret"}, mechanism_names=["PLAIN"])
    other = h.connect(peer="198.51.100.7")
    assert other.transport.getPeer().host == "198.51.100.7"
    assert other.login("alice", "secret") == b"235 2.7.0 Authentication successful\r\n"
    assert other.clock is h.clock and other.portal is h.portal


def test_tls_started_with_is_what_starttls_gave_the_transport() -> None:
    """``h.tls_started_with`` (typed on the harness: ``h.transport`` is a plain
    ``StringTransport`` to a type checker) is ``None`` until STARTTLS, then the context;
    PLAIN, hidden before TLS under require_tls, is offered after it."""
    h = SMTPHarness(users={"alice": "secret"}, starttls=True, require_tls=True)
    assert h.send(b"EHLO client.example\r\n").endswith(b"250 STARTTLS\r\n")
    assert h.tls_started_with is None
    assert h.send(b"STARTTLS\r\n") == b"220 2.0.0 Ready to start TLS\r\n"
    assert h.tls_started_with is not None and h.tls_started_with is h.protocol.tls_context
    assert h.login("alice", "secret") == b"235 2.7.0 Authentication successful\r\n"
    assert SMTPHarness().tls_started_with is None
