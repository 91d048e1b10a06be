"""Reading SMTP lines: line framing with a bounded buffer, and the queue of pipelined lines.

A line ends at LF; a CR before it is removed.  A line ending in a bare LF is taken as if
it ended in CRLF, as Postfix 3.9 does by default (``smtpd_forbid_bare_newline =
normalize``): sloppy clients work, and nothing is lost to smuggling because the message
body is not read here (``saslsmtp.body`` ends it only at ``CRLF . CRLF``).  Lines keep
their exact ending while they wait in the queue, so a body that arrives before a late
``354`` reaches the body reader byte for byte.

A client may pipeline (RFC 2920): several commands arrive in one read, and their answers
must come back in order even when one of them is answered later (an AUTH step, MAIL
validation, end of DATA).  ``LineReader`` hands over one line at a time; while the
protocol is *busy* further lines wait in ``queue`` and are handed over, in order, when
it releases the reader after writing its reply.

Lines also wait while the client is not reading the replies (``block``: the transport's
write buffer is full).  A client that keeps sending then is flooding: past ``MAX_QUEUED``
lines or ``MAX_QUEUED_BYTES`` waiting, ``on_flood`` is called once and the queue dropped,
so a connection's memory stays bounded whatever the client sends.  No Twisted here: the
protocol feeds bytes and says when it is busy or blocked.
"""

from __future__ import annotations

from typing import Callable

READ_LIMIT = 16384  # longest partial line buffered before it is refused
MAX_QUEUED = 100  # lines waiting while replies are not read before it counts as a flood
MAX_QUEUED_BYTES = 65536  # the same, in octets
OVERLONG = b"<a line longer than READ_LIMIT>"  # handed over in place of such a line; compare by identity
# the same for a line that began "AUTH " (an initial response too big: RFC 4954's 500 5.5.6)
OVERLONG_AUTH = b"<an AUTH line longer than READ_LIMIT>"


class LineReader:
    """Lines (ending in CRLF or a bare LF) from a byte stream, one at a time.

    ``on_line(line)`` gets each line without its CRLF or LF (or ``OVERLONG`` /
    ``OVERLONG_AUTH`` for one too long to buffer); ``stopped()`` says the connection is
    going away (no more lines are handed over); ``on_flood()`` is called when too much
    waits while the replies are not read.
    """

    __slots__ = ("_on_line", "_stopped", "_on_flood", "read_limit", "max_queued",
                 "max_queued_bytes", "partial", "_queue", "_queued_bytes", "_next", "busy",
                 "blocked", "_skip_to_eol", "_discard_rest", "raw",
                 "_feeding")  # one per connection: no __dict__

    def __init__(self, on_line: Callable[[bytes], None],
                 stopped: Callable[[], bool], read_limit: int = READ_LIMIT,
                 on_flood: Callable[[], None] | None = None, max_queued: int = MAX_QUEUED,
                 max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        self._on_line = on_line
        self._stopped = stopped
        self._on_flood = on_flood
        self.read_limit = read_limit
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.partial = b""  # bytes of a line not yet ended
        self._queue: list[bytes] = []  # lines waiting while busy or blocked (CR kept, LF not)
        self._queued_bytes = 0
        self._next = 0  # index of the next queued line to hand over
        self.busy = False
        self.blocked = False  # the client is not reading the replies
        self._skip_to_eol = False  # the rest of an overlong line is still arriving
        self._discard_rest = False  # set during a read: drop what is left of it
        # a message body after 354: raw(bytes) takes every byte and returns what follows
        # the final dot (read as lines again), or None while the body goes on
        self.raw: Callable[[bytes], bytes | None] | None = None
        self._feeding = 0  # inside feed(): the lines of its read from the current one on

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
        count = len(lines)
        for index, line in enumerate(lines):
            if self._stopped() or self._discard_rest:
                break
            self._feeding = count - index
            try:
                self._hand_over(line)
            finally:
                self._feeding = 0
            if self.raw is not None and not self.busy:  # DATA answered 354 at once
                rest = b"\n".join(lines[index + 1:] + [self.partial])
                self.partial = b""
                if rest:  # nothing more in this read: the body starts with the next one
                    self.feed(rest)
                return
        if self._discard_rest:
            self.partial = b""
            self._discard_rest = False
            return
        if len(self.partial) > self.read_limit and not self._stopped():
            marker = OVERLONG_AUTH if self.partial[:5].upper() == b"AUTH " else OVERLONG
            self.partial = b""
            self._skip_to_eol = True
            self._hand_over(marker)  # queued like a line, so replies stay in order

    def _hand_over(self, line: bytes) -> None:
        """``line`` as read (a CR before its LF still there): on to the protocol, or queued."""
        if not (self.busy or self.blocked):
            self._on_line(line[:-1] if line[-1:] == b"\r" else line)
            return
        self._queue.append(line)
        self._queued_bytes += len(line)
        if self.blocked and (len(self._queue) - self._next > self.max_queued
                             or self._queued_bytes > self.max_queued_bytes):
            self.clear()
            self._discard_rest = True
            if self._on_flood is not None:
                self._on_flood()

    def hold(self) -> None:
        """The current line's answer comes later: queue what follows."""
        self.busy = True

    def release(self) -> None:
        """The answer was written: hand over the queued lines (until one holds again)."""
        self.busy = False
        self._drain()

    def block(self) -> None:
        """The client is not reading the replies: queue lines (bounded) until ``unblock``."""
        self.blocked = True

    def unblock(self) -> None:
        """The replies were read: hand over what waited."""
        self.blocked = False
        self._drain()

    def _drain(self) -> None:
        # An index instead of pop(0): a full read of short lines may be waiting.
        while not self.busy and not self.blocked and not self._stopped():
            if self.raw is not None:  # a late 354: what was queued belongs to the body
                if not self._feeding:  # feed() passes the rest of its read on itself
                    self._feed_raw_pending()
                return
            if self._next >= len(self._queue):
                break
            line = self._queue[self._next]
            self._next += 1
            self._queued_bytes -= len(line)
            self._on_line(line[:-1] if line[-1:] == b"\r" else line)
        if self._queue and self._next >= len(self._queue):  # (nothing to clear: no call)
            self.clear()

    @property
    def queue(self) -> list[bytes]:
        """The lines waiting, in order, as they will be handed over (a copy)."""
        return [line[:-1] if line[-1:] == b"\r" else line for line in self._queue[self._next:]]

    def input_waiting(self) -> bool:
        """Did the client send anything beyond the line being answered (the rest of its
        read, a queued line, part of a line)?  A client that waits for each reply where
        it must (RFC 2920: after DATA) never has."""
        return self._feeding > 1 or self._next < len(self._queue) or bool(self.partial)

    def clear(self) -> None:
        """Drop every queued line."""
        self._queue = []
        self._queued_bytes = 0
        self._next = 0

    def _feed_raw_pending(self) -> None:
        """Lines read before a late ``354`` (queued while busy) belong to the body."""
        pending = b"".join(line + b"\n" for line in self._queue[self._next:]
                           if line is not OVERLONG and line is not OVERLONG_AUTH)
        pending += self.partial
        self.clear()
        self.partial = b""
        if pending:
            self.feed(pending)

    def discard_pending(self) -> None:
        """Forget everything read but not yet handled, including the rest of the current
        read (STARTTLS: plaintext sent after it must not count)."""
        self._discard_rest = True
        self.partial = b""
        self.clear()
