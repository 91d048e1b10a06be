"""SCRAM-SHA-1/-256 and -PLUS (RFC 5802, RFC 7677) as sans-I/O state machines.

The RFC exchanges are replayed byte for byte (server nonce and stored keys injected); an
independent client (scramp, and a few lines of hashlib below) exercises the plaintext and
channel-binding paths.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import select
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.conftest import require_binary
import scramp

from saslsmtp.sasl import scram
from saslsmtp.sasl.outcome import Accept, Defer, Lookup, MechanismStateError, Reject, Reply, Secret, Session
from saslsmtp.sasl.scram import (
    BAD_AUTHZID,
    SPECS,
    Scram,
    ScramKeys,
    derive_keys,
    derived_salt,
    saslprep,
    lookup_kinds,
    scram_error,
    specs_for,
)

b64 = base64.b64decode

# RFC 5802 section 5 (SCRAM-SHA-1), user "user", password "pencil"
RFC5802_CLIENT_FIRST = b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL"
RFC5802_SERVER_NONCE = "3rfcNHYJY1ZVvWVs7j"
RFC5802_SERVER_FIRST = b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096"
RFC5802_CLIENT_FINAL = b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts="
RFC5802_SERVER_FINAL = b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ="
RFC5802_KEYS = ScramKeys(
    4096, b64("QSXCR+Q6sek8bf92"), b64("6dlGYMOdZcOPutkcNY8U2g7vK9Y="), b64("D+CSWLOshSulAsxiupA+qs2/fTE=")
)

# RFC 7677 section 3 (SCRAM-SHA-256), user "user", password "pencil"
RFC7677_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC7677_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC7677_SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
RFC7677_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC7677_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
RFC7677_KEYS = ScramKeys(
    4096,
    b64("W22ZaJ0SNY7soEsUEjb6gQ=="),
    b64("WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY="),
    b64("wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="),
)

# Dovecot's stored verifiers for password "test" (from `doveadm pw`)
DOVECOT_SHA1 = "4096,GetyLXdBuHzf1FWf8SLz2Q==,NA/OqmF4hhrsrB9KR7po+dliTGM=,QBiURvQaE6H6qYTmeghDHLANBFQ="
DOVECOT_SHA256 = (
    "4096,LfNGSFqiFykEZ1xDAYlnKQ==,HACNf9CII7cMz3XjRy/Oh3Ae2LHApoDyNw74d3YtFws=,"
    "AQH0j7Hf8J12g8eNBadvzlNB2am3PxgNwFCFd3RxEaw="
)

SERVER_SECRET = b"k" * 32
CB_UNIQUE = bytes(range(12))
CB_EXPORTER = bytes(range(100, 132))
CB_END_POINT = hashlib.sha256(b"a certificate").digest()
TLS_SESSION = Session(
    tls=True,
    channel_bindings={"tls-unique": CB_UNIQUE, "tls-exporter": CB_EXPORTER, "tls-server-end-point": CB_END_POINT},
)


def dovecot_keys(stored: str) -> ScramKeys:
    """Parse Dovecot's ``iter,salt,StoredKey,ServerKey``."""
    i, salt, stored_key, server_key = stored.split(",")
    return ScramKeys(int(i), b64(salt), b64(stored_key), b64(server_key))


def mech(name: str = "SCRAM-SHA-256", session: Session | None = None, nonce: str = "SNONCE", **kw: object) -> Scram:
    """A SCRAM exchange with a fixed server nonce and server secret."""
    return Scram(session, name=name, nonce=lambda: nonce, server_secret=SERVER_SECRET, **kw)  # type: ignore[arg-type]


def reference_final(
    hash_name: str,
    password: str,
    client_first_bare: bytes,
    server_first: bytes,
    cbind_input: bytes,
) -> tuple[bytes, bytes]:
    """An independent SCRAM client step (RFC 5802 section 3): the client-final message
    and the server signature it expects."""
    attrs = dict(a.split(b"=", 1) for a in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), b64(attrs[b"s"]), int(attrs[b"i"]))
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    stored_key = hashlib.new(hash_name, client_key).digest()
    without_proof = b"c=" + base64.b64encode(cbind_input) + b",r=" + attrs[b"r"]
    auth_message = client_first_bare + b"," + server_first + b"," + without_proof
    signature = hmac.new(stored_key, auth_message, hash_name).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    server_key = hmac.new(salted, b"Server Key", hash_name).digest()
    return (
        without_proof + b",p=" + base64.b64encode(proof),
        b"v=" + base64.b64encode(hmac.new(server_key, auth_message, hash_name).digest()),
    )


def exchange(m: Scram, gs2: bytes, cb: bytes, password: str, secret: Secret | None,
             hash_name: str = "sha256", user: bytes = b"user") -> object:
    """Run a whole exchange with the reference client; the last outcome."""
    bare = b"n=" + user + b",r=CNONCE"
    first = m.start(gs2 + bare)
    if not isinstance(first, Lookup):
        return first
    server_first = m.resume(secret)
    assert isinstance(server_first, Reply)
    final, expected_v = reference_final(hash_name, password, bare, server_first.payload_bytes(), gs2 + cb)
    outcome = m.receive(final)
    if outcome != Reply(expected_v):
        return outcome
    return m.receive(b"")


