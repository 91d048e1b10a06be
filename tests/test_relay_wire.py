"""The sans-I/O half of the upstream client: reply parsing, passing a reply on, xtext,
dot-stuffing, each with exact bytes."""

from __future__ import annotations

import pytest

from saslsmtp.relay.wire import (DotStuffer, FirstField, ProtocolViolation, ReplyParser, UpstreamReply,
                                 pass_on, xtext)


def parse(*lines: bytes) -> list[UpstreamReply]:
    parser = ReplyParser()
    out = [parser.line(line) for line in lines]
    return [r for r in out if r is not None]


def test_single_line_reply_with_enhanced_code():
    """A one-line reply gives its code, lines and enhanced code."""
    [reply] = parse(b"550 5.1.1 <x@example.test>: Recipient address rejected")
    assert reply.code == 550 and reply.enhanced == "5.1.1"
    assert reply.lines == (b"5.1.1 <x@example.test>: Recipient address rejected",)


def test_multiline_reply_completes_on_the_space_line():
    """``250-`` lines continue, ``250 `` ends: one reply with every line."""
    parser = ReplyParser()
    assert parser.line(b"250-mx.example.test") is None
    assert parser.line(b"250-PIPELINING") is None
    reply = parser.line(b"250 XCLIENT ADDR LOGIN")
    assert reply == UpstreamReply(250, (b"mx.example.test", b"PIPELINING", b"XCLIENT ADDR LOGIN"))
    assert parser.line(b"221 2.0.0 Bye") == UpstreamReply(221, (b"2.0.0 Bye",))


@pytest.mark.parametrize("line", [b"hello", b"25", b"600 no", b"250x", b"\x00\x01"])
def test_non_reply_lines_are_violations(line):
    """Anything but ``[2-5]xx`` followed by space, dash or nothing is refused."""
    with pytest.raises(ProtocolViolation):
        ReplyParser().line(line)


def test_code_change_inside_multiline_reply_is_a_violation():
    """``250-`` then ``550 `` is not one reply."""
    parser = ReplyParser()
    parser.line(b"250-first")
    with pytest.raises(ProtocolViolation, match="changes its code"):
        parser.line(b"550 second")


def test_endless_multiline_reply_is_a_violation():
    """A hundred continuation lines are refused (an upstream cannot make us buffer forever)."""
    parser = ReplyParser()
    with pytest.raises(ProtocolViolation, match="too many lines"):
        for _ in range(200):
            parser.line(b"250-more")


def test_bare_code_line():
    """``250`` alone (no text) is a complete reply."""
    assert parse(b"250") == [UpstreamReply(250, (b"",))]


def test_pass_on_keeps_code_and_enhanced_code():
    """The client sees the upstream's code, enhanced code and text."""
    reply = pass_on(UpstreamReply(550, (b"5.1.1 <x@example.test>: Recipient address rejected",)))
    assert reply.to_bytes() == b"550 5.1.1 <x@example.test>: Recipient address rejected\r\n"


def test_pass_on_without_enhanced_code_uses_the_class():
    """An upstream without ENHANCEDSTATUSCODES gets ``X.0.0`` of its code's class."""
    assert pass_on(UpstreamReply(451, (b"try later",))).to_bytes() == b"451 4.0.0 try later\r\n"
    assert pass_on(UpstreamReply(250, (b"ok",))).to_bytes() == b"250 2.0.0 ok\r\n"


def test_pass_on_wrong_class_enhanced_code_is_replaced():
    """``550 4.1.1`` (class mismatch) is not trusted: ``5.0.0``, the text kept."""
    assert pass_on(UpstreamReply(550, (b"4.1.1 odd",))).to_bytes() == b"550 5.0.0 4.1.1 odd\r\n"


def test_pass_on_sanitises_and_bounds_text():
    """each run of CR, LF, NUL and non-ASCII becomes one space; text is cut to 200 characters; at most
    three lines go on.  Nothing an upstream sends can start a new reply line."""
    evil = UpstreamReply(550, (b"5.7.1 bad\r\n250 2.0.0 fake\x00\xff" + b"A" * 500,
                               b"5.7.1 two", b"5.7.1 three", b"5.7.1 four"))
    out = pass_on(evil).to_bytes()
    lines = out.split(b"\r\n")[:-1]
    assert len(lines) == 3
    assert lines[0].startswith(b"550-5.7.1 bad 250 2.0.0 fake AAA")
    assert len(lines[0]) == len(b"550-5.7.1 ") + 200
    assert lines[1:] == [b"550-5.7.1 two", b"550 5.7.1 three"]
    assert b"\n250" not in out and b"\r250" not in out


