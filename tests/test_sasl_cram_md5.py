"""CRAM-MD5 (RFC 2195) as a sans-I/O state machine: vectors, stored contexts, bad input."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import select
import smtplib
import subprocess

import pytest

from tests.conftest import require_binary

from saslsmtp.sasl import cram_md5
from saslsmtp.sasl.cram_md5 import (
    MALFORMED,
    SPEC,
    CramMD5,
    cram_md5_context,
    digest_from_context,
    digest_from_password,
)
from saslsmtp.sasl.outcome import Accept, Defer, Lookup, MechanismStateError, Reject, Reply, Secret, Session

# RFC 2195 section 2
RFC2195_USER = "tim"
RFC2195_SECRET = "tanstaaftanstaaf"
RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_CHALLENGE_B64 = b"PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+"
RFC2195_DIGEST = "b913a602c7eda7a495b4e6e7334d3890"
RFC2195_RESPONSE_B64 = b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"

# RFC 4954 section 4 example (no password given: only the syntax can be checked)
RFC4954_CHALLENGE_B64 = b"PDQxOTI5NDIzNDEuMTI4Mjg0NzJAc291cmNlZm91ci5hbmRyZXcuY211LmVkdT4="
RFC4954_RESPONSE_B64 = b"cmpzMyBlYzNhNTlmZWQzOTVhYmExZWM2MzY3YzRmNGI0MWFjMA=="

# Dovecot's {CRAM-MD5} for password "test" (Dovecot test suite)
DOVECOT_TEST_CONTEXT = "e02d374fde0dc75a17a557039a3a5338c7743304777dccd376f332bee68d2cf6"
# `doveadm pw -s CRAM-MD5 -p pppp...` (100 x "p", longer than an HMAC block), Dovecot 2.x
DOVECOT_LONG_PASSWORD = "p" * 100
DOVECOT_LONG_CONTEXT = "3476eea92dcd1a29c01d8d24ada8d288c5166ab80fad6aa10080278845c5e2d0"

KINDS = ("cram-md5", "plaintext")


def rfc2195_mechanism() -> CramMD5:
    """A CRAM-MD5 exchange whose challenge is exactly the RFC 2195 one."""
    session = Session(hostname="postoffice.reston.mci.net")
    return CramMD5(session, random=lambda: 1896, clock=lambda: 697170952.9)


def test_rfc2195_challenge_is_exact() -> None:
    """With injected random and time the challenge is the RFC's, byte for byte."""
    outcome = rfc2195_mechanism().start(None)
    assert outcome == Reply(RFC2195_CHALLENGE)
    assert base64.b64encode(outcome.payload_bytes()) == RFC2195_CHALLENGE_B64


def test_rfc2195_vector_with_plaintext() -> None:
    """The RFC 2195 transcript succeeds against the stored plaintext."""
    mech = rfc2195_mechanism()
    mech.start(None)
    assert mech.receive(base64.b64decode(RFC2195_RESPONSE_B64)) == Lookup(RFC2195_USER, KINDS)
    assert mech.resume(Secret("plaintext", RFC2195_SECRET)) == Accept(RFC2195_USER)


def test_rfc2195_vector_with_stored_context() -> None:
    """The RFC 2195 transcript succeeds against the {CRAM-MD5} context of the secret."""
    mech = rfc2195_mechanism()
    mech.start(None)
    mech.receive(base64.b64decode(RFC2195_RESPONSE_B64))
    assert mech.resume(Secret("cram-md5", cram_md5_context(RFC2195_SECRET))) == Accept(RFC2195_USER)


def test_rfc2195_digest_both_ways() -> None:
    """The RFC digest comes out of both the plaintext HMAC and the context continuation."""
    assert digest_from_password(RFC2195_SECRET, RFC2195_CHALLENGE) == RFC2195_DIGEST
    assert digest_from_context(cram_md5_context(RFC2195_SECRET), RFC2195_CHALLENGE) == RFC2195_DIGEST


def test_dovecot_context_vectors() -> None:
    """cram_md5_context reproduces Dovecot's {CRAM-MD5} for "test" and for a >64-byte password."""
    assert cram_md5_context("test") == DOVECOT_TEST_CONTEXT
    assert cram_md5_context(DOVECOT_LONG_PASSWORD) == DOVECOT_LONG_CONTEXT


@pytest.mark.parametrize(
    "password, context",
    [("test", DOVECOT_TEST_CONTEXT), (DOVECOT_LONG_PASSWORD, DOVECOT_LONG_CONTEXT)],
)
def test_client_response_from_plaintext_verifies_against_dovecot_context(password: str, context: str) -> None:
    """A response computed by a client from the plaintext (stdlib hmac) is accepted
    against Dovecot's stored context, and a response from another password is not."""
    mech = CramMD5(Session(hostname="mx.example.org"), random=lambda: 42, clock=lambda: 1700000000)
    challenge = mech.start(None).payload_bytes()
    assert challenge == b"<42.1700000000@mx.example.org>"
    digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
    assert mech.receive(b"user " + digest.encode()) == Lookup("user", KINDS)
    assert mech.resume(Secret("cram-md5", context)) == Accept("user")

    wrong = CramMD5(Session(hostname="mx.example.org"), random=lambda: 42, clock=lambda: 1700000000)
    wrong.start(None)
    bad = hmac.new(b"tesT", challenge, hashlib.md5).hexdigest()
    wrong.receive(b"user " + bad.encode())
    assert wrong.resume(Secret("cram-md5", context)) == Reject()


