"""Sessions cannot last forever: junk commands are counted, an unauthenticated session has
a maximum duration, and a client that pipelines without reading the replies is cut off.
Exact-byte transcripts over StringTransport with an injected Clock."""

from __future__ import annotations

import base64

from saslsmtp.testing import SMTPHarness

EHLO = b"EHLO client.example\r\n"
JUNK_421 = b"421 4.7.0 Too many junk commands, closing connection\r\n"
SESSION_421 = b"421 4.4.2 Session time limit exceeded, closing connection\r\n"
FLOOD_421 = b"421 4.7.0 Too much pipelined input without reading replies, closing connection\r\n"
PLAIN = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n"


def harness(**kw) -> SMTPHarness:
    h = SMTPHarness(users={"alice": "secret"}, **kw)
    h.send(EHLO)
    return h


def test_noop_once_a_second_ends_at_the_junk_limit() -> None:
    """NOOP, RSET, VRFY and HELP are junk: the 100 allowed by default are answered, the
    next one gets 421 and the connection closes."""
    h = harness()
    junk = [b"NOOP\r\n", b"RSET\r\n", b"VRFY x\r\n", b"HELP\r\n"]
    for i in range(100):
        h.clock.advance(1)
        reply = h.send(junk[i % len(junk)])
        assert not reply.startswith(b"421") and not h.transport.disconnecting, i
    h.clock.advance(1)
    assert h.send(b"NOOP\r\n") == JUNK_421
    assert h.transport.disconnecting


def test_junk_limit_is_configurable() -> None:
    """``junk_command_limit`` sets how many are allowed."""
    h = harness(junk_command_limit=3)
    assert h.send(b"NOOP\r\n" * 4) == b"250 2.0.0 OK\r\n" * 3 + JUNK_421


def test_unknown_commands_are_junk_too() -> None:
    """Unknown verbs count as junk as well as protocol errors."""
    h = harness(junk_command_limit=3)
    assert h.send(b"XYZZY\r\n" * 4) == b"500 5.5.2 Command not recognized\r\n" * 3 + JUNK_421


def test_authenticated_mail_resets_the_junk_count() -> None:
    """A client that logged in and sends RSET after each of many messages is not junk
    (like Postfix resetting the count when mail goes through)."""
    h = harness(junk_command_limit=5)
    assert h.send(PLAIN).startswith(b"235 ")
    for _ in range(20):
        assert h.send(b"MAIL FROM:<alice@example.test>\r\n").startswith(b"250 ")
        assert h.send(b"RSET\r\nNOOP\r\n").startswith(b"250 ")
    assert not h.transport.disconnecting


def test_unauthenticated_session_has_a_maximum_duration() -> None:
    """EHLO once a second (not junk, resets the idle timer) still ends at
    ``max_unauthenticated_time`` (300 s by default)."""
    h = harness()
    for _ in range(299):
        h.clock.advance(1)
        assert h.send(EHLO).startswith(b"250-")
    h.clock.advance(1)
    assert h.take() == SESSION_421
    assert h.transport.disconnecting


def test_authenticated_session_is_not_cut_at_the_unauthenticated_limit() -> None:
    """Logging in lifts the limit."""
    h = harness(max_unauthenticated_time=10.0)
    assert h.send(PLAIN).startswith(b"235 ")
    for _ in range(30):
        h.clock.advance(1)
        assert h.send(EHLO).startswith(b"250-")
    assert not h.transport.disconnecting


def test_the_protocol_is_a_producer_for_its_replies() -> None:
    """The connection registers itself with the transport, which pauses it when replies
    pile up unread: lines then wait, in order, and are answered once the replies drain."""
    h = harness()
    assert h.transport.producer is h.protocol and h.transport.streaming
    h.protocol.pauseProducing()
    assert h.send(b"NOOP\r\nRSET\r\n") == b""
    h.protocol.resumeProducing()
    assert h.take() == b"250 2.0.0 OK\r\n250 2.0.0 Reset state\r\n"


def test_pipelining_without_reading_replies_ends_with_421() -> None:
    """While replies are not being read, more than a small number of queued lines is a
    flood: 421, nothing more is read, and the connection closes (at once when the
    replies drain, else after a grace period)."""
    h = harness()
    h.protocol.pauseProducing()
    assert h.send(b"EHLO x\r\n" * 10_000) == FLOOD_421
    assert not h.protocol.reader.queue  # dropped, not kept
    assert h.transport.disconnecting
    assert h.transport.producer is None  # unregistered, or loseConnection would wait forever


def test_a_closing_client_that_never_reads_is_aborted() -> None:
    """A connection whose replies are never read cannot hang in closing: it is aborted."""
    h = harness()
    h.protocol.pauseProducing()
    h.send(b"HELP\r\n" * 500)
    aborted: list[bool] = []
    h.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
    h.clock.advance(60)
    assert aborted == [True]


def test_server_keys_are_read_and_checked() -> None:
    """The three ``[server]`` keys reach the engine; nonsense values are startup errors
    naming the key."""
    import pytest

    from saslsmtp.config import ConfigError, parse_config
    from saslsmtp.mechanisms import BUILTIN_NAMES
    from saslsmtp.service import engine_settings
    base = '[auth]\nbackends = ["u"]\n[backends.u]\ntype = "file"\npath = "/etc/hostname"\n'
    config = parse_config("[server]\njunk_command_limit = 7\nmax_unauthenticated_time = 60.0\n"
                          "tls_handshake_timeout = 5.0\n" + base, known_mechanisms=BUILTIN_NAMES)
    settings = engine_settings(config)
    assert (settings.junk_command_limit, settings.max_unauthenticated_time,
            settings.tls_handshake_timeout) == (7, 60.0, 5.0)
    with pytest.raises(ConfigError) as e:
        parse_config("[server]\njunk_command_limit = -1\nmax_unauthenticated_time = 0\n"
                     "tls_handshake_timeout = -2.0\n" + base, known_mechanisms=BUILTIN_NAMES)
    for key in ("junk_command_limit", "max_unauthenticated_time", "tls_handshake_timeout"):
        assert f"server.{key}" in str(e.value)
