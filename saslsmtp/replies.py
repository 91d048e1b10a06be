"""The one table of SMTP replies saslsmtp sends (RFC 5321, RFC 4954, RFC 3463, RFC 2034).

Every reply with a status code carries its enhanced code.  Tests import this table
instead of repeating the strings.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: ``code``, RFC 3463 ``enhanced`` code (or ``None``) and ``text``."""

    code: int
    enhanced: str | None
    text: str
    rfc: str = ""

    def with_text(self, text: str | None) -> "Reply":
        """The same code with another text (``None`` keeps the default)."""
        return self if text is None else Reply(self.code, self.enhanced, text, self.rfc)

    def line_text(self) -> str:
        """The text after the code: ``"2.7.0 Authentication successful"``."""
        return f"{self.enhanced} {self.text}" if self.enhanced else self.text

    def to_bytes(self) -> bytes:
        """The reply as it goes on the wire, CRLF-terminated, multi-line if needed."""
        lines = self.text.split("\n") or [""]
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            body = f"{self.enhanced} {line}" if self.enhanced else line
            out.append(f"{self.code}{sep}{body}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")


def R(code: int, enhanced: str | None, text: str, rfc: str = "") -> Reply:
    return Reply(code, enhanced, text, rfc)


REPLIES: dict[str, Reply] = {
    # AUTH (RFC 4954)
    "auth_ok": R(235, "2.7.0", "Authentication successful", "RFC 4954 s6"),
    "auth_invalid": R(535, "5.7.8", "Authentication credentials invalid", "RFC 4954 s6"),
    "auth_tempfail": R(454, "4.7.0", "Temporary authentication failure", "RFC 4954 s6"),
    "auth_aborted": R(501, "5.7.0", "Authentication aborted", "RFC 4954 s4"),
    "auth_bad_base64": R(501, "5.5.2", "Cannot decode response", "RFC 4954 s4"),
    "auth_line_too_long": R(500, "5.5.6", "Authentication Exchange line is too long", "RFC 4954 s4"),
    "auth_unknown_mech": R(504, "5.5.4", "Unrecognized authentication type", "RFC 4954 s4"),
    "auth_already": R(503, "5.5.1", "Already authenticated", "RFC 4954 s4"),
    "auth_in_transaction": R(503, "5.5.1", "AUTH not permitted during a mail transaction", "RFC 4954 s4"),
    "auth_need_ehlo": R(503, "5.5.1", "Send EHLO first", ""),
    "auth_no_mechanism": R(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]", "RFC 4954 s4"),
    "auth_unexpected_ir": R(501, "5.7.0", "Initial response not allowed for this mechanism", "RFC 4954 s4"),
    "auth_encryption_required": R(538, "5.7.11", "Encryption required for requested authentication mechanism", "RFC 4954 s6"),
    "auth_required": R(530, "5.7.0", "Authentication required", "RFC 4954 s6"),
    "auth_too_many_failures": R(421, "4.7.0", "Too many failed authentication attempts, closing connection", ""),
    # Session (RFC 5321, RFC 3207)
    "ehlo_syntax": R(501, "5.5.4", "Syntax: EHLO hostname", "RFC 5321 4.1.1.1"),
    "helo_syntax": R(501, "5.5.4", "Syntax: HELO hostname", "RFC 5321 4.1.1.1"),
    "ok": R(250, "2.0.0", "OK", "RFC 5321"),
    "reset": R(250, "2.0.0", "Reset state", "RFC 5321 4.1.1.5"),
    "noop": R(250, "2.0.0", "OK", "RFC 5321 4.1.1.9"),
    "vrfy": R(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery", "RFC 5321 3.5.3"),
    "bye": R(221, "2.0.0", "Bye", "RFC 5321 4.1.1.10"),
    "unknown_command": R(500, "5.5.2", "Command not recognized", "RFC 5321 4.2.4"),
    "bad_syntax": R(500, "5.5.2", "Error: bad syntax", "RFC 5321 4.2.4"),
    "line_too_long": R(500, "5.5.2", "Line too long", "RFC 5321 4.5.3.1.4"),
    "bare_lf": R(500, "5.5.2", "Bare LF is not allowed; lines end with CRLF", "RFC 5321 2.3.8"),
    "bad_sequence": R(503, "5.5.1", "Bad sequence of commands", "RFC 5321 4.2.4"),
    "nested_mail": R(503, "5.5.1", "Nested MAIL command", "RFC 5321 4.1.1.2"),
    "need_mail": R(503, "5.5.1", "Need MAIL command first", "RFC 5321 4.1.1.3"),
    "need_rcpt": R(503, "5.5.1", "Need RCPT command first", "RFC 5321 4.1.1.4"),
    "mail_syntax": R(501, "5.5.4", "Syntax: MAIL FROM:<address>", "RFC 5321 4.1.1.2"),
    "rcpt_syntax": R(501, "5.5.4", "Syntax: RCPT TO:<address>", "RFC 5321 4.1.1.3"),
    "bad_param": R(555, "5.5.4", "Unsupported MAIL/RCPT parameter", "RFC 5321 4.1.1.11"),
    "sender_ok": R(250, "2.1.0", "Sender OK", "RFC 3463"),
    "rcpt_ok": R(250, "2.1.5", "Recipient OK", "RFC 3463"),
    "too_many_rcpts": R(452, "4.5.3", "Too many recipients", "RFC 5321 4.5.3.1.8"),
    "rcpt_rejected": R(550, "5.1.1", "Recipient address rejected", "RFC 3463"),
    "sender_rejected": R(553, "5.1.7", "Sender address rejected", "RFC 3463"),
    "data_start": R(354, None, "End data with <CR><LF>.<CR><LF>", "RFC 5321 4.1.1.4"),
    "data_args": R(501, "5.5.4", "Syntax: DATA", "RFC 5321 4.1.1.4"),
    "message_accepted": R(250, "2.0.0", "OK: queued", "RFC 5321"),
    "message_too_big": R(552, "5.3.4", "Message size exceeds fixed maximum message size", "RFC 1870"),
    "message_too_big_announced": R(552, "5.3.4", "Message size exceeds fixed maximum message size", "RFC 1870"),
    "message_line_too_long": R(554, "5.6.0", "Message contains a line longer than 16384 octets", "RFC 5321 4.5.3.1.6"),
    "local_error": R(451, "4.3.0", "Local error in processing; try again later", "RFC 3463"),
    "starttls_go": R(220, "2.0.0", "Ready to start TLS", "RFC 3207"),
    "starttls_unavailable": R(454, "4.7.0", "TLS not available", "RFC 3207"),
    "starttls_already": R(503, "5.5.1", "TLS already active", "RFC 3207"),
    "starttls_args": R(501, "5.5.4", "Syntax: STARTTLS", "RFC 3207"),
    "timeout": R(421, "4.4.2", "Timeout exceeded, closing connection", "RFC 3463"),
    "shutting_down": R(421, "4.3.2", "Service shutting down, closing connection", "RFC 3463"),
    # Onward delivery and sender policy (saslsmtp.relay, saslsmtp.senders)
    "sender_not_owned": R(553, "5.7.1", "Sender address rejected: not owned by user", "RFC 3463"),
    "upstream_unavailable": R(451, "4.4.1", "Upstream server unavailable, try again later", "RFC 3463"),
    "upstream_timeout": R(451, "4.4.2", "Upstream server did not answer in time, try again later", "RFC 3463"),
    "upstream_lost": R(451, "4.4.2", "Upstream connection lost, try again later", "RFC 3463"),
    "upstream_error": R(451, "4.4.0", "Upstream server misbehaved, try again later", "RFC 3463"),
}
