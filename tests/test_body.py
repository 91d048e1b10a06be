"""The body reader: end-of-data and dot-unstuffing on whole buffers, whatever the split
of the stream into reads."""

from __future__ import annotations

import pytest

from saslsmtp.body import BodyReader

STREAM = b"Subject: x\r\n\r\n..leading dot\r\nmiddle\r\n...two\r\n.\r\nQUIT\r\n"
BODY = b"Subject: x\r\n\r\n.leading dot\r\nmiddle\r\n..two\r\n"


def read_all(stream: bytes, sizes: list[int], limit: int = 16384) -> tuple[bytes, bytes, BodyReader]:
    reader = BodyReader(limit)
    out, pos, i = [], 0, 0
    while pos < len(stream):
        n = sizes[i % len(sizes)]
        i += 1
        chunk = reader.feed(stream[pos:pos + n])
        pos += n
        out.append(chunk.data)
        if chunk.done:
            return b"".join(out), chunk.rest + stream[pos:], reader
    raise AssertionError("no end of data")


@pytest.mark.parametrize("sizes", [[len(STREAM)], [1], [2], [3], [4], [5], [7, 1, 2]])
def test_any_split_gives_the_same_body_and_rest(sizes):
    """Every way of cutting the stream into reads: the same un-stuffed body, the bytes
    after the final dot handed back, the size counted."""
    body, rest, reader = read_all(STREAM, sizes)
    assert body == BODY
    assert rest == b"QUIT\r\n"
    assert reader.size == len(BODY)


def test_empty_message_and_dot_first_line():
    """A final dot as the first line is an empty message; a stuffed dot on the first
    line is un-stuffed like any other."""
    assert read_all(b".\r\n", [1])[0] == b""
    assert read_all(b"..x\r\n.\r\n", [2])[0] == b".x\r\n"


# SMTP smuggling (CVE-2023-51764, CVE-2023-51765, CVE-2023-51766): an end of data that
# one server sees and another does not.  Each stream, whatever its cut into reads, ends
# only at its last CRLF . CRLF, and what is passed on has CRLF line ends and no other CR.
SMUGGLED = [
    # (what the client sent after 354, the message as passed on)
    (b"a\r\n\n.\nMAIL FROM:<x@evil>\r\n.\r\n", b"a\r\n\r\n\r\nMAIL FROM:<x@evil>\r\n"),
    (b"a\n.\r\nMAIL FROM:<x@evil>\r\n.\r\n", b"a\r\n\r\nMAIL FROM:<x@evil>\r\n"),
    (b"a\r\n.\nMAIL FROM:<x@evil>\r\n.\r\n", b"a\r\n\r\nMAIL FROM:<x@evil>\r\n"),
    (b"a\r\n\r.\r\nMAIL FROM:<x@evil>\r\n.\r\n", b"a\r\n .\r\nMAIL FROM:<x@evil>\r\n"),
    (b"a\r\n\r.\nMAIL FROM:<x@evil>\r\n.\r\n", b"a\r\n .\r\nMAIL FROM:<x@evil>\r\n"),
    (b"a\r.\rMAIL FROM:<x@evil>\r\n.\r\n", b"a . MAIL FROM:<x@evil>\r\n"),
    (b"a\r\n.\r\r\nb\r\n.\r\n", b"a\r\n \r\nb\r\n"),
    (b"bare\nlines\n..dot\n\r\n.\r\n", b"bare\r\nlines\r\n.dot\r\n\r\n"),
    (b".\n\r\n.\r\n", b"\r\n\r\n"),
    (b"x\n.\n.\r\n.\n\r\n.\r\n", b"x\r\n\r\n\r\n\r\n\r\n"),
]


def test_only_crlf_dot_crlf_ends_the_data_and_only_crlf_is_passed_on():
    """``LF . LF``, ``LF . CRLF``, ``CRLF . LF``, ``CR . CRLF``, ``CR . CR`` are message
    text, as in Postfix 3.9 (``smtpd_forbid_bare_newline = normalize``); a bare LF ends a
    line as CRLF would (its dot un-stuffed), a stray CR becomes a space (Postfix's
    ``cleanup_replace_stray_cr_lf``): every cut of every stream into three reads gives
    the same bytes, and the command after the real final dot is handed back."""
    for stream, message in SMUGGLED:
        stream += b"QUIT\r\n"
        for i in range(len(stream) + 1):
            for j in range(i, len(stream) + 1):
                reader = BodyReader(16384)
                out, parts = [], [stream[:i], stream[i:j], stream[j:]]
                while parts:
                    chunk = reader.feed(parts.pop(0))
                    out.append(chunk.data)
                    if chunk.done:
                        break
                assert chunk.done, (stream, i, j)
                assert (b"".join(out), chunk.rest + b"".join(parts)) == (message, b"QUIT\r\n"), (
                    stream, i, j)
                assert reader.size == len(message)


def test_overlong_line_detected_across_reads_and_inside_one():
    """A line longer than the limit is noticed whether it spans reads or sits between
    short lines in one read; lines at the limit are fine."""
    reader = BodyReader(10)
    reader.feed(b"a" * 10 + b"\r\n" + b"b" * 6)
    assert not reader.overlong
    reader.feed(b"b" * 6)
    assert reader.overlong
    reader = BodyReader(10)
    reader.feed(b"x\r\n" * 10 + b"c" * 11 + b"\r\n" + b"y\r\n" * 10)
    assert reader.overlong


def test_two_byte_lines_cost_no_object_per_line():
    """A megabyte of 2-byte lines goes through in reads of 64 KB, un-stuffed exactly."""
    stream = b"ab\r\n.c\r\n" * (1 << 17) + b".\r\n"
    body, rest, reader = read_all(stream, [65536])
    assert body == b"ab\r\nc\r\n" * (1 << 17) and rest == b""
    assert not reader.overlong


def test_every_two_cut_split_gives_identical_bytes():
    """Every way of cutting the stream in three reads (so every boundary inside and
    around the final ``CRLF . CRLF`` and the stuffed dots, alone or together): the same
    body and the same rest."""
    for i in range(len(STREAM) + 1):
        for j in range(i, len(STREAM) + 1):
            reader = BodyReader(16384)
            out, parts = [], [STREAM[:i], STREAM[i:j], STREAM[j:]]
            while parts:
                chunk = reader.feed(parts.pop(0))
                out.append(chunk.data)
                if chunk.done:
                    break
            assert chunk.done, (i, j)
            rest = chunk.rest + b"".join(parts)
            assert (b"".join(out), rest) == (BODY, b"QUIT\r\n"), (i, j)
