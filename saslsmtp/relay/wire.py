"""The sans-I/O half of the upstream client: bytes in, values out, no Twisted.

* ``ReplyParser`` turns reply lines (``250-...`` / ``250 ...``) into ``UpstreamReply``
  values, refusing anything that is not a reply, a multi-line reply whose lines disagree
  on the code, and replies too long to be honest.
* ``Expected`` says which replies can answer a command (its success codes, or a 4yz/5yz
  failure); the commands the relay sends each have one (``GREETING``, ``MAIL``, ...).
* ``pass_on`` turns an upstream reply into the ``SMTPReply`` *our* client gets: same code,
  the upstream's enhanced code (or ``X.0.0`` from the code's class), the text flattened
  to printable ASCII and bounded, so an upstream cannot inject lines into our session.
* ``xtext`` is RFC 3461 xtext as Postfix's XCLIENT_README wants it for attribute values.
* ``DotStuffer`` turns message bytes in arbitrary chunks into the DATA stream: a leading
  ``.`` doubled on every line, and the terminating ``CRLF.CRLF``.
* ``FirstField`` finds, in arbitrary chunks, where the message's first header field ends:
  the place for a header that must follow the Received header at the top.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from saslsmtp.replies import SMTPReply

MAX_REPLY_LINES = 100       # lines in one multi-line reply (EHLO lists ~15)
MAX_LINE = 4096             # octets in one reply line (RFC 5321 says 512)
MAX_TEXT = 200              # characters of upstream text passed on to our client
MAX_PASSED_LINES = 3        # lines of a multi-line upstream reply passed on

_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -]|$)(.*)$", re.DOTALL)
_ENHANCED = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})$")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


class ProtocolViolation(Exception):
    """The upstream sent something that is not an SMTP reply; the connection is unusable."""


@dataclass(frozen=True)
class UpstreamReply:
    """One complete reply from the upstream: its ``code`` and the text of each line."""

    code: int
    lines: tuple[bytes, ...]

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 code at the start of the first line, if it has one of the right class."""
        first = self.lines[0].split(b" ", 1)[0].decode("ascii", "replace") if self.lines else ""
        match = _ENHANCED.match(first)
        if match and match.group(1) == str(self.code)[0]:
            return first
        return None

    def texts(self) -> list[str]:
        """Each line's text without the enhanced code, as printable ASCII."""
        out = []
        enhanced = self.enhanced
        for raw in self.lines:
            words = raw.split(b" ", 1)
            if enhanced is not None and _ENHANCED.match(words[0].decode("ascii", "replace")):
                raw = words[1] if len(words) > 1 else b""
            out.append(_UNPRINTABLE.sub(" ", raw.decode("ascii", "replace")).strip())
        return out

    def status(self) -> str:
        """``"550 5.1.1"``: for logs (never the free text)."""
        return f"{self.code} {self.enhanced}" if self.enhanced else str(self.code)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    def excerpt(self) -> str:
        """The reply's first line as the upstream wrote it, printable and short: for logs."""
        return shown(b"%d %s" % (self.code, self.lines[0] if self.lines else b""))


def shown(line: bytes) -> str:
    """An upstream line for a log: printable ASCII, at most 100 characters, quoted."""
    text = _UNPRINTABLE.sub("?", line.decode("ascii", "replace"))
    return '"' + (text[:100] + "..." if len(text) > 100 else text) + '"'


@dataclass(frozen=True)
class Expected:
    """The replies that can answer one command (RFC 5321 4.3.2): one of its ``success``
    codes, or a 4yz/5yz failure.  Anything else (a ``354`` to MAIL, a ``250`` to DATA, a
    ``221`` to RCPT) means the upstream lost track of the conversation: acting on it
    would send a message into a session that is not where we think it is."""

    command: str                      # for the log: "MAIL FROM", "end of data", ...
    success: tuple[int, ...] = (250,)

    def allows(self, code: int) -> bool:
        return code in self.success or 400 <= code < 600


GREETING = Expected("the greeting", (220,))
EHLO = Expected("EHLO")
LHLO = Expected("LHLO")
STARTTLS = Expected("STARTTLS", (220,))
XCLIENT = Expected("XCLIENT", (220,))
RSET = Expected("RSET")
MAIL = Expected("MAIL FROM")
RCPT = Expected("RCPT TO", (250, 251))
DATA = Expected("DATA", (354,))
END_OF_DATA = Expected("end of data")
QUIT = Expected("QUIT", (221, 250))