@pytest.mark.parametrize("length", [0, 1, 55, 56, 63, 64, 65, 119, 120, 200])
def test_md5_continuation_matches_hashlib(length: int) -> None:
    """The pure-Python MD5 from the initial state equals hashlib.md5 around every padding edge."""
    data = bytes(range(256))[:length] if length <= 256 else b"x" * length
    assert cram_md5._md5_continue(cram_md5._IV, data, 0) == hashlib.md5(data).digest()
    # continuing after one block equals hashing the whole
    block = b"\xa5" * 64
    state = cram_md5._compress(cram_md5._IV, block)
    assert cram_md5._md5_continue(state, data, 64) == hashlib.md5(block + data).digest()


def test_rfc4954_example_response_parses() -> None:
    """The RFC 4954 example response is well-formed: it asks for user rjs3's secret."""
    challenge = base64.b64decode(RFC4954_CHALLENGE_B64)
    assert challenge == b"<4192942341.12828472@sourcefour.andrew.cmu.edu>"
    mech = CramMD5(Session(hostname="sourcefour.andrew.cmu.edu"), random=lambda: 4192942341, clock=lambda: 12828472)
    assert mech.start(None) == Reply(challenge)
    assert mech.receive(base64.b64decode(RFC4954_RESPONSE_B64)) == Lookup("rjs3", KINDS)
    assert mech.resume(Secret("plaintext", "not-the-password")) == Reject()


def test_wrong_password_is_rejected() -> None:
    """The RFC transcript fails against another password (plaintext and context)."""
    for secret in (Secret("plaintext", "tanstaaf"), Secret("cram-md5", DOVECOT_TEST_CONTEXT)):
        mech = rfc2195_mechanism()
        mech.start(None)
        mech.receive(base64.b64decode(RFC2195_RESPONSE_B64))
        assert mech.resume(secret) == Reject()


def test_unknown_user_is_rejected() -> None:
    """resume(None) (no such user or no usable secret) is the ordinary 535."""
    mech = rfc2195_mechanism()
    mech.start(None)
    mech.receive(base64.b64decode(RFC2195_RESPONSE_B64))
    assert mech.resume(None) == Reject()


def test_user_name_with_space_uses_last_space() -> None:
    """The digest is after the last space; the user name may contain spaces."""
    mech = rfc2195_mechanism()
    mech.start(None)
    digest = digest_from_password("pw", RFC2195_CHALLENGE)
    assert mech.receive(b"John Doe " + digest.encode()) == Lookup("John Doe", KINDS)
    assert mech.resume(Secret("plaintext", "pw")) == Accept("John Doe")


@pytest.mark.parametrize(
    "response",
    [
        b"",
        b"tim",
        b"timb913a602c7eda7a495b4e6e7334d3890",
        b" b913a602c7eda7a495b4e6e7334d3890",
        b"tim B913A602C7EDA7A495B4E6E7334D3890",  # RFC 2195: lowercase hex
        b"tim b913a602c7eda7a495b4e6e7334d389",  # 31 digits
        b"tim b913a602c7eda7a495b4e6e7334d38900",  # 33 digits
        b"tim b913a602c7eda7a495b4e6e7334d3890 ",
        b"tim b913a602c7eda7a495b4e6e7334d3890\r\n",
        b"t\x00m b913a602c7eda7a495b4e6e7334d3890",
        b"t\nm b913a602c7eda7a495b4e6e7334d3890",
        b"\xfftim b913a602c7eda7a495b4e6e7334d3890",
    ],
)
def test_malformed_response_is_rejected(response: bytes) -> None:
    """Anything but ``user SP 32-lowercase-hex`` is a Reject, and no Lookup happens."""
    mech = rfc2195_mechanism()
    mech.start(None)
    assert mech.receive(response) == MALFORMED
    assert MALFORMED.code == 535
    with pytest.raises(MechanismStateError):
        mech.resume(Secret("plaintext", RFC2195_SECRET))


@pytest.mark.parametrize("value", ["e02d", "z" * 64, DOVECOT_TEST_CONTEXT + "00", 1234])
def test_malformed_stored_context_defers(value: object) -> None:
    """A stored {CRAM-MD5} that is not 64 hex digits is a server problem: 454, not 535."""
    mech = rfc2195_mechanism()
    mech.start(None)
    mech.receive(base64.b64decode(RFC2195_RESPONSE_B64))
    assert mech.resume(Secret("cram-md5", value)) == Defer()


def test_unrequested_secret_kind_is_a_state_error() -> None:
    """A secret kind CRAM-MD5 did not ask for is the engine's bug."""
    mech = rfc2195_mechanism()
    mech.start(None)
    mech.receive(base64.b64decode(RFC2195_RESPONSE_B64))
    with pytest.raises(MechanismStateError):
        mech.resume(Secret("scram-sha-256", (4096, b"s", b"k", b"k")))