def test_pass_on_421_becomes_451():
    """An upstream closing its session must not close ours: 421 -> 451, with the
    upstream's own enhanced code (of the same class), made up only when it has none."""
    assert pass_on(UpstreamReply(421, (b"4.3.2 shutting down",))).to_bytes() == \
        b"451 4.3.2 shutting down\r\n"
    assert pass_on(UpstreamReply(421, (b"shutting down",))).to_bytes() == \
        b"451 4.0.0 shutting down\r\n"


@pytest.mark.parametrize("value, encoded", [
    ("192.0.2.1", "192.0.2.1"),
    ("alice@example.test", "alice@example.test"),
    ("a b", "a+20b"),
    ("a+b=c", "a+2Bb+3Dc"),
    ("b\u00f6b", "b+C3+B6b"),
    ("x\r\ny", "x+0D+0Ay"),
])
def test_xtext(value, encoded):
    """RFC 3461 xtext, as Postfix's XCLIENT decodes it: space, +, =, controls and
    non-ASCII octets become ``+XX``."""
    assert xtext(value) == encoded


def stuff(*chunks: bytes) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(c) for c in chunks) + stuffer.end()


def test_dot_stuffing_whole_message():
    """Leading dots are doubled, others untouched, and ``.CRLF`` ends it."""
    assert stuff(b".first\r\nmid.dle\r\n.\r\n..two\r\n") == \
        b"..first\r\nmid.dle\r\n..\r\n...two\r\n.\r\n"


@pytest.mark.parametrize("split", range(1, 16))
def test_dot_stuffing_any_chunking(split):
    """Wherever a chunk boundary falls (inside CRLF, before the dot), the stream is the same."""
    message = b"a\r\n.b\r\n.\r\nc\r\n"
    assert stuff(message[:split], message[split:]) == stuff(message)


def test_dot_stuffing_adds_missing_crlf_and_handles_empty():
    """A message without a final CRLF gets one; an empty message is only the dot."""
    assert stuff(b"no newline") == b"no newline\r\n.\r\n"
    assert stuff() == b".\r\n"
    assert stuff(b"x\r", b"\n") == b"x\r\n.\r\n"


def insert_after_first_field(chunks: list[bytes], header: bytes) -> bytes:
    """What ``UpstreamTransaction`` does with ``FirstField``: the header goes in where
    the first field ends, else after the last chunk."""
    finder, out, pending = FirstField(), b"", True
    for chunk in chunks:
        at = finder.find(chunk) if pending else None
        if at is not None:
            chunk, pending = chunk[:at] + header + chunk[at:], False
        out += chunk
    return out + (header if pending else b"")


RECEIVED = (b"Received: from pc ([192.0.2.7])\r\n\tby mx (saslsmtp) with ESMTPA\r\n"
            b"\t(authenticated user alice); Mon, 30 Nov 2026 08:00:00 +0000\r\n")


@pytest.mark.parametrize("rest", [b"Subject: x\r\n\r\nbody\r\n", b"\r\nno headers\r\n",
                                  b" continued\r\n\r\nb\r\n"])
def test_first_field_ends_before_the_next_unfolded_line_at_every_cut(rest):
    """The header lands right after the Received header's last folded line, however the
    message is cut into chunks (cuts inside CRLF, right after it, before the tab)."""
    message = RECEIVED + rest
    field_end = len(RECEIVED) + (len(rest.split(b"\r\n", 1)[0]) + 2
                                 if rest.startswith(b" ") else 0)
    expected = message[:field_end] + b"X-Auth: a\r\n" + message[field_end:]
    for i in range(len(message) + 1):
        for j in range(i, min(i + 40, len(message)) + 1):
            chunks = [message[:i], message[i:j], message[j:]]
            assert insert_after_first_field(chunks, b"X-Auth: a\r\n") == expected, (i, j)


def test_first_field_of_a_message_without_headers_and_of_one_field_only():
    """A message that starts with its empty line has no field: the header goes first.
    One that is a single field: the header after it (at the end)."""
    assert FirstField().find(b"\r\nbody\r\n") == 0
    finder = FirstField()
    assert finder.find(b"Subject: only\r\n") is None and finder.at_line_end
    finder = FirstField()
    assert finder.find(b"Subject: no line end") is None and not finder.at_line_end
