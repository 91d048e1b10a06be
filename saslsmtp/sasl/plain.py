"""PLAIN (RFC 4616): one client message ``[authzid] NUL authcid NUL passwd``."""

from __future__ import annotations

from saslsmtp.sasl.mechanism import MechanismSpec, SingleMessage
from saslsmtp.sasl.outcome import Outcome, Reject, Verify

MAX_FIELD = 255 * 4  # RFC 4616 asks for at least 255 octets per field; allow UTF-8 slack

MALFORMED = Reject("Malformed PLAIN response")
BAD_AUTHZID = Reject("Not authorized to requested authorization identity")


class Plain(SingleMessage):
    """Client-first: without an initial response the server sends an empty challenge."""

    name = "PLAIN"

    def _first(self, message: bytes) -> Outcome:
        self._stage = "done"
        parts = message.split(b"\0")
        if len(parts) != 3:
            return MALFORMED
        try:
            authzid, authcid, passwd = (p.decode("utf-8") for p in parts)
        except UnicodeDecodeError:
            return MALFORMED
        if not authcid or any(len(p) > MAX_FIELD for p in parts):
            return MALFORMED
        if authzid and authzid != authcid:
            return BAD_AUTHZID
        return Verify(authcid, passwd, authzid)


SPEC = MechanismSpec("PLAIN", Plain, plaintext=True, client_first=True, password=True)
