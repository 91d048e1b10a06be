"""The one table of SMTP replies saslsmtp sends (RFC 5321, RFC 4954, RFC 3463, RFC 2034,
RFC 6531), and the one mapping from an AUTH outcome to its reply (``auth_reply``).

Every reply with a status code carries its enhanced code.  Tests import this table
instead of repeating the strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property, lru_cache

from saslsmtp.sasl.outcome import Defer, Reject

# Default enhanced codes for a reply class (RFC 3463 section 3.1).
DEFAULT_ENHANCED = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class SMTPReply:
    """One SMTP reply: ``code``, RFC 3463 ``enhanced`` code (or ``None``) and ``text``."""

    code: int
    enhanced: str | None
    text: str
    rfc: str = ""

    def with_text(self, text: str | None) -> "SMTPReply":
        """The same code with another text (``None`` keeps the default)."""
        return self if text is None else SMTPReply(self.code, self.enhanced, text, self.rfc)

    def to_bytes(self) -> bytes:
        """The reply as it goes on the wire, CRLF-terminated, multi-line if needed."""
        return self._wire

    @cached_property
    def _wire(self) -> bytes:
        # rendered once per reply object: the table's replies are sent on every session
        lines = self.text.split("\n") or [""]
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            body = f"{self.enhanced} {line}" if self.enhanced else line
            out.append(f"{self.code}{sep}{body}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")


REPLIES: dict[str, SMTPReply] = {
    # AUTH (RFC 4954)
    "auth_ok": SMTPReply(235, "2.7.0", "Authentication successful", "RFC 4954 s6"),
    "auth_invalid": SMTPReply(535, "5.7.8", "Authentication credentials invalid", "RFC 4954 s6"),
    "auth_tempfail": SMTPReply(454, "4.7.0", "Temporary authentication failure", "RFC 4954 s6"),
    "auth_aborted": SMTPReply(501, "5.7.0", "Authentication aborted", "RFC 4954 s4"),
    "auth_bad_base64": SMTPReply(501, "5.5.2", "Cannot decode response", "RFC 4954 s4"),
    "auth_line_too_long": SMTPReply(500, "5.5.6", "Authentication Exchange line is too long", "RFC 4954 s4"),
    "auth_unknown_mech": SMTPReply(504, "5.5.4", "Unrecognized authentication type", "RFC 4954 s4"),
    "auth_already": SMTPReply(503, "5.5.1", "Already authenticated", "RFC 4954 s4"),
    "auth_in_transaction": SMTPReply(503, "5.5.1", "AUTH not permitted during a mail transaction", "RFC 4954 s4"),
    "auth_need_ehlo": SMTPReply(503, "5.5.1", "Send EHLO first", ""),
    "auth_no_mechanism": SMTPReply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]", "RFC 4954 s4"),
    "auth_unexpected_ir": SMTPReply(501, "5.7.0", "Initial response not allowed for this mechanism", "RFC 4954 s4"),
    "auth_encryption_required": SMTPReply(538, "5.7.11", "Encryption required for requested authentication mechanism", "RFC 4954 s6"),
    "auth_required": SMTPReply(530, "5.7.0", "Authentication required", "RFC 4954 s6"),
    "auth_too_many_failures": SMTPReply(421, "4.7.0", "Too many failed authentication attempts, closing connection", ""),
    # Session (RFC 5321, RFC 3207)
    "ehlo_syntax": SMTPReply(501, "5.5.4", "Syntax: EHLO hostname", "RFC 5321 4.1.1.1"),
    "helo_syntax": SMTPReply(501, "5.5.4", "Syntax: HELO hostname", "RFC 5321 4.1.1.1"),
    "reset": SMTPReply(250, "2.0.0", "Reset state", "RFC 5321 4.1.1.5"),
    "noop": SMTPReply(250, "2.0.0", "OK", "RFC 5321 4.1.1.9"),
    "vrfy": SMTPReply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery", "RFC 5321 3.5.3"),
    "bye": SMTPReply(221, "2.0.0", "Bye", "RFC 5321 4.1.1.10"),
    "unknown_command": SMTPReply(500, "5.5.2", "Command not recognized", "RFC 5321 4.2.4"),
    "bad_syntax": SMTPReply(500, "5.5.2", "Error: bad syntax", "RFC 5321 4.2.4"),
    "line_too_long": SMTPReply(500, "5.5.2", "Line too long", "RFC 5321 4.5.3.1.4"),
    "not_implemented": SMTPReply(502, "5.5.1", "Command not implemented", "RFC 5321 4.2.4"),
    "not_smtp": SMTPReply(421, "4.7.0", "Not an SMTP command, closing connection", "RFC 5321 3.8"),
    "out_of_sync": SMTPReply(421, "4.5.0", "Error: SMTP protocol synchronization, closing connection", "RFC 2920 3.1"),
    "bad_sequence": SMTPReply(503, "5.5.1", "Bad sequence of commands", "RFC 5321 4.2.4"),
    "nested_mail": SMTPReply(503, "5.5.1", "Nested MAIL command", "RFC 5321 4.1.1.2"),
    "need_mail": SMTPReply(503, "5.5.1", "Need MAIL command first", "RFC 5321 4.1.1.3"),
    "need_rcpt": SMTPReply(503, "5.5.1", "Need RCPT command first", "RFC 5321 4.1.1.4"),
    "mail_syntax": SMTPReply(501, "5.5.4", "Syntax: MAIL FROM:<address>", "RFC 5321 4.1.1.2"),
    "rcpt_syntax": SMTPReply(501, "5.5.4", "Syntax: RCPT TO:<address>", "RFC 5321 4.1.1.3"),
    "sender_syntax": SMTPReply(501, "5.1.7", "Bad sender address syntax", "RFC 3463 3.2"),
    "recipient_syntax": SMTPReply(501, "5.1.3", "Bad recipient address syntax", "RFC 3463 3.2"),
    "bad_param": SMTPReply(555, "5.5.4", "Unsupported MAIL/RCPT parameter", "RFC 5321 4.1.1.11"),
    "smtputf8_required": SMTPReply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address", "RFC 6531 3.4"),
    "sender_ok": SMTPReply(250, "2.1.0", "Sender OK", "RFC 3463"),
    "rcpt_ok": SMTPReply(250, "2.1.5", "Recipient OK", "RFC 3463"),
    "too_many_rcpts": SMTPReply(452, "4.5.3", "Too many recipients", "RFC 5321 4.5.3.1.8"),
    "rcpt_rejected": SMTPReply(550, "5.1.1", "Recipient address rejected", "RFC 3463"),
    "sender_rejected": SMTPReply(553, "5.1.7", "Sender address rejected", "RFC 3463"),
    "data_start": SMTPReply(354, None, "End data with <CR><LF>.<CR><LF>", "RFC 5321 4.1.1.4"),
    "data_args": SMTPReply(501, "5.5.4", "Syntax: DATA", "RFC 5321 4.1.1.4"),
    "message_accepted": SMTPReply(250, "2.0.0", "OK: queued", "RFC 5321"),
    "message_too_big": SMTPReply(552, "5.3.4", "Message size exceeds fixed maximum message size", "RFC 1870"),
    "message_line_too_long": SMTPReply(554, "5.6.0", "Message contains a line longer than 16384 octets", "RFC 5321 4.5.3.1.6"),
    "local_error": SMTPReply(451, "4.3.0", "Local error in processing; try again later", "RFC 3463"),
    "starttls_go": SMTPReply(220, "2.0.0", "Ready to start TLS", "RFC 3207"),
    "starttls_unavailable": SMTPReply(454, "4.7.0", "TLS not available", "RFC 3207"),
    "starttls_already": SMTPReply(503, "5.5.1", "TLS already active", "RFC 3207"),
    "starttls_args": SMTPReply(501, "5.5.4", "Syntax: STARTTLS", "RFC 3207"),
    "timeout": SMTPReply(421, "4.4.2", "Timeout exceeded, closing connection", "RFC 3463"),
    "shutting_down": SMTPReply(421, "4.3.2", "Service shutting down, closing connection", "RFC 3463"),
    "kicked": SMTPReply(421, "4.7.0", "Session closed by the administrator, closing connection", "RFC 3463"),
    # Onward delivery and sender policy (saslsmtp.relay, saslsmtp.senders)
    "sender_not_owned": SMTPReply(553, "5.7.1", "Sender address rejected: not owned by user", "RFC 3463"),
    "upstream_unavailable": SMTPReply(451, "4.4.1", "Upstream server unavailable, try again later", "RFC 3463"),
    "upstream_timeout": SMTPReply(451, "4.4.2", "Upstream server did not answer in time, try again later", "RFC 3463"),
    "upstream_lost": SMTPReply(451, "4.4.2", "Upstream connection lost, try again later", "RFC 3463"),
    "upstream_error": SMTPReply(451, "4.5.0", "Upstream protocol error, try again later", "RFC 3463"),
    "upstream_no_smtputf8": SMTPReply(553, "5.6.7", "The upstream server does not support SMTPUTF8 for this address", "RFC 6531 3.4"),
    "upstream_no_smtputf8_header": SMTPReply(554, "5.6.7", "Message has UTF-8 header fields and the upstream server does not support SMTPUTF8", "RFC 6531 3.4"),
    "upstream_no_8bitmime": SMTPReply(554, "5.6.3", "Message has 8-bit content and the upstream server does not support 8BITMIME", "RFC 6152"),
}


def clean_text(text: str | bytes) -> str:
    """Reply text that cannot break the SMTP framing: printable ASCII, one line."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    cleaned = "".join(c if " " <= c <= "~" else " " for c in text)
    return " ".join(cleaned.split())[:400]