class ReplyParser:
    """Feed it one reply line at a time (without CRLF); complete replies come out."""

    def __init__(self) -> None:
        self._code: bytes | None = None
        self._lines: list[bytes] = []

    def line(self, line: bytes) -> UpstreamReply | None:
        """The reply this line completes, or ``None`` while a multi-line reply goes on.

        Raises ``ProtocolViolation`` for a line that is not part of a reply.
        """
        if len(line) > MAX_LINE:
            raise ProtocolViolation("reply line too long")
        match = _LINE.match(line)
        if match is None:
            raise ProtocolViolation("not an SMTP reply line")
        code, sep, text = match.groups()
        if self._code is not None and code != self._code:
            raise ProtocolViolation("multi-line reply changes its code")
        self._code = code
        self._lines.append(text)
        if sep == b"-":
            if len(self._lines) >= MAX_REPLY_LINES:
                raise ProtocolViolation("reply has too many lines")
            return None
        reply = UpstreamReply(int(code), tuple(self._lines))
        self._code, self._lines = None, []
        return reply


def pass_on(reply: UpstreamReply) -> SMTPReply:
    """The reply our client gets for the upstream's ``reply`` (see the module docstring).

    ``421`` (the upstream closing its session) becomes ``451``: *our* session goes on;
    its enhanced code, of the same class, is kept.
    """
    code = 451 if reply.code == 421 else reply.code
    enhanced = reply.enhanced
    if enhanced is None:
        enhanced = f"{str(code)[0]}.0.0" if code >= 400 or code in range(200, 300) else None
    texts = [t[:MAX_TEXT] for t in reply.texts()[:MAX_PASSED_LINES]] or [""]
    texts = [t or "Upstream reply" for t in texts]
    return SMTPReply(code, enhanced, "\n".join(texts), "upstream")


def xtext(value: str) -> str:
    """RFC 3461 xtext: ``+XX`` for ``+``, ``=``, and everything outside ``!``..``~``.

    Non-ASCII is encoded octet by octet from UTF-8 (Postfix decodes it back the same way).
    """
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (ord("+"), ord("=")):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


class DotStuffer:
    """Message bytes in any chunking -> the DATA stream (RFC 5321 4.5.2).

    The input is the message as our client meant it (dots already un-stuffed, lines
    ending in CRLF).  ``feed`` returns the bytes to send; ``end`` returns the final
    ``CRLF.CRLF`` (adding the missing CRLF if the message did not end with one).
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._last_cr = False
        self.octets = 0

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        self.octets += len(chunk)
        head = b"." if self._at_line_start and chunk[:1] == b"." else b""
        body = chunk.replace(b"\r\n.", b"\r\n..")
        if self._last_cr and chunk[:2] == b"\n.":
            # a CRLF split between chunks: "...\r" + "\n.xyz"
            body = b"\n.." + body[2:]
        self._at_line_start = chunk.endswith(b"\r\n") or (self._last_cr and chunk == b"\n")
        self._last_cr = chunk.endswith(b"\r")
        return head + body

    def end(self) -> bytes:
        if self.octets == 0 or self._at_line_start:
            return b".\r\n"
        return b"\r\n.\r\n"


class FirstField:
    """Where the message's first header field (with its folded lines) ends, across chunks.

    The SMTP server writes its Received header first; RFC 5321 4.4 wants the trace
    fields at the top of the message, so a header the relay adds goes right below it.
    ``find(chunk)`` returns the offset in ``chunk`` where the field has ended (before
    the first octet of the next line, which does not start with SP or HTAB), or
    ``None`` while it goes on; a message that starts with its empty line has no field:
    offset 0.  Input has CRLF line ends (the server's body reader makes them).
    """

    def __init__(self) -> None:
        self._started = False
        self._after_crlf = False  # the last octets seen were a CRLF inside the field
        self._after_cr = False    # a CR was the last octet of the previous chunk

    def find(self, chunk: bytes) -> int | None:
        if not chunk:
            return None
        if not self._started:
            self._started = True
            if chunk[:1] == b"\r":  # the empty line first: no header section
                return 0
        pos = 0
        while True:
            if self._after_crlf:
                if pos >= len(chunk):
                    return None
                if chunk[pos:pos + 1] not in (b" ", b"\t"):
                    return pos
                self._after_crlf = False
            if self._after_cr:
                self._after_cr = False
                if chunk[pos:pos + 1] == b"\n":
                    self._after_crlf = True
                    pos += 1
                    continue
            end = chunk.find(b"\r\n", pos)
            if end < 0:
                self._after_cr = chunk.endswith(b"\r")
                return None
            pos = end + 2
            self._after_crlf = True

    @property
    def at_line_end(self) -> bool:
        """The octets so far end a line (the field may still be folded on)."""
        return self._after_crlf