# -- RFC transcripts -------------------------------------------------------------


@pytest.mark.parametrize("initial_response", [True, False])
def test_rfc5802_transcript(initial_response: bool) -> None:
    """RFC 5802 section 5, byte for byte, with and without an initial response."""
    m = mech("SCRAM-SHA-1", nonce=RFC5802_SERVER_NONCE)
    if initial_response:
        lookup = m.start(RFC5802_CLIENT_FIRST)
    else:
        assert m.start(None) == Reply(b"")
        lookup = m.receive(RFC5802_CLIENT_FIRST)
    assert lookup == Lookup("user", ("scram-sha-1", "plaintext"))
    assert m.resume(Secret("scram-sha-1", RFC5802_KEYS.as_tuple())) == Reply(RFC5802_SERVER_FIRST)
    assert m.receive(RFC5802_CLIENT_FINAL) == Reply(RFC5802_SERVER_FINAL)
    assert m.receive(b"") == Accept("user")


def test_rfc7677_transcript() -> None:
    """RFC 7677 section 3, byte for byte."""
    m = mech("SCRAM-SHA-256", nonce=RFC7677_SERVER_NONCE)
    assert m.start(RFC7677_CLIENT_FIRST) == Lookup("user", ("scram-sha-256", "plaintext"))
    assert m.resume(Secret("scram-sha-256", RFC7677_KEYS.as_tuple())) == Reply(RFC7677_SERVER_FIRST)
    assert m.receive(RFC7677_CLIENT_FINAL) == Reply(RFC7677_SERVER_FINAL)
    assert m.receive(b"") == Accept("user")


def test_rfc_keys_derive_from_pencil() -> None:
    """derive_keys reproduces the RFC 5802 and RFC 7677 StoredKey/ServerKey."""
    assert derive_keys("sha1", "pencil", RFC5802_KEYS.salt, 4096).as_tuple() == RFC5802_KEYS.as_tuple()
    assert derive_keys("sha256", "pencil", RFC7677_KEYS.salt, 4096).as_tuple() == RFC7677_KEYS.as_tuple()


def test_dovecot_verifiers_derive_from_test() -> None:
    """derive_keys reproduces Dovecot's {SCRAM-SHA-1} and {SCRAM-SHA-256} for "test"."""
    for hash_name, stored in (("sha1", DOVECOT_SHA1), ("sha256", DOVECOT_SHA256)):
        keys = dovecot_keys(stored)
        assert derive_keys(hash_name, "test", keys.salt, keys.iterations).as_tuple() == keys.as_tuple()


def test_dovecot_verifier_serves_a_login() -> None:
    """A client knowing "test" logs in against Dovecot's stored SCRAM-SHA-256 verifier."""
    keys = dovecot_keys(DOVECOT_SHA256)
    m = mech()
    assert exchange(m, b"n,,", b"", "test", Secret("scram-sha-256", keys.as_tuple())) == Accept("user")


def test_wrong_password_against_rfc_keys() -> None:
    """A proof from another password is the plain 535 (invalid-proof)."""
    m = mech("SCRAM-SHA-1")
    outcome = exchange(m, b"n,,", b"", "pencil!", Secret("scram-sha-1", RFC5802_KEYS.as_tuple()), "sha1")
    assert outcome == Reject()


def test_tampered_rfc_proof_is_rejected() -> None:
    """Flipping a bit of the RFC 7677 proof fails."""
    m = mech("SCRAM-SHA-256", nonce=RFC7677_SERVER_NONCE)
    m.start(RFC7677_CLIENT_FIRST)
    m.resume(Secret("scram-sha-256", RFC7677_KEYS.as_tuple()))
    head, proof = RFC7677_CLIENT_FINAL.split(b",p=")
    raw = bytearray(b64(proof))
    raw[0] ^= 1
    assert m.receive(head + b",p=" + base64.b64encode(bytes(raw))) == Reject()


# -- plaintext, unknown users, the expensive step ------------------------------------


def test_plaintext_secret_with_derived_salt() -> None:
    """From a plaintext the server uses a per-user salt (HMAC of its secret) and 4096 iterations."""
    m = mech()
    m.start(b"n,,n=user,r=CNONCE")
    first = m.resume(Secret("plaintext", "pencil"))
    salt = base64.b64encode(derived_salt(SERVER_SECRET, "SCRAM-SHA-256", "user"))
    assert first == Reply(b"r=CNONCESNONCE,s=" + salt + b",i=4096")
    assert exchange(mech(), b"n,,", b"", "pencil", Secret("plaintext", "pencil")) == Accept("user")
    assert exchange(mech(), b"n,,", b"", "pencil2", Secret("plaintext", "pencil")) == Reject()


