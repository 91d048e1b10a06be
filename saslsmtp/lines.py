"""Reading SMTP lines: CRLF framing with a bounded buffer, and the queue of pipelined lines.

A client may pipeline (RFC 2920): several commands arrive in one read, and their answers
must come back in order even when one of them is answered later (an AUTH step, MAIL
validation, end of DATA).  ``LineReader`` hands over one line at a time; while the
protocol is *busy* further lines wait in ``queue`` and are handed over, in order, when
it releases the reader after writing its reply.  No Twisted here: the protocol feeds
bytes and says when it is busy.
"""

from __future__ import annotations

from typing import Callable

READ_LIMIT = 16384  # longest partial line buffered before it is refused
OVERLONG = b"<a line longer than READ_LIMIT>"  # handed over in place of such a line; compare by identity


class LineReader:
    """CRLF lines from a byte stream, one at a time.

    ``on_line(line)`` gets each line without its CRLF (or ``OVERLONG``); ``on_bare_lf()``
    is called once for a line ending in a bare LF (nothing after it is read);
    ``stopped()`` says the connection is going away (no more lines are handed over).
    """

    def __init__(self, on_line: Callable[[bytes], None], on_bare_lf: Callable[[], None],
                 stopped: Callable[[], bool], read_limit: int = READ_LIMIT) -> None:
        self._on_line = on_line
        self._on_bare_lf = on_bare_lf
        self._stopped = stopped
        self.read_limit = read_limit
        self.partial = b""  # bytes of a line not yet ended
        self.queue: list[bytes] = []  # complete lines waiting while busy
        self.busy = False
        self._skip_to_eol = False  # the rest of an overlong line is still arriving
        self._discard_rest = False  # set during a read: drop what is left of it
        # a message body after 354: raw(bytes) takes every byte and returns what follows
        # the final dot (read as lines again), or None while the body goes on
        self.raw: Callable[[bytes], bytes | None] | None = None
        self._feeding = False

    def feed(self, data: bytes) -> None:
        """Bytes from the transport."""
        if self._stopped():
            return
        if self.raw is not None:
            rest = self.raw(data)
            if rest is None or not rest:
                return
            data = rest
        if self._skip_to_eol:
            end = data.find(b"\n")
            if end < 0:
                return
            data = data[end + 1:]
            self._skip_to_eol = False
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        self._discard_rest = False
        for index, line in enumerate(lines):
            if self._stopped() or self._discard_rest:
                break
            if not line.endswith(b"\r"):
                self._on_bare_lf()
                return
            self._feeding = True
            try:
                self._hand_over(line[:-1])
            finally:
                self._feeding = False
            if self.raw is not None and not self.busy:  # DATA answered 354 at once
                rest = b"\n".join(lines[index + 1:] + [self.partial])
                self.partial = b""
                self.feed(rest)
                return
        if self._discard_rest:
            self.partial = b""
            self._discard_rest = False
            return
        if len(self.partial) > self.read_limit and not self._stopped():
            self.partial = b""
            self._skip_to_eol = True
            self._hand_over(OVERLONG)  # queued like a line, so replies stay in order

    def _hand_over(self, line: bytes) -> None:
        if self.busy:
            self.queue.append(line)
        else:
            self._on_line(line)

    def hold(self) -> None:
        """The current line's answer comes later: queue what follows."""
        self.busy = True

    def release(self) -> None:
        """The answer was written: hand over the queued lines (until one holds again)."""
        self.busy = False
        while not self.busy and not self._stopped():
            if self.raw is not None:
                if not self._feeding:  # feed() passes the rest of its read on itself
                    self._feed_raw_pending()
                return
            if not self.queue:
                return
            self._on_line(self.queue.pop(0))

    def _feed_raw_pending(self) -> None:
        """Lines read before a late ``354`` (queued while busy) belong to the body."""
        pending = b"".join(line + b"\r\n" for line in self.queue if line is not OVERLONG)
        pending += self.partial
        self.queue, self.partial = [], b""
        if pending:
            self.feed(pending)

    def discard_pending(self) -> None:
        """Forget everything read but not yet handled, including the rest of the current
        read (STARTTLS: plaintext sent after it must not count)."""
        self._discard_rest = True
        self.partial = b""
        self.queue = []
