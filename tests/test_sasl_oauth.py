"""OAUTHBEARER (RFC 7628) and XOAUTH2 as sans-I/O state machines: RFC and Google vectors."""

from __future__ import annotations

import base64
import json

import pytest

from saslsmtp.sasl.oauth import (
    MALFORMED_OAUTHBEARER,
    MALFORMED_XOAUTH2,
    SPECS,
    TOKEN_VERDICT,
    BearerRequest,
    OAuthBearer,
    TokenVerdict,
    ValidateToken,
    XOAuth2,
    parse_oauthbearer,
    parse_xoauth2,
)
from saslsmtp.sasl.outcome import Accept, MechanismStateError, Reject, Reply, Secret, Session

# RFC 7628 section 4.1 (SMTP variant): success
RFC7628_SUCCESS_B64 = (
    b"bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9NTg3AWF1dGg9QmVhcmVyIHZGOWRmdDRxbVRjMk52"
    b"YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB"
)
RFC7628_SUCCESS = (
    b"n,a=user@example.com,\x01host=server.example.com\x01port=587\x01"
    b"auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
)
RFC7628_TOKEN = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="

# RFC 7628 section 4.3 (IMAP): a discovery request with an empty auth=, and the server's error
RFC7628_43_REQUEST = b"n,a=user@example.com,\x01host=server.example.com\x01port=143\x01auth=\x01\x01"
RFC7628_43_ERROR = (
    b'{"status":"invalid_token","scope":"example_scope",'
    b'"openid-configuration":"https://example.com/.well-known/openid-config"}'
)

# RFC 7628 section 4.4 (SMTP): the error challenge and the client's dummy answer
RFC7628_44_ERROR_B64 = (
    b"eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NoZW1lcyI6ImJlYXJlciBtYWMiLCJzY29wZSI6Imh0dHBzOi8vbWFpbC5leGFtcGxlLmNvbS8ifQ=="
)
RFC7628_44_ERROR = b'{"status":"invalid_token","schemes":"bearer mac","scope":"https://mail.example.com/"}'
CLIENT_ACK_B64 = b"AQ=="
# RFC 7628 section 4.4's initial response is malformed (XOAUTH2-style "user=" in the gs2
# header): the decoded form as the RFC prints it.
RFC7628_44_MALFORMED = (
    b"n,user=someuser@example.com,\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg==\x01\x01"
)

# Google's XOAUTH2 documentation
GOOGLE_XOAUTH2_B64 = (
    b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0"
    b"Q2cBAQ=="
)
GOOGLE_XOAUTH2 = b"user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
GOOGLE_TOKEN = "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"
GOOGLE_ERROR_B64 = (
    b"eyJzdGF0dXMiOiI0MDEiLCJzY2hlbWVzIjoiYmVhcmVyIG1hYyIsInNjb3BlIjoiaHR0cHM6Ly9tYWlsLmdvb2dsZS5jb20vIn0K"
)
GOOGLE_SCOPE = "https://mail.google.com/"

TLS = Session(tls=True, hostname="server.example.com")


def verdict(ok: bool, subject: str | None = None, status: str = "invalid_token", scope: str | None = None) -> Secret:
    """The secret the engine hands back after asking the token validator."""
    return Secret(TOKEN_VERDICT, TokenVerdict(ok, subject, status, scope))


# -- OAUTHBEARER ------------------------------------------------------------------------


def test_rfc7628_success_vector() -> None:
    """RFC 7628 4.1: the token goes to the validator with user, host and port; then 235."""
    assert base64.b64decode(RFC7628_SUCCESS_B64) == RFC7628_SUCCESS
    m = OAuthBearer(TLS)
    assert m.start(RFC7628_SUCCESS) == ValidateToken(
        RFC7628_TOKEN, "user@example.com", "OAUTHBEARER", "server.example.com", 587
    )
    assert m.resume(verdict(True, "user@example.com")) == Accept("user@example.com")


def test_without_initial_response() -> None:
    """Client-first: no initial response -> empty challenge, then the message."""
    m = OAuthBearer(TLS)
    assert m.start(None) == Reply(b"")
    assert isinstance(m.receive(RFC7628_SUCCESS), ValidateToken)
    assert m.resume(verdict(True, "user@example.com")) == Accept("user@example.com")