def test_derived_salt_is_stable_per_user_and_differs_between_users() -> None:
    """Same user, same process: same salt (a client may cache); other user or hash: another salt."""
    one = derived_salt(SERVER_SECRET, "SCRAM-SHA-256", "user")
    assert one == derived_salt(SERVER_SECRET, "SCRAM-SHA-256", "user")
    assert len(one) == 16
    assert one != derived_salt(SERVER_SECRET, "SCRAM-SHA-256", "user2")
    assert one != derived_salt(SERVER_SECRET, "SCRAM-SHA-1", "user")
    assert one != derived_salt(b"x" * 32, "SCRAM-SHA-256", "user")


def test_prepare_secret_is_the_expensive_step() -> None:
    """prepare_secret turns the plaintext into this mechanism's verifier; resuming with it
    gives the same exchange as resuming with the plaintext; other secrets pass unchanged."""
    m = mech()
    m.start(b"n,,n=user,r=CNONCE")
    prepared = m.prepare_secret(Secret("plaintext", "pencil"))
    assert prepared is not None and prepared.kind == "scram-sha-256"
    salt = derived_salt(SERVER_SECRET, "SCRAM-SHA-256", "user")
    assert prepared.value == derive_keys("sha256", "pencil", salt, 4096).as_tuple()
    stored = Secret("scram-sha-256", RFC7677_KEYS.as_tuple())
    assert m.prepare_secret(stored) is stored
    assert m.prepare_secret(None) is None
    assert exchange(mech(), b"n,,", b"", "pencil", Secret("plaintext", "pencil")) == Accept("user")
    via_prepare = mech()
    via_prepare.start(b"n,,n=user,r=CNONCE")
    direct = mech()
    direct.start(b"n,,n=user,r=CNONCE")
    assert via_prepare.resume(prepared) == direct.resume(Secret("plaintext", "pencil"))


def test_prepare_secret_before_lookup_is_a_state_error() -> None:
    """Without a username there is no salt to derive."""
    with pytest.raises(MechanismStateError):
        mech().prepare_secret(Secret("plaintext", "pencil"))


def test_unknown_user_looks_like_a_plaintext_user_then_fails() -> None:
    """resume(None) answers the same server-first a plaintext user would get, then the same 535."""
    unknown, known = mech(), mech()
    unknown.start(b"n,,n=ghost,r=CNONCE")
    known.start(b"n,,n=ghost,r=CNONCE")
    assert unknown.resume(None) == known.resume(Secret("plaintext", "pencil"))
    outcome = exchange(mech(), b"n,,", b"", "pencil", None, user=b"ghost")
    assert outcome == Reject()
    assert outcome == exchange(mech(), b"n,,", b"", "wrong", Secret("plaintext", "pencil"), user=b"ghost")


def test_saslprep_rfc4013_examples() -> None:
    """RFC 4013 section 3 examples, and the password is prepared before PBKDF2."""
    assert saslprep("I\u00adX") == "IX"
    assert saslprep("user") == "user"
    assert saslprep("USER") == "USER"
    assert saslprep("\u00aa") == "a"
    assert saslprep("\u2168") == "IX"
    with pytest.raises(ValueError):
        saslprep("\u0007")
    with pytest.raises(ValueError):
        saslprep("\u0627\u0031")
    salt = b"0123456789abcdef"
    assert derive_keys("sha256", "I\u00adX", salt, 4096) .as_tuple() == derive_keys("sha256", "IX", salt, 4096).as_tuple()


def test_saslprep_prohibits_unassigned_code_points_in_stored_strings() -> None:
    """RFC 5802 prepares passwords as stored strings: a code point unassigned in Unicode 3.2
    (U+0221 was assigned in 4.0) is prohibited; query rules allow it.  (The two SASLprep
    copies this module replaced disagreed here.)"""
    with pytest.raises(ValueError, match="unassigned"):
        saslprep("\u0221")
    with pytest.raises(ValueError, match="unassigned"):
        saslprep("pass\u0237word")
    assert saslprep("\u0221", allow_unassigned=True) == "\u0221"
    salt = b"0123456789abcdef"
    # such a password is hashed as its raw UTF-8 (Normalize falls back), as Dovecot does
    assert derive_keys("sha256", "\u0221", salt, 4096).as_tuple() == \
        scram.keys_from_bytes("sha256", "\u0221".encode(), salt, 4096).as_tuple()


def test_saslprep_normalizes_as_unicode_3_2() -> None:
    """Stringprep pins NFKC to Unicode 3.2: U+2F868 maps to U+2136A there, while the
    corrected mapping of later Unicode versions gives U+36FC.  (The other disagreement.)"""
    assert saslprep("\U0002f868") == "\U0002136a"
    assert saslprep("\U0002f874") == "\u5f33"
    assert saslprep("a\u00a0b") == "a b"


def test_one_saslprep_and_one_saslname_decoder() -> None:
    """SCRAM, OAUTHBEARER and the password schemes share one SASLprep and one saslname
    decoder (two copies had drifted apart)."""
    from saslsmtp.sasl import oauth, saslprep as module
    assert scram.saslprep is module.saslprep
    assert scram.decode_saslname is module.decode_saslname is oauth.decode_saslname
    assert not hasattr(oauth, "_decode_saslname") and not hasattr(scram, "_decode_saslname")
    assert module.decode_saslname("a=2Cb=3Dc") == "a,b=c"
    assert module.decode_saslname("a=2cb") is None and module.decode_saslname("") is None