def test_default_challenge_shape_and_freshness() -> None:
    """Without injection the challenge is ``<digits.digits@hostname>`` and differs per exchange."""
    session = Session(hostname="mail.example.net")
    first = CramMD5(session).start(None).payload_bytes()
    second = CramMD5(session).start(None).payload_bytes()
    assert re.fullmatch(rb"<[0-9]+\.[0-9]+@mail\.example\.net>", first)
    assert first != second


def test_out_of_order_calls_raise() -> None:
    """Every call out of order raises MechanismStateError."""
    with pytest.raises(MechanismStateError):
        rfc2195_mechanism().receive(b"tim " + RFC2195_DIGEST.encode())
    with pytest.raises(MechanismStateError):
        rfc2195_mechanism().resume(None)
    with pytest.raises(MechanismStateError):
        rfc2195_mechanism().start(b"tim " + RFC2195_DIGEST.encode())  # server-first: engine says 501
    mech = rfc2195_mechanism()
    mech.start(None)
    with pytest.raises(MechanismStateError):
        mech.start(None)
    with pytest.raises(MechanismStateError):
        mech.resume(None)
    mech.receive(base64.b64decode(RFC2195_RESPONSE_B64))
    with pytest.raises(MechanismStateError):
        mech.receive(b"again")
    assert mech.resume(Secret("plaintext", RFC2195_SECRET)) == Accept(RFC2195_USER)
    with pytest.raises(MechanismStateError):
        mech.resume(Secret("plaintext", RFC2195_SECRET))
    with pytest.raises(MechanismStateError):
        mech.receive(b"")


def test_spec_is_server_first() -> None:
    """CRAM-MD5 is offered without TLS, is not plaintext, and refuses an initial response."""
    assert SPEC.name == "CRAM-MD5"
    assert (SPEC.plaintext, SPEC.client_first, SPEC.needs_tls) == (False, False, False)
    assert isinstance(SPEC.factory(Session()), CramMD5)


def test_secret_never_in_repr() -> None:
    """The stored secret does not show in the repr of what the engine handles."""
    assert "tanstaaf" not in repr(Secret("plaintext", RFC2195_SECRET))
    assert DOVECOT_TEST_CONTEXT not in repr(Secret("cram-md5", DOVECOT_TEST_CONTEXT))


# -- real clients: Python's smtplib and GNU SASL (Debian package gsasl) ----------------------


def test_smtplib_client_response_verifies_against_context() -> None:
    """smtplib's own CRAM-MD5 answer (SMTP.auth_cram_md5) is accepted against the stored context."""
    client = smtplib.SMTP()
    client.user, client.password = "user", "test"
    mech = CramMD5(Session(hostname="mx.example.org"))
    challenge = mech.start(None).payload_bytes()
    response = client.auth_cram_md5(challenge).encode()
    assert mech.receive(response) == Lookup("user", KINDS)
    assert mech.resume(Secret("cram-md5", DOVECOT_TEST_CONTEXT)) == Accept("user")


GSASL_PROMPT = b"Enter base64 authentication data from server (press RET if none):\n"


def gsasl_binary() -> str:
    """The gsasl executable; in CI its absence is a failure, elsewhere a skip."""
    return require_binary("gsasl")


def gsasl_cram_md5(password: str, secret: Secret) -> object:
    """Drive ``gsasl --client --mechanism CRAM-MD5`` through one exchange; the final outcome."""
    proc = subprocess.Popen(
        [gsasl_binary(), "--client", "--mechanism", "CRAM-MD5", "-a", "user", "-p", password],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    mech = CramMD5(Session(hostname="mx.example.org"))
    buf = b""
    try:
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 10)
            assert ready, f"gsasl hangs: {buf!r}"
            chunk = os.read(proc.stdout.fileno(), 4096)  # type: ignore[union-attr]
            assert chunk, f"gsasl exited: {buf!r}"
            buf += chunk
            if not buf.endswith(GSASL_PROMPT):
                continue
            sent = re.findall(rb"Output from client:\n(.*)\n", buf)
            buf = b""
            if mech.challenge == b"":  # server-first: gsasl offers an empty initial output
                assert sent in ([], [b""]), sent
                outcome = mech.start(None)
            else:
                outcome = mech.receive(base64.b64decode(sent[-1]))
                if isinstance(outcome, Lookup):
                    return mech.resume(secret)
                return outcome
            proc.stdin.write(base64.b64encode(outcome.payload_bytes()) + b"\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()


def test_gsasl_client_against_plaintext_and_context() -> None:
    """GNU SASL's CRAM-MD5 client logs in against the plaintext and Dovecot's context; a wrong
    password fails."""
    assert gsasl_cram_md5("test", Secret("plaintext", "test")) == Accept("user")
    assert gsasl_cram_md5("test", Secret("cram-md5", DOVECOT_TEST_CONTEXT)) == Accept("user")
    assert gsasl_cram_md5("tesT", Secret("cram-md5", DOVECOT_TEST_CONTEXT)) == Reject()