def test_rfc7628_discovery_error_flow() -> None:
    """RFC 7628 4.3: an empty auth= gets the JSON error at once (exact bytes), then 535 after \\x01."""
    m = OAuthBearer(TLS, scope="example_scope",
                    openid_configuration="https://example.com/.well-known/openid-config")
    assert m.start(RFC7628_43_REQUEST) == Reply(RFC7628_43_ERROR)
    with pytest.raises(MechanismStateError):
        m.resume(verdict(True, "user@example.com"))  # no validation was asked for
    assert m.receive(base64.b64decode(CLIENT_ACK_B64)) == Reject()


def test_rfc7628_invalid_token_flow() -> None:
    """RFC 7628 4.4 flow: a rejected token -> 334 JSON (status, scope), client AQ== -> 535."""
    assert base64.b64decode(RFC7628_44_ERROR_B64) == RFC7628_44_ERROR
    m = OAuthBearer(TLS)
    assert isinstance(m.start(RFC7628_SUCCESS), ValidateToken)
    error = m.resume(verdict(False, scope="https://mail.example.com/"))
    assert error == Reply(b'{"status":"invalid_token","scope":"https://mail.example.com/"}')
    rfc = json.loads(RFC7628_44_ERROR)
    ours = json.loads(error.payload_bytes())
    assert {k: rfc[k] for k in ("status", "scope")} == ours
    assert m.receive(base64.b64decode(CLIENT_ACK_B64)) == Reject()


def test_rfc7628_44_initial_response_is_malformed() -> None:
    """The RFC's 4.4 initial response ("n,user=...") is rejected cleanly, with no token check."""
    m = OAuthBearer(TLS)
    assert m.start(RFC7628_44_MALFORMED) == MALFORMED_OAUTHBEARER
    assert MALFORMED_OAUTHBEARER.code == 535
    with pytest.raises(MechanismStateError):
        m.resume(verdict(True, "someuser@example.com"))


def test_error_round_needs_the_x01() -> None:
    """After the JSON error anything but \\x01 is a malformed response (still 535)."""
    m = OAuthBearer(TLS)
    m.start(RFC7628_SUCCESS)
    m.resume(verdict(False))
    assert m.receive(b"") == MALFORMED_OAUTHBEARER


def test_error_status_and_default_scope() -> None:
    """The verdict's status goes into the JSON; the configured scope is used when the verdict has none."""
    m = OAuthBearer(TLS, scope="mail")
    m.start(RFC7628_SUCCESS)
    assert m.resume(verdict(False, status="insufficient_scope")) == Reply(
        b'{"status":"insufficient_scope","scope":"mail"}'
    )
    m = OAuthBearer(TLS)
    m.start(RFC7628_SUCCESS)
    assert m.resume(verdict(False)) == Reply(b'{"status":"invalid_token"}')


def test_no_validator_opinion_is_invalid_token() -> None:
    """resume(None) (no validator knew the token) is the invalid_token round."""
    m = OAuthBearer(TLS)
    m.start(RFC7628_SUCCESS)
    assert m.resume(None) == Reply(b'{"status":"invalid_token"}')
    assert m.receive(b"\x01") == Reject()


def test_subject_must_match_requested_user() -> None:
    """A valid token for someone else than a= is an invalid_token round, not an Accept."""
    m = OAuthBearer(TLS)
    m.start(RFC7628_SUCCESS)
    assert m.resume(verdict(True, "mallory@example.com")) == Reply(b'{"status":"invalid_token"}')
    assert m.receive(b"\x01") == Reject()


def test_without_authzid_the_subject_is_the_identity() -> None:
    """No a=: the token's subject is the authenticated user; without subject either: fail."""
    message = b"n,,\x01auth=Bearer abc.def-ghi\x01\x01"
    m = OAuthBearer(TLS)
    assert m.start(message) == ValidateToken("abc.def-ghi", "", "OAUTHBEARER")
    assert m.resume(verdict(True, "alice")) == Accept("alice")
    m = OAuthBearer(TLS)
    m.start(message)
    assert m.resume(verdict(True, None)) == Reply(b'{"status":"invalid_token"}')


def test_ok_verdict_without_subject_accepts_requested_user() -> None:
    """The validator got the username with the token; ok without subject accepts a=."""
    m = OAuthBearer(TLS)
    m.start(RFC7628_SUCCESS)
    assert m.resume(verdict(True)) == Accept("user@example.com")