def auth_reply(outcome: Reject | Defer) -> SMTPReply:
    """The reply for a failed AUTH exchange, whoever decided it (mechanism, backend, script).

    The code stays in the class of the default (5xx for ``Reject``, 4xx for ``Defer``), the
    enhanced code matches it, and CR/LF or non-ASCII in the reason cannot break the framing.
    """
    base = REPLIES["auth_invalid"] if isinstance(outcome, Reject) else REPLIES["auth_tempfail"]
    code, enhanced, reason = outcome.code, outcome.enhanced, outcome.reason
    text = base.text if reason is None else (clean_text(reason) or base.text)
    if not isinstance(code, int) or code // 100 != base.code // 100 or not 400 <= code <= 599:
        code = base.code
    if not isinstance(enhanced, str) or not _ENHANCED.match(enhanced) or enhanced[0] != str(code)[0]:
        enhanced = base.enhanced if code == base.code else DEFAULT_ENHANCED[code // 100]
    return SMTPReply(code, enhanced, text)


@lru_cache(maxsize=64)
def ehlo_reply(hostname: str, max_size: int, starttls: bool, mechanisms: tuple[str, ...]) -> SMTPReply:
    """The EHLO reply (RFC 5321 s4.1.1.1): our name, then the extensions we serve.  The
    same few replies go out on every session, so each is built (and rendered) once."""
    lines = [hostname, "PIPELINING", f"SIZE {max_size}", "8BITMIME", "ENHANCEDSTATUSCODES",
             "SMTPUTF8"]
    if starttls:
        lines.append("STARTTLS")
    if mechanisms:
        lines.append("AUTH " + " ".join(mechanisms))
    return SMTPReply(250, None, "\n".join(lines))


def auth_success_reply(text: str | None) -> SMTPReply:
    """235 2.7.0, with the reason an ``Accept`` gave (cleaned) instead of the default text."""
    return REPLIES["auth_ok"].with_text(clean_text(text) if text else None)
