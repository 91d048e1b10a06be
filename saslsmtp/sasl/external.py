"""EXTERNAL (RFC 4422 appendix A): the identity comes from the verified TLS client certificate.

One client message, the authorization identity in UTF-8 (empty: "the identity of my
credentials").  ``Session.client_certificate["identity"]`` is the name the engine mapped
from the certificate (CN or e-mail SAN, per configuration); without it EXTERNAL fails,
and the reply says which was missing: a certificate, a name in it, or its verification
(``Session.client_certificate_error``: expired, another CA's ...).
"""

from __future__ import annotations

from saslsmtp.sasl.mechanism import MechanismSpec, SingleMessage
from saslsmtp.sasl.outcome import Accept, Outcome, Reject, Session

MALFORMED = Reject("Malformed EXTERNAL response")
NO_CERTIFICATE = Reject("No verified client certificate")
NO_IDENTITY = Reject("No identity in the client certificate")
BAD_AUTHZID = Reject("Not authorized to requested authorization identity")


def unverified(error: str) -> Reject:
    """The refusal of a certificate that did not verify, naming why (OpenSSL's words)."""
    return Reject(f"Client certificate not verified: {error}")


#: The log line's reason for each refusal; after an ``Accept``, a refusal came from the
#: portal (the identity is not a known user): "identity not authorized".
LOG_REASONS = {MALFORMED: "malformed EXTERNAL response", NO_CERTIFICATE: "no client certificate",
               NO_IDENTITY: "no identity in the client certificate",
               BAD_AUTHZID: "authorization identity not allowed"}


class External(SingleMessage):
    """Client-first: without an initial response the server sends an empty challenge."""

    name = "EXTERNAL"

    def __init__(self, session: Session | None = None) -> None:
        session = session or Session()
        certificate = session.client_certificate
        identity = certificate.get("identity") if certificate else None
        self._identity = identity if isinstance(identity, str) and identity else None
        self._missing = NO_IDENTITY if certificate else NO_CERTIFICATE
        self._missing_reason = LOG_REASONS[self._missing]
        error = session.client_certificate_error
        if not certificate and error:
            self._missing = unverified(error)
            self._missing_reason = f"client certificate not verified: {error}"
        self.failure_reason = "identity not authorized"
        super().__init__(session)

    def _first(self, message: bytes) -> Outcome:
        self._stage = "done"
        outcome = self._judge(message)
        if isinstance(outcome, Reject):
            reason = LOG_REASONS.get(outcome)
            self.failure_reason = reason if reason is not None else self._missing_reason
        return outcome

    def _judge(self, message: bytes) -> Outcome:
        try:
            authzid = message.decode("utf-8")
        except UnicodeDecodeError:
            return MALFORMED
        if "\0" in authzid:
            return MALFORMED
        if self._identity is None:
            return self._missing
        if authzid and authzid != self._identity:
            return BAD_AUTHZID
        return Accept(self._identity)


SPEC = MechanismSpec("EXTERNAL", External, plaintext=False, client_first=True, needs_tls=True,
                     client_certificate=True)