@pytest.mark.parametrize("scheme", [b"Bearer", b"bearer", b"BEARER", b"Bearer  "])
def test_bearer_scheme_is_case_insensitive(scheme: bytes) -> None:
    """The auth scheme name is case-insensitive (RFC 7628 3.1, RFC 6750)."""
    parsed = parse_oauthbearer(b"n,,\x01auth=" + scheme + b" tok\x01\x01")
    assert parsed is not None and parsed.token == "tok"


def test_unknown_keys_are_ignored_and_saslname_decoded() -> None:
    """Unknown keys (mthd, path, ...) are ignored; a= is a saslname (=2C, =3D); y flag allowed."""
    parsed = parse_oauthbearer(b"y,a=a=2Cb=3Dc,\x01mthd=POST\x01path=/x\x01auth=Bearer t\x01\x01")
    assert parsed is not None
    assert (parsed.username, parsed.token, parsed.host, parsed.port) == ("a,b=c", "t", None, None)


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x01",  # kvsep alone: the error acknowledgement, not a request
        b"n,,\x01\x01",  # no auth
        b"p=tls-unique,,\x01auth=Bearer t\x01\x01",  # channel binding is not defined
        b"x,,\x01auth=Bearer t\x01\x01",
        b"n,b=x,\x01auth=Bearer t\x01\x01",
        b"n,a=x=y,\x01auth=Bearer t\x01\x01",
        b"n,,auth=Bearer t\x01\x01",
        b"n,,\x01auth=Bearer t\x01",
        b"n,,\x01auth=Bearer t",
        b"n,,\x01auth=Basic dXNlcjpwYXNz\x01\x01",
        b"n,,\x01auth=Bearer\x01\x01",
        b"n,,\x01auth=Bearer t t\x01\x01",
        b"n,,\x01auth=Bearer t=x\x01\x01",
        b"n,,\x01auth=Bearer t\x01auth=Bearer u\x01\x01",
        b"n,,\x01au th=Bearer t\x01\x01",
        b"n,,\x01a1=x\x01auth=Bearer t\x01\x01",
        b"n,,\x01host\x01auth=Bearer t\x01\x01",
        b"n,,\x01port=58x\x01auth=Bearer t\x01\x01",
        b"n,,\x01port=70000\x01auth=Bearer t\x01\x01",
        b"n,,\x01host=a\x00b\x01auth=Bearer t\x01\x01",
        b"n,a=\xff,\x01auth=Bearer t\x01\x01",
    ],
)
def test_malformed_oauthbearer(message: bytes) -> None:
    """Syntax errors are a Reject without a token check."""
    assert parse_oauthbearer(message) is None
    assert OAuthBearer(TLS).start(message) == MALFORMED_OAUTHBEARER


# -- XOAUTH2 ----------------------------------------------------------------------------


def test_google_xoauth2_vector() -> None:
    """Google's example: token and user go to the validator; 235 on a good verdict."""
    assert base64.b64decode(GOOGLE_XOAUTH2_B64) == GOOGLE_XOAUTH2
    m = XOAuth2(TLS)
    assert m.start(GOOGLE_XOAUTH2) == ValidateToken(GOOGLE_TOKEN, "someuser@example.com", "XOAUTH2")
    assert m.resume(verdict(True, "someuser@example.com")) == Accept("someuser@example.com")


def test_xoauth2_error_flow() -> None:
    """A bad token: 334 {"status":"401","schemes":"bearer","scope":...}, empty line, 535."""
    m = XOAuth2(TLS, scope=GOOGLE_SCOPE)
    m.start(GOOGLE_XOAUTH2)
    error = m.resume(verdict(False))
    assert error == Reply(b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}')
    google = json.loads(base64.b64decode(GOOGLE_ERROR_B64))
    assert google["status"] == "401" and google["scope"] == GOOGLE_SCOPE  # Google writes "bearer mac"
    assert m.receive(b"") == Reject()


def test_xoauth2_error_round_needs_the_empty_line() -> None:
    """XOAUTH2 ends the error round with an empty line; \\x01 is malformed (still 535)."""
    m = XOAuth2(TLS)
    m.start(GOOGLE_XOAUTH2)
    m.resume(verdict(False))
    assert m.receive(b"\x01") == MALFORMED_XOAUTH2


