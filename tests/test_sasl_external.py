"""EXTERNAL (RFC 4422 appendix A) over a verified TLS client certificate."""

from __future__ import annotations

import base64

import pytest

from saslsmtp.sasl.codec import decode_response
from saslsmtp.sasl.external import BAD_AUTHZID, MALFORMED, NO_CERTIFICATE, NO_IDENTITY, SPEC, External
from saslsmtp.sasl.outcome import Accept, MechanismStateError, Reject, Reply, Session

CERT = {"identity": "alice@example.com", "subject": "CN=Alice", "email": "alice@example.com"}
WITH_CERT = Session(tls=True, client_certificate=CERT)
# RFC 4954 section 4: "AUTH EXTERNAL =" is the empty initial response
RFC4954_EMPTY_INITIAL = b"="


def test_empty_initial_response_accepts_the_certificate_identity() -> None:
    """AUTH EXTERNAL = (empty authzid): the mapped certificate identity is authenticated."""
    initial = decode_response(RFC4954_EMPTY_INITIAL, initial=True)
    assert initial == b""
    assert External(WITH_CERT).start(initial) == Accept("alice@example.com")


def test_authzid_equal_to_identity_is_accepted() -> None:
    """An authzid that names the certificate identity is fine."""
    assert External(WITH_CERT).start(b"alice@example.com") == Accept("alice@example.com")


def test_other_authzid_is_refused() -> None:
    """Acting as another user is refused (535)."""
    outcome = External(WITH_CERT).start(base64.b64decode(b"Ym9iQGV4YW1wbGUuY29t"))  # bob@example.com
    assert outcome == BAD_AUTHZID
    assert BAD_AUTHZID.code == 535


def test_without_initial_response_sends_empty_challenge() -> None:
    """No initial response: an empty 334, then the client's (empty) answer decides."""
    m = External(WITH_CERT)
    assert m.start(None) == Reply(b"")
    assert m.receive(b"") == Accept("alice@example.com")


@pytest.mark.parametrize("certificate", [None, {}])
def test_no_certificate_is_refused(certificate: dict | None) -> None:
    """No verified certificate: EXTERNAL fails, whatever the authzid."""
    session = Session(tls=True, client_certificate=certificate)
    assert External(session).start(b"") == NO_CERTIFICATE
    assert External(session).start(b"alice@example.com") == NO_CERTIFICATE
    assert NO_CERTIFICATE.code == 535


@pytest.mark.parametrize(
    "certificate",
    [{"subject": "O=No CN"}, {"identity": ""}, {"identity": None}, {"identity": 42}],
)
def test_certificate_without_identity_says_so(certificate: dict) -> None:
    """A verified certificate without the configured identity (no CN, no e-mail SAN):
    EXTERNAL fails naming that, not "No verified client certificate"."""
    session = Session(tls=True, client_certificate=certificate)
    assert External(session).start(b"") == NO_IDENTITY
    assert External(session).start(b"alice@example.com") == NO_IDENTITY
    assert NO_IDENTITY.code == 535 and NO_IDENTITY.reason == "No identity in the client certificate"


@pytest.mark.parametrize("message", [b"alice\x00", b"\xff", b"\x00"])
def test_malformed_authzid(message: bytes) -> None:
    """An authzid that is not UTF-8 or contains NUL is malformed."""
    assert External(WITH_CERT).start(message) == MALFORMED


def test_out_of_order_calls_raise() -> None:
    """Every call out of order raises MechanismStateError; EXTERNAL never looks anything up."""
    with pytest.raises(MechanismStateError):
        External(WITH_CERT).receive(b"")
    with pytest.raises(MechanismStateError):
        External(WITH_CERT).resume(None)
    m = External(WITH_CERT)
    m.start(None)
    with pytest.raises(MechanismStateError):
        m.start(None)
    m.receive(b"")
    with pytest.raises(MechanismStateError):
        m.receive(b"")
    done = External(WITH_CERT)
    done.start(b"")
    with pytest.raises(MechanismStateError):
        done.receive(b"")


def test_spec_needs_tls() -> None:
    """EXTERNAL is client-first, not plaintext, and never offered without TLS."""
    assert SPEC.name == "EXTERNAL"
    assert (SPEC.plaintext, SPEC.client_first, SPEC.needs_tls) == (False, True, True)
    assert isinstance(SPEC.factory(WITH_CERT), External)


def test_each_refusal_has_its_log_reason() -> None:
    """What the fail2ban line says after each refusal: which part was missing; after
    the mechanism's own Accept (the portal refused the identity): not authorized."""
    cases = [(None, b"", "no client certificate"),
             ({"identity": ""}, b"", "no identity in the client certificate"),
             ({"identity": "alice"}, b"bob", "authorization identity not allowed"),
             ({"identity": "alice"}, b"\xff", "malformed EXTERNAL response")]
    for certificate, message, reason in cases:
        mechanism = External(Session(client_certificate=certificate))
        assert isinstance(mechanism.start(message), Reject)
        assert mechanism.failure_reason == reason
    accepted = External(Session(client_certificate={"identity": "alice"}))
    assert isinstance(accepted.start(b""), Accept)
    assert accepted.failure_reason == "identity not authorized"


def test_an_unverified_certificate_is_refused_naming_why() -> None:
    """A certificate that got through the handshake but did not verify: 535 with OpenSSL's
    reason, and the log line's reason says the same."""
    session = Session(tls=True, client_certificate_error="certificate has expired")
    mechanism = External(session)
    outcome = mechanism.start(b"")
    assert outcome == Reject("Client certificate not verified: certificate has expired")
    assert mechanism.failure_reason == "client certificate not verified: certificate has expired"
    malformed = External(session)
    assert malformed.start(b"a\0b") == MALFORMED
    assert malformed.failure_reason == "malformed EXTERNAL response"
