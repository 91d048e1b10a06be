"""Reading a message body (after ``354``) in chunks: the end-of-data search and
dot-unstuffing work on whole buffers, never on one Python object per line.

``BodyReader.feed(data)`` takes bytes as they arrive and returns a ``BodyChunk``: the
un-stuffed bytes that can be passed on now, and, once the final ``CRLF . CRLF`` was
seen, ``done`` and the bytes that followed it (the next commands).  At most four bytes
(a possible start of the terminator) are held back between reads, so memory does not
depend on the message or on its line lengths.

SMTP smuggling (CVE-2023-51764 and its kin) lives in the gap between how two servers
end a message.  Here, as in Postfix 3.9 (``smtpd_forbid_bare_newline = normalize``,
``cleanup_replace_stray_cr_lf = yes``):

* only ``CRLF . CRLF`` ends the data: a ``.`` line after or before a bare LF
  (``LF . LF``, ``LF . CRLF``, ``CRLF . LF``) or around a bare CR is message text;
* what is passed on has CRLF line ends only: a bare LF ends a line as CRLF would (dots
  at its start are un-stuffed too), and a stray CR becomes a space,

so a server after us (the relay's upstream, whoever reads the Maildir) cannot find an
end of data, or a line, that we did not.  The fast path (every LF after a CR, every CR
before an LF) costs three ``count`` calls per read.

It also watches a line longer than ``line_limit`` (``overlong``) and the total size
(``size``).  No Twisted here.
"""

from __future__ import annotations

from dataclasses import dataclass

LINE_LIMIT = 16384  # as the command reader's (saslsmtp.lines.READ_LIMIT); 554 5.6.0 beyond
END = b"\r\n.\r\n"
# the suffixes of a buffer held back for the next read, longest first: a possible start
# of END, or a bare LF whose next line may begin with a stuffed dot
_PREFIXES = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r", b"\n")


@dataclass(frozen=True)
class BodyChunk:
    """What one ``feed`` found: ``data`` to pass on now; ``done`` with the ``rest``
    after the final dot."""

    data: bytes
    done: bool = False
    rest: bytes = b""


def canonical(body: bytes) -> bytes:
    """``body`` (raw, its final dot not in it) un-stuffed, with CRLF line ends only: a
    bare LF ends a line, a stray CR is a space (RFC 5321 2.3.8 allows neither)."""
    lines = body.replace(b"\n.", b"\n").replace(b"\r\n", b"\n")
    return lines.replace(b"\r", b" ").replace(b"\n", b"\r\n")


class BodyReader:
    """One message body, from the byte after ``354``'s command line to the final dot."""

    def __init__(self, line_limit: int) -> None:
        self.line_limit = line_limit
        self.size = 0            # un-stuffed octets passed on (CRLF counted)
        self.overlong = False    # a line was longer than line_limit
        self._held = b"\r\n"     # bytes that may start END; begins with a virtual CRLF
        self._virtual = 2        # how many leading bytes of _held were never sent
        self._since_lf = 0       # octets of the current line so far

    def feed(self, data: bytes) -> BodyChunk:
        buffer = self._held + data
        end = buffer.find(END)
        if end >= 0:
            body, rest, held = buffer[:end + 2], buffer[end + len(END):], b""
        else:
            keep = next((len(p) for p in _PREFIXES if buffer.endswith(p)), 0)
            body, rest, held = buffer[:len(buffer) - keep], b"", buffer[len(buffer) - keep:]
        crlf = body.count(b"\r\n")
        if body.count(b"\n") == crlf and body.count(b"\r") == crlf:
            out = body.replace(b"\r\n.", b"\r\n")
        else:
            out = canonical(body)
        if self._virtual:  # the virtual CRLF is CRLF in ``out`` too
            skip = min(self._virtual, len(body))
            out = out[skip:]
            self._virtual -= skip
        self._held = held
        self._watch_lines(out)
        self.size += len(out)
        return BodyChunk(out, done=end >= 0, rest=rest)

    def _watch_lines(self, out: bytes) -> None:
        """Is any line longer than ``line_limit`` (CR included)?  Cheap unless lines
        are long enough to matter."""
        limit = self.line_limit
        if self.overlong:
            return
        first = out.find(b"\n")
        if first < 0:
            self._since_lf += len(out)
        else:
            last = out.rfind(b"\n")
            longest = self._since_lf + first
            if last - first > limit + 1:
                longest = max(longest, max(map(len, out[first + 1:last].split(b"\n"))))
            self._since_lf = len(out) - last - 1
            if longest > limit + 1:
                self.overlong = True
        if self._since_lf > limit + 1:
            self.overlong = True