@pytest.mark.parametrize("status, code", [("invalid_token", b"401"), ("insufficient_scope", b"403"),
                                          ("invalid_request", b"400"), ("server_error", b"400")])
def test_xoauth2_status_mapping(status: str, code: bytes) -> None:
    """OAuth error codes map to Google's HTTP-like status as Dovecot does."""
    m = XOAuth2(TLS)
    m.start(GOOGLE_XOAUTH2)
    assert m.resume(verdict(False, status=status)) == Reply(b'{"status":"' + code + b'","schemes":"bearer"}')


def test_xoauth2_subject_mismatch() -> None:
    """A token for another subject than user= fails with the 401 round."""
    m = XOAuth2(TLS)
    m.start(GOOGLE_XOAUTH2)
    assert m.resume(verdict(True, "other@example.com")) == Reply(b'{"status":"401","schemes":"bearer"}')


def test_xoauth2_without_initial_response() -> None:
    """No initial response: empty challenge first."""
    m = XOAuth2(TLS)
    assert m.start(None) == Reply(b"")
    assert isinstance(m.receive(GOOGLE_XOAUTH2), ValidateToken)


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x01\x01",
        b"auth=Bearer t\x01\x01",  # no user
        b"user=u\x01\x01",  # no auth
        b"user=u\x01auth=\x01\x01",  # empty auth
        b"user=\x01auth=Bearer t\x01\x01",
        b"user=u\x01auth=Bearer t\x01",
        b"user=u\x01auth=Bearer t",
        b"user=u\x01auth=Basic dTpw\x01\x01",
        b"n,,user=u\x01auth=Bearer t\x01\x01",
        b"user=u\x01auth=Bearer t\x01user=v\x01\x01",
        b"user=\xff\x01auth=Bearer t\x01\x01",
        b"user=a\x7fb\x01auth=Bearer t\x01\x01",
    ],
)
def test_malformed_xoauth2(message: bytes) -> None:
    """Syntax errors are a Reject without a token check."""
    assert parse_xoauth2(message) is None
    assert XOAuth2(TLS).start(message) == MALFORMED_XOAUTH2


# -- both ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, message", [(OAuthBearer, RFC7628_SUCCESS), (XOAuth2, GOOGLE_XOAUTH2)])
def test_out_of_order_calls_raise(cls: type, message: bytes) -> None:
    """Every call out of order raises MechanismStateError."""
    with pytest.raises(MechanismStateError):
        cls(TLS).receive(message)
    with pytest.raises(MechanismStateError):
        cls(TLS).resume(None)
    m = cls(TLS)
    m.start(message)
    with pytest.raises(MechanismStateError):
        m.start(message)
    with pytest.raises(MechanismStateError):
        m.receive(b"")
    with pytest.raises(MechanismStateError):
        m.resume(Secret("plaintext", "pw"))  # not a token verdict
    assert isinstance(m.resume(verdict(True)), Accept)
    with pytest.raises(MechanismStateError):
        m.resume(verdict(True))
    with pytest.raises(MechanismStateError):
        m.receive(b"")
    failed = cls(TLS)
    failed.start(message)
    failed.resume(verdict(False))
    failed.receive(b"\x01")
    with pytest.raises(MechanismStateError):
        failed.receive(b"")


def test_token_never_in_repr() -> None:
    """Neither the outcome nor the parsed request shows the bearer token."""
    outcome = OAuthBearer(TLS).start(RFC7628_SUCCESS)
    assert RFC7628_TOKEN not in repr(outcome)
    assert "user@example.com" in repr(outcome)
    request = parse_xoauth2(GOOGLE_XOAUTH2)
    assert isinstance(request, BearerRequest) and GOOGLE_TOKEN not in repr(request)


def test_specs_need_tls() -> None:
    """Both are bearer-secret mechanisms: never offered without TLS; client-first."""
    assert [spec.name for spec in SPECS] == ["OAUTHBEARER", "XOAUTH2"]
    for spec in SPECS:
        assert (spec.plaintext, spec.client_first, spec.needs_tls) == (False, True, True)
    assert isinstance(SPECS[0].factory(TLS), OAuthBearer)
    assert isinstance(SPECS[1].factory(TLS), XOAuth2)
