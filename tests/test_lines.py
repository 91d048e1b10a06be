"""Line framing and the pipelining queue (saslsmtp.lines), without a transport."""

from __future__ import annotations

from saslsmtp.lines import OVERLONG, LineReader


class Recorder:
    def __init__(self, read_limit: int = 16) -> None:
        self.lines: list[bytes] = []
        self.stopped = False
        self.reader = LineReader(self.lines.append, lambda: self.stopped, read_limit)


def test_crlf_lines_across_reads() -> None:
    """Lines may be split anywhere between reads; CRLF is removed."""
    r = Recorder()
    r.reader.feed(b"EH")
    r.reader.feed(b"LO a\r\nNO")
    assert r.lines == [b"EHLO a"]
    r.reader.feed(b"OP\r\n")
    assert r.lines == [b"EHLO a", b"NOOP"]


def test_bare_lf_ends_a_line_as_crlf_does() -> None:
    """A line ending in a bare LF is a line (Postfix 3.9's ``normalize``); only the CR
    right before the LF is removed, another stays in the line."""
    r = Recorder()
    r.reader.feed(b"NOOP\r\nQUIT\nNO")
    r.reader.feed(b"OP\r\r\n\nRSET\n")
    assert r.lines == [b"NOOP", b"QUIT", b"NOOP\r", b"", b"RSET"]


def test_queued_lines_keep_their_ending_for_a_late_354() -> None:
    """Lines queued while busy are handed over without their ending, but a late switch
    to raw bytes (DATA answered 354 after they arrived) gets them byte for byte: a bare
    LF stays a bare LF, so ``LF . LF`` cannot become the final ``CRLF . CRLF``."""
    r = Recorder()
    raw: list[bytes] = []

    def keep(data: bytes) -> None:
        raw.append(data)
        return None
    r.reader.hold()
    r.reader.feed(b"one\r\ntwo\n.\nMAIL FROM:<a@b>\r\npart")
    assert r.reader.queue == [b"one", b"two", b".", b"MAIL FROM:<a@b>"]
    r.reader.raw = keep
    r.reader.release()
    assert raw == [b"one\r\ntwo\n.\nMAIL FROM:<a@b>\r\npart"] and r.lines == []


def test_input_waiting_after_the_current_line() -> None:
    """``input_waiting`` while a line is handled: true when more of its read follows (a
    line or part of one), or lines are queued; false for the last line of a read."""
    r = Recorder()
    seen: list[tuple[bytes, bool]] = []
    r.reader._on_line = lambda line: seen.append((line, r.reader.input_waiting()))
    r.reader.feed(b"A\r\nB\r\n")
    r.reader.feed(b"C\r\nD")
    assert seen == [(b"A", True), (b"B", False), (b"C", True)]
    assert r.reader.input_waiting()  # "D", not yet a line
    r.reader.feed(b"\r\n")
    r.reader.hold()
    r.reader.feed(b"E\r\nF\r\n")
    seen.clear()
    r.reader._on_line = lambda line: (seen.append((line, r.reader.input_waiting())),
                                      r.reader.hold())
    r.reader.release()
    assert seen == [(b"E", True)]
    r.reader.release()
    assert seen == [(b"E", True), (b"F", False)]


def test_overlong_line_is_one_marker_then_skipped() -> None:
    """A partial line longer than the limit becomes OVERLONG; its rest is skipped."""
    r = Recorder(read_limit=8)
    r.reader.feed(b"X" * 20)
    assert r.lines == [OVERLONG] and r.lines[0] is OVERLONG
    r.reader.feed(b"more of it\r\nNOOP\r\n")
    assert r.lines == [OVERLONG, b"NOOP"]


def test_busy_queues_in_order_until_released() -> None:
    """While busy, lines queue; release hands them over in order until one holds again."""
    r = Recorder()
    r.reader.hold()
    r.reader.feed(b"A\r\nB\r\nC\r\n")
    assert r.lines == [] and r.reader.queue == [b"A", b"B", b"C"]

    def hold_on_b(line: bytes) -> None:
        r.lines.append(line)
        if line == b"B":
            r.reader.hold()
    r.reader._on_line = hold_on_b
    r.reader.release()
    assert r.lines == [b"A", b"B"] and r.reader.queue == [b"C"]
    r.reader.release()
    assert r.lines == [b"A", b"B", b"C"]


def test_discard_pending_drops_the_rest_of_the_read() -> None:
    """STARTTLS: lines after it in the same read, and queued ones, are dropped."""
    r = Recorder()

    def starttls(line: bytes) -> None:
        r.lines.append(line)
        if line == b"STARTTLS":
            r.reader.discard_pending()
    r.reader._on_line = starttls
    r.reader.feed(b"STARTTLS\r\nMAIL FROM:<a@b>\r\npartial")
    assert r.lines == [b"STARTTLS"] and r.reader.partial == b""
    r.reader.feed(b"EHLO x\r\n")
    assert r.lines == [b"STARTTLS", b"EHLO x"]


def test_nothing_after_stop() -> None:
    r = Recorder()
    r.stopped = True
    r.reader.feed(b"NOOP\r\n")
    assert r.lines == []