# -- independent client: scramp --------------------------------------------------------


@pytest.mark.parametrize("name", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_scramp_client_logs_in_with_plaintext(name: str) -> None:
    """scramp's client completes the exchange against a plaintext secret."""
    client = scramp.ScramClient([name], "alice", "s3cr3t pass")
    m = Scram(Session(), name=name, server_secret=SERVER_SECRET)
    assert m.start(client.get_client_first().encode()) == Lookup("alice", (name.lower(), "plaintext"))
    server_first = m.resume(Secret("plaintext", "s3cr3t pass"))
    client.set_server_first(server_first.payload_bytes().decode())
    server_final = m.receive(client.get_client_final().encode())
    client.set_server_final(server_final.payload_bytes().decode())  # raises if v= is wrong
    assert m.receive(b"") == Accept("alice")


@pytest.mark.parametrize("cb_type, data", [("tls-unique", CB_UNIQUE), ("tls-server-end-point", CB_END_POINT)])
def test_scramp_client_plus_channel_binding(cb_type: str, data: bytes) -> None:
    """scramp's -PLUS client with tls-unique / tls-server-end-point logs in."""
    client = scramp.ScramClient(["SCRAM-SHA-256-PLUS"], "alice", "pw", channel_binding=(cb_type, data))
    m = Scram(TLS_SESSION, name="SCRAM-SHA-256-PLUS", server_secret=SERVER_SECRET)
    assert isinstance(m.start(client.get_client_first().encode()), Lookup)
    client.set_server_first(m.resume(Secret("plaintext", "pw")).payload_bytes().decode())
    server_final = m.receive(client.get_client_final().encode())
    client.set_server_final(server_final.payload_bytes().decode())
    assert m.receive(b"") == Accept("alice")


def test_scramp_client_plus_with_other_tls_data_fails() -> None:
    """A -PLUS client bound to another TLS connection (a MITM) gets channel-bindings-dont-match."""
    client = scramp.ScramClient(["SCRAM-SHA-256-PLUS"], "alice", "pw", channel_binding=("tls-unique", b"other"))
    m = Scram(TLS_SESSION, name="SCRAM-SHA-256-PLUS", server_secret=SERVER_SECRET)
    m.start(client.get_client_first().encode())
    client.set_server_first(m.resume(Secret("plaintext", "pw")).payload_bytes().decode())
    assert m.receive(client.get_client_final().encode()) == scram_error("channel-bindings-dont-match")


# -- channel binding policy -----------------------------------------------------------


@pytest.mark.parametrize("cb_type", ["tls-unique", "tls-exporter", "tls-server-end-point"])
def test_plus_with_each_binding_type(cb_type: str) -> None:
    """SCRAM-SHA-256-PLUS succeeds with c= = gs2 header + that type's data (tls-exporter: RFC 9266)."""
    gs2 = b"p=" + cb_type.encode() + b",,"
    data = TLS_SESSION.channel_bindings[cb_type]
    m = mech("SCRAM-SHA-256-PLUS", TLS_SESSION)
    assert exchange(m, gs2, data, "pw", Secret("plaintext", "pw")) == Accept("user")


def test_plus_sha1_with_authzid() -> None:
    """SCRAM-SHA-1-PLUS with a= equal to the user: c= covers the whole gs2 header."""
    gs2 = b"p=tls-exporter,a=user,"
    m = mech("SCRAM-SHA-1-PLUS", TLS_SESSION)
    assert exchange(m, gs2, CB_EXPORTER, "pw", Secret("plaintext", "pw"), "sha1") == Accept("user")


def test_plus_with_wrong_binding_data() -> None:
    """c= with other binding data: channel-bindings-dont-match."""
    m = mech("SCRAM-SHA-256-PLUS", TLS_SESSION)
    outcome = exchange(m, b"p=tls-exporter,,", b"\x00" * 32, "pw", Secret("plaintext", "pw"))
    assert outcome == scram_error("channel-bindings-dont-match")
    assert outcome == Reject("Authentication failed (SCRAM e=channel-bindings-dont-match)")


def test_plus_with_type_not_available() -> None:
    """p=tls-unique on a connection that only has tls-exporter (TLS 1.3): unsupported type."""
    session = Session(tls=True, channel_bindings={"tls-exporter": CB_EXPORTER})
    assert mech("SCRAM-SHA-256-PLUS", session).start(b"p=tls-unique,,n=user,r=CNONCE") == scram_error(
        "unsupported-channel-binding-type"
    )
    assert mech("SCRAM-SHA-256-PLUS", TLS_SESSION).start(b"p=tls-foo,,n=user,r=CNONCE") == scram_error(
        "unsupported-channel-binding-type"
    )


@pytest.mark.parametrize("flag", [b"n", b"y"])
def test_plus_without_binding_is_refused(flag: bytes) -> None:
    """The -PLUS variant requires the p= flag."""
    outcome = mech("SCRAM-SHA-256-PLUS", TLS_SESSION).start(flag + b",,n=user,r=CNONCE")
    assert isinstance(outcome, Reject) and outcome.code == 535


def test_plain_variant_refuses_p_flag() -> None:
    """p= with the non-PLUS name is refused (channel-binding-not-supported)."""
    outcome = mech("SCRAM-SHA-256", TLS_SESSION).start(b"p=tls-unique,,n=user,r=CNONCE")
    assert outcome == scram_error("channel-binding-not-supported")


def test_y_flag_downgrade_detected() -> None:
    """y while the server offers -PLUS (bindings available): server-does-support-channel-binding."""
    outcome = mech("SCRAM-SHA-256", TLS_SESSION).start(b"y,,n=user,r=CNONCE")
    assert outcome == Reject("Authentication failed (SCRAM e=server-does-support-channel-binding)")


def test_y_flag_accepted_when_plus_not_offered() -> None:
    """y is fine without bindings, or when the engine says -PLUS is not announced; c= is b64("y,,")."""
    assert exchange(mech("SCRAM-SHA-256"), b"y,,", b"", "pw", Secret("plaintext", "pw")) == Accept("user")
    m = mech("SCRAM-SHA-256", TLS_SESSION, plus_configured=False)
    assert exchange(m, b"y,,", b"", "pw", Secret("plaintext", "pw")) == Accept("user")


def test_n_flag_client_cannot_claim_y_in_final() -> None:
    """The c= must repeat the gs2 header of the first message: biws after y,, fails."""
    m = mech()
    m.start(b"y,,n=user,r=CNONCE")
    sf = m.resume(Secret("plaintext", "pw")).payload_bytes()
    final, _ = reference_final("sha256", "pw", b"n=user,r=CNONCE", sf, b"n,,")
    assert m.receive(final) == scram_error("channel-bindings-dont-match")


# -- message syntax -------------------------------------------------------------------


def test_saslname_escapes_are_decoded() -> None:
    """n=a=2Cb=3Dc is the user "a,b=c", and the same a= is accepted as authzid."""
    assert mech().start(b"n,,n=a=2Cb=3Dc,r=CNONCE") == Lookup("a,b=c", ("scram-sha-256", "plaintext"))
    assert mech().start(b"n,a=a=2Cb=3Dc,n=a=2Cb=3Dc,r=CNONCE") == Lookup("a,b=c", ("scram-sha-256", "plaintext"))
    m = mech()
    assert exchange(m, b"n,a=j=2Cd,", b"", "pw", Secret("plaintext", "pw"), user=b"j=2Cd") == Accept("j,d")


def test_utf8_username() -> None:
    """A UTF-8 user name is passed to the lookup decoded."""
    assert mech().start("n,,n=jürgen,r=CNONCE".encode()) == Lookup("jürgen", ("scram-sha-256", "plaintext"))


def test_other_authzid_is_refused() -> None:
    """a= naming someone else: Not authorized to requested authorization identity."""
    assert mech().start(b"n,a=admin,n=user,r=CNONCE") == BAD_AUTHZID


@pytest.mark.parametrize(
    "message, error",
    [
        (b"n,,m=foo,n=user,r=CNONCE", "extensions-not-supported"),
        (b"n,,n=us=er,r=CNONCE", "invalid-username-encoding"),
        (b"n,,n=user=2c,r=CNONCE", "invalid-username-encoding"),  # escapes are upper case
        (b"n,,n=,r=CNONCE", "invalid-username-encoding"),
        (b"n,a=x=,n=user,r=CNONCE", "invalid-username-encoding"),
        (b"n,,n=user,r=CN ONCE", "invalid-encoding"),
        (b"n,,n=user,r=CN\x7fONCE", "invalid-encoding"),
        (b"n,,n=user,r=", "invalid-encoding"),
        (b"n,,n=user", "invalid-encoding"),
        (b"n,,r=CNONCE,n=user", "invalid-encoding"),
        (b"n,,n=user,r=CNONCE,", "invalid-encoding"),
        (b"n,,n=user,r=CNONCE,1=x", "invalid-encoding"),
        (b"x,,n=user,r=CNONCE", "invalid-encoding"),
        (b"p=,,n=user,r=CNONCE", "invalid-encoding"),
        (b"n,b=x,n=user,r=CNONCE", "invalid-encoding"),
        (b"n,n=user,r=CNONCE", "invalid-encoding"),
        (b"", "invalid-encoding"),
        (b"n,,n=\xff,r=CNONCE", "invalid-encoding"),
    ],
)
def test_malformed_client_first(message: bytes, error: str) -> None:
    """Each syntax error of the client-first message maps to its e= value (a 535)."""
    outcome = mech().start(message)
    assert outcome == scram_error(error)
    assert outcome.reason == f"Authentication failed (SCRAM e={error})"


def test_client_first_extension_is_ignored() -> None:
    """An unknown optional extension after r= is ignored (and still covered by the AuthMessage)."""
    assert mech().start(b"n,,n=user,r=CNONCE,x=ext") == Lookup("user", ("scram-sha-256", "plaintext"))


def started(name: str = "SCRAM-SHA-256") -> tuple[Scram, bytes]:
    """An exchange waiting for the client-final message (plaintext "pw"), and its server-first."""
    m = mech(name)
    m.start(b"n,,n=user,r=CNONCE")
    return m, m.resume(Secret("plaintext", "pw")).payload_bytes()


def test_nonce_mismatch() -> None:
    """A client-final with another nonce fails (other-error)."""
    m, sf = started()
    final, _ = reference_final("sha256", "pw", b"n=user,r=CNONCE", sf.replace(b"SNONCE", b"SNONCX"), b"n,,")
    assert m.receive(final) == scram_error("other-error")


@pytest.mark.parametrize(
    "final, error",
    [
        (b"c=biws,r=CNONCESNONCE,p=!!!!", "invalid-encoding"),
        (b"c=biws,r=CNONCESNONCE,p=AAAA", "invalid-proof"),  # 3 bytes, not 32
        (b"c=b-ws,r=CNONCESNONCE,p=AAAA", "invalid-encoding"),
        (b"c=biws,r=CNONCESNONCE", "invalid-encoding"),
        (b"r=CNONCESNONCE,c=biws,p=AAAA", "invalid-encoding"),
        (b"c=biws,r=CNONCESNONCE,m=x,p=AAAA", "invalid-encoding"),
        (b"c=biws,r=CNONCESNONCE,p=AAAA\xff", "invalid-encoding"),
        (b"", "invalid-encoding"),
    ],
)
def test_malformed_client_final(final: bytes, error: str) -> None:
    """Each syntax error of the client-final message is a 535 with its e= value."""
    m, _ = started()
    assert m.receive(final) == scram_error(error)


def test_non_empty_line_after_server_final() -> None:
    """After v= the client must send an empty line; anything else fails."""
    m, sf = started()
    final, v = reference_final("sha256", "pw", b"n=user,r=CNONCE", sf, b"n,,")
    assert m.receive(final) == Reply(v)
    outcome = m.receive(b"v=")
    assert isinstance(outcome, Reject) and outcome.code == 535


def test_invalid_proof_and_unknown_user_keep_default_text() -> None:
    """invalid-proof / unknown-user use the default 535 text: no user enumeration."""
    assert scram_error("invalid-proof") == Reject() == scram_error("unknown-user")
    assert Reject().code == 535 and Reject().enhanced == "5.7.8"


@pytest.mark.parametrize(
    "value",
    [
        (4096, b"salt", b"short", b"x" * 32),
        (0, b"salt", b"x" * 32, b"x" * 32),
        ("4096", b"salt", b"x" * 32, b"x" * 32),
        (4096, b"", b"x" * 32, b"x" * 32),
        (4096, b"salt", b"x" * 32),
        "4096,salt,key,key",
    ],
)
def test_malformed_stored_verifier_defers(value: object) -> None:
    """A stored verifier of the wrong shape is a server problem: 454, not 535."""
    m = mech()
    m.start(b"n,,n=user,r=CNONCE")
    assert m.resume(Secret("scram-sha-256", value)) == Defer()


def test_sha1_verifier_cannot_serve_sha256() -> None:
    """resume with a kind that was not asked for is the engine's bug."""
    m = mech()
    m.start(b"n,,n=user,r=CNONCE")
    with pytest.raises(MechanismStateError):
        m.resume(Secret("scram-sha-1", RFC5802_KEYS.as_tuple()))


def test_out_of_order_calls_raise() -> None:
    """Every call out of order raises MechanismStateError."""
    with pytest.raises(MechanismStateError):
        mech().receive(b"n,,n=user,r=CNONCE")
    with pytest.raises(MechanismStateError):
        mech().resume(None)
    m = mech()
    m.start(None)
    with pytest.raises(MechanismStateError):
        m.start(None)
    with pytest.raises(MechanismStateError):
        m.resume(None)
    assert isinstance(m.receive(b"n,,n=user,r=CNONCE"), Lookup)
    with pytest.raises(MechanismStateError):
        m.receive(b"c=biws")
    m.resume(Secret("plaintext", "pw"))
    with pytest.raises(MechanismStateError):
        m.resume(None)
    assert m.receive(b"c=biws,r=CNONCESNONCE,p=AAAA") == scram_error("invalid-proof")
    with pytest.raises(MechanismStateError):
        m.receive(b"")
    rejected = mech()
    rejected.start(b"n,a=admin,n=user,r=CNONCE")
    with pytest.raises(MechanismStateError):
        rejected.resume(None)


def test_finished_exchange_refuses_more() -> None:
    """After Accept nothing more may be driven."""
    m = mech("SCRAM-SHA-256", nonce=RFC7677_SERVER_NONCE)
    m.start(RFC7677_CLIENT_FIRST)
    m.resume(Secret("scram-sha-256", RFC7677_KEYS.as_tuple()))
    m.receive(RFC7677_CLIENT_FINAL)
    assert m.receive(b"") == Accept("user")
    with pytest.raises(MechanismStateError):
        m.receive(b"")


def test_bad_injected_nonce_is_our_bug() -> None:
    """A server nonce with a comma would corrupt the message: MechanismStateError."""
    with pytest.raises(MechanismStateError):
        mech(nonce="a,b").start(b"n,,n=user,r=CNONCE")


def test_default_nonce_is_fresh_and_valid() -> None:
    """The default server nonce is random, printable, without commas."""
    firsts = []
    for _ in range(2):
        m = Scram(Session(), name="SCRAM-SHA-256")
        m.start(b"n,,n=user,r=CNONCE")
        firsts.append(m.resume(None).payload_bytes().split(b",")[0])
    assert firsts[0] != firsts[1]
    assert all(f.startswith(b"r=CNONCE") and len(f) > len(b"r=CNONCE") + 16 for f in firsts)


def test_specs_flags() -> None:
    """Four SCRAM specs; -PLUS ones need TLS; none is plaintext; all client-first."""
    assert [spec.name for spec in SPECS] == ["SCRAM-SHA-1", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]
    for spec in SPECS:
        assert (spec.plaintext, spec.client_first, spec.needs_tls) == (False, True, spec.name.endswith("-PLUS"))
        instance = spec.factory(TLS_SESSION)
        assert isinstance(instance, Scram) and instance.name == spec.name
    with pytest.raises(ValueError):
        Scram(Session(), name="SCRAM-MD5")
    assert lookup_kinds("SCRAM-SHA-1-PLUS") == ("scram-sha-1", "plaintext")
    assert lookup_kinds("SCRAM-SHA-256") == ("scram-sha-256", "plaintext")


def test_specs_for_configured_names() -> None:
    """specs_for builds only the configured names; a plain variant refuses y only when its
    -PLUS sibling is configured (and bindings exist)."""
    specs = specs_for(["scram-sha-256", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1", "PLAIN"])
    assert sorted(specs) == ["SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]
    y_first = b"y,,n=user,r=CNONCE"
    assert specs["SCRAM-SHA-256"].factory(TLS_SESSION).start(y_first) == scram_error(
        "server-does-support-channel-binding"
    )
    assert specs["SCRAM-SHA-1"].factory(TLS_SESSION).start(y_first) == Lookup("user", ("scram-sha-1", "plaintext"))
    assert specs["SCRAM-SHA-256"].factory(Session()).start(y_first) == Lookup("user", ("scram-sha-256", "plaintext"))
    assert specs["SCRAM-SHA-256-PLUS"].needs_tls


def test_keys_repr_hides_secrets() -> None:
    """ScramKeys' repr shows no key material."""
    text = repr(RFC7677_KEYS)
    assert "WG5d" not in text and repr(RFC7677_KEYS.stored_key) not in text and "***" in text


# -- a real client: GNU SASL (Debian package gsasl) over its stdin/stdout ------------------

GSASL_PROMPT = b"Enter base64 authentication data from server (press RET if none):\n"


def gsasl_binary() -> str:
    """The gsasl executable; in CI its absence is a failure, elsewhere a skip."""
    return require_binary("gsasl")


def gsasl_login(mechanism: str, m: Scram, password: str, secret: Secret | None) -> list[object]:
    """Drive ``gsasl --client`` against ``m``; the list of outcomes, Lookups resolved with
    ``secret``.  gsasl checks the server signature itself and fails if it is wrong."""
    proc = subprocess.Popen(
        [gsasl_binary(), "--client", "--mechanism", mechanism, "-a", "user", "-p", password, "--no-cb"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    outcomes: list[object] = []
    buf = b""
    try:
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 10)
            assert ready, f"gsasl hangs: {buf!r}"
            chunk = os.read(proc.stdout.fileno(), 4096)  # type: ignore[union-attr]
            if not chunk:
                outcomes.append(("gsasl exited", buf))
                return outcomes
            buf += chunk
            if not buf.endswith(GSASL_PROMPT):
                continue
            sent = re.findall(rb"Output from client:\n(.*)\n", buf)[-1]
            buf = b""
            response = base64.b64decode(sent)
            outcome = m.start(response) if not outcomes else m.receive(response)
            if isinstance(outcome, Lookup):
                outcome = m.resume(secret)
            outcomes.append(outcome)
            if not isinstance(outcome, Reply):
                return outcomes
            proc.stdin.write(base64.b64encode(outcome.payload_bytes()) + b"\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("name", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_gsasl_client_with_plaintext(name: str) -> None:
    """GNU SASL's client logs in against a plaintext secret, and verifies our v=."""
    outcomes = gsasl_login(name, Scram(Session(), name=name), "pencil", Secret("plaintext", "pencil"))
    assert len(outcomes) == 3 and outcomes[-1] == Accept("user"), outcomes
    assert outcomes[1].payload_bytes().startswith(b"v=")  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["SCRAM-SHA-1", "SCRAM-SHA-256"])
def test_gsasl_mkpasswd_verifier_serves_gsasl_client(name: str) -> None:
    """A verifier written by ``gsasl --mkpasswd`` (Dovecot format) serves gsasl's client;
    the wrong password fails with the plain 535."""
    out = subprocess.run(
        [gsasl_binary(), "--mkpasswd", "--mechanism", name, "--password", "pencil", "--iteration-count", "4096"],
        check=True, capture_output=True, timeout=30,
    ).stdout.decode().strip()
    assert out.startswith("{" + name + "}")
    secret = Secret(name.lower(), dovecot_keys(out[len(name) + 2:]).as_tuple())
    assert gsasl_login(name, Scram(Session(), name=name), "pencil", secret)[-1] == Accept("user")
    assert gsasl_login(name, Scram(Session(), name=name), "pencil!", secret)[-1] == Reject()


# -- over a real TLS connection: the server's bindings against a client's own ----------------


def _scram_plus_session(port: int, tls12: bool, mechanism: str,
                        start: Callable[[Any], tuple[bytes, Any]]) -> list[bytes]:
    """Implicit TLS (TLS 1.2 or 1.3), EHLO, then AUTH ``mechanism`` with the first
    message of ``start(sock)``, which also gives a scramp client (or ``None``) to go on
    with to the end.  The server's replies."""
    import socket
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10)) as sock:
        reader = sock.makefile("rb")

        def reply() -> bytes:
            lines = [reader.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(reader.readline())
            return b"".join(lines).rstrip(b"\r\n")

        def send(line: bytes) -> bytes:
            sock.sendall(line + b"\r\n")
            return reply()

        assert reply().startswith(b"220 ")
        assert b"SCRAM-SHA-256-PLUS" in send(b"EHLO client.example")
        message, client = start(sock)
        replies = [send(b"AUTH " + mechanism.encode() + b" " + base64.b64encode(message))]
        if client is not None and replies[-1].startswith(b"334 "):
            client.set_server_first(base64.b64decode(replies[-1][4:]).decode())
            replies.append(send(base64.b64encode(client.get_client_final().encode())))
            if replies[-1].startswith(b"334 "):
                client.set_server_final(base64.b64decode(replies[-1][4:]).decode())  # checks v=
                replies.append(send(b""))
        return replies


def _end_point(sock: Any) -> bytes:
    """tls-server-end-point as a client computes it (RFC 5929 4.1: SHA-256 for this
    ECDSA-SHA256 certificate)."""
    return hashlib.sha256(sock.getpeercert(binary_form=True)).digest()


@pytest.mark.parametrize("tls12, cb_type", [(False, "tls-server-end-point"), (True, "tls-server-end-point"),
                                            (True, "tls-unique")])
@pytest_twisted.ensureDeferred
async def test_scram_plus_on_the_wire_with_a_client_computing_its_binding(
        tmp_path: Path, tls12: bool, cb_type: str) -> None:
    """scramp's -PLUS client with the binding Python's ssl gives the client side
    (tls-unique, the certificate hash) logs in over TLS 1.3 and 1.2: the server's value
    is the client's."""
    server = await _scram_server(tmp_path)

    def start(sock: Any) -> tuple[bytes, Any]:
        data = sock.get_channel_binding("tls-unique") if cb_type == "tls-unique" else _end_point(sock)
        client = scramp.ScramClient(["SCRAM-SHA-256-PLUS"], "alice", "wonderland",
                                    channel_binding=(cb_type, data))
        return client.get_client_first().encode(), client
    try:
        replies = await threads.deferToThread(_scram_plus_session, server.port, tls12,
                                              "SCRAM-SHA-256-PLUS", start)
    finally:
        await server.stop()
    assert [r[:4] for r in replies] == [b"334 ", b"334 ", b"235 "], replies


@pytest.mark.parametrize("tls12, mechanism, message, error", [
    # RFC 5802 section 6: "y" while the server announced -PLUS is a downgrade
    (False, "SCRAM-SHA-256", b"y,,n=alice,r=clientnonce", "server-does-support-channel-binding"),
    (True, "SCRAM-SHA-256", b"y,,n=alice,r=clientnonce", "server-does-support-channel-binding"),
    # tls-unique is not defined for TLS 1.3 (RFC 9266)
    (False, "SCRAM-SHA-256-PLUS", b"p=tls-unique,,n=alice,r=clientnonce", "unsupported-channel-binding-type"),
    (False, "SCRAM-SHA-256", b"p=tls-exporter,,n=alice,r=clientnonce", "channel-binding-not-supported"),
])
@pytest_twisted.ensureDeferred
async def test_scram_binding_refusals_on_the_wire(tmp_path: Path, tls12: bool, mechanism: str,
                                                   message: bytes, error: str) -> None:
    """The first message is refused at once with the RFC's server-error value."""
    server = await _scram_server(tmp_path)
    try:
        replies = await threads.deferToThread(_scram_plus_session, server.port, tls12, mechanism,
                                              lambda sock: (message, None))
    finally:
        await server.stop()
    assert replies == [f"535 5.7.8 Authentication failed (SCRAM e={error})".encode()]


async def _scram_server(tmp_path: Path) -> Any:
    from tests.support import start_server
    from tests.tlsutil import issue_cert, make_ca
    cert = issue_cert(make_ca(tmp_path), tmp_path)
    (tmp_path / "users").write_text("alice:{PLAIN}wonderland\n")
    return await start_server(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                              listen=["ssl:0:interface=127.0.0.1"], tls=(cert.chain_path, cert.key_path),
                              mechanisms=["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"], require_tls=True)
