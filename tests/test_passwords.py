"""Tests for saslsmtp.passwords: Dovecot password schemes, verification and hashing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess

import pytest

from saslsmtp import passwords
from saslsmtp.passwords import (
    MAKE_SCHEMES, MalformedPassword, PasswordError, UnknownScheme, cost_key,
    cram_md5_context, cram_md5_digest, is_expensive, make_hash, parse_password,
    scram_keys, stored_secrets, verify_password,
)

PASSWORD = "test"
WRONG = "Test"

#: Dovecot's own vectors for the password "test" (from Dovecot's documentation and `doveadm pw`).
SPEC_VECTORS = [
    "{PLAIN}test",
    "{CRYPT}//EsnG9FLTKjo",
    "{MD5-CRYPT}$1$GgvxyNz8$OjZhLh4P.gF1lxYEbLZ3e/",
    "{BLF-CRYPT}$2y$05$11ipvo5dR6CwkzwmhwM26OXgzXwhV2PyPuLV.Qi31ILcRcThQpEiW",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$vBb99oJ12p3WAdYlaMHz1A$jtFOtbo/sYV9OSlTxDo/nVNq3uArHd5GJSEx0ty85Cc",
    "{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=",
    "{SSHA}H/zrDv8FXUu1JmwvVYijfrYEF34jVZcO",
    "{SHA256}n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=",
    "{SMD5}JTu1KRwptKZJg/RLd+6Vn5GUd0M=",
    "{LDAP-MD5}CY9rzUYh03PK3k6DJie09g==",
    "{CRAM-MD5}e02d374fde0dc75a17a557039a3a5338c7743304777dccd376f332bee68d2cf6",
    "{SCRAM-SHA-1}4096,GetyLXdBuHzf1FWf8SLz2Q==,NA/OqmF4hhrsrB9KR7po+dliTGM=,QBiURvQaE6H6qYTmeghDHLANBFQ=",
    "{SCRAM-SHA-256}4096,LfNGSFqiFykEZ1xDAYlnKQ==,HACNf9CII7cMz3XjRy/Oh3Ae2LHApoDyNw74d3YtFws=,"
    "AQH0j7Hf8J12g8eNBadvzlNB2am3PxgNwFCFd3RxEaw=",
    "{PBKDF2}$1$bUnT4Pl7yFtYX0KU$5000$50a83cafdc517b9f46519415e53c6a858908680a",
]

#: Made with ``doveadm pw -s SCHEME -p test`` (Dovecot 2.3.19.1), for schemes that
#: Dovecot's documentation gives no vector for, plus aliases and encodings Dovecot accepts.
DOVEADM_VECTORS = [
    "{SHA512}7iaw3Ur350mqGo7jwQrpkj9hiYB3Lkc/iBml1JQODbJ6wYX4oOHV+E+IvIh/1nsUNzLDBMxfqa2Ob1f1ACio/w==",
    "{SSHA256}VA2GfI9My2euT7pt6pqVkvj0jLMJ0dacYGfYTG6aDL+INzNU",
    "{SSHA512}toJO2bEpwrrHq7OlKyYZ+tudEi16J192JplPB1QM5pgVQvE2VS8cnxmrKEjbXASMPQjYneV5mDSoxTDChVWhwLWMGh8=",
    "{SHA256-CRYPT}$5$V2zjtSbnPLg3xYQN$WUlqnA3JxzeqXrJIo5r80NobwHGyqqQdizyzsbJZIP1",
    "{SHA256-CRYPT}$5$rounds=10000$QDqAdcFsDqIlBq/2$4d961iOkbG68JoAh.ZAzlQg20u695PKgWBvb0Mz5vdC",
    "{SHA512-CRYPT}$6$7g2N5YvZWGr98P79$Hf2Qx3S0K6lp.eEwDWss/9KgG7CNMsV0FyHOiXoVsc.tb9.m1k0bDZ5Bs8YGIEw1lxmVPJUe0c8CgSBVIFYuW/",
    "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$A3bI8vaoCuxJJoTk91MYvw$dkcgdM9UD0nou8XiBeaxEAaaH7XjtmyqsRDHJG1RsG4",
    "{PLAIN-MD5}098f6bcd4621d373cade4e832627b4f6",
    "{DES-CRYPT}FF6JUV20Gijv.",
    "{MD5-CRYPT}$1$2iIiecTS$r7XJsliWx3pcvZEpyXdwX.",
    "{SHA.hex}a94a8fe5ccb19ba61c4c0873d391e987982fbbd3",
    "{SHA}a94a8fe5ccb19ba61c4c0873d391e987982fbbd3",
    "{PLAIN.b64}dGVzdA==",
]

#: Aliases and CRYPT's $id$ dispatch, over the same vectors.
ALIAS_VECTORS = [
    "{CLEAR}test",
    "{CLEARTEXT}test",
    "{plain}test",
    "{SHA1}qUqP5cyxm6YcTAhz05Hph5gvu9M=",
    "{MD5}$1$GgvxyNz8$OjZhLh4P.gF1lxYEbLZ3e/",
    "{MD5}CY9rzUYh03PK3k6DJie09g==",
    "{HMAC-MD5}e02d374fde0dc75a17a557039a3a5338c7743304777dccd376f332bee68d2cf6",
    "{ARGON2}$argon2id$v=19$m=65536,t=3,p=1$vBb99oJ12p3WAdYlaMHz1A$jtFOtbo/sYV9OSlTxDo/nVNq3uArHd5GJSEx0ty85Cc",
    "{CRYPT}$1$GgvxyNz8$OjZhLh4P.gF1lxYEbLZ3e/",
    "{CRYPT}$5$V2zjtSbnPLg3xYQN$WUlqnA3JxzeqXrJIo5r80NobwHGyqqQdizyzsbJZIP1",
    "{CRYPT}$6$7g2N5YvZWGr98P79$Hf2Qx3S0K6lp.eEwDWss/9KgG7CNMsV0FyHOiXoVsc.tb9.m1k0bDZ5Bs8YGIEw1lxmVPJUe0c8CgSBVIFYuW/",
    "{CRYPT}$2y$05$11ipvo5dR6CwkzwmhwM26OXgzXwhV2PyPuLV.Qi31ILcRcThQpEiW",
    "//EsnG9FLTKjo",  # bare: the default scheme, CRYPT
    "$6$7g2N5YvZWGr98P79$Hf2Qx3S0K6lp.eEwDWss/9KgG7CNMsV0FyHOiXoVsc.tb9.m1k0bDZ5Bs8YGIEw1lxmVPJUe0c8CgSBVIFYuW/",
]

ALL_VECTORS = SPEC_VECTORS + DOVEADM_VECTORS + ALIAS_VECTORS

#: Dovecot's DIGEST-MD5 vector: for user ``testuser1`` (empty realm), password ``test``.
DIGEST_MD5_VECTOR = "{DIGEST-MD5}77c1a8c437c9b08ba2f460fe5d58db5d"

#: RFC 5802 section 5 and RFC 7677 section 3: password "pencil".
RFC5802_FIELD = "{SCRAM-SHA-1}4096,QSXCR+Q6sek8bf92,6dlGYMOdZcOPutkcNY8U2g7vK9Y=,D+CSWLOshSulAsxiupA+qs2/fTE="
RFC7677_FIELD = ("{SCRAM-SHA-256}4096,W22ZaJ0SNY7soEsUEjb6gQ==,"
                 "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=,wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=")

#: RFC 2195: CRAM-MD5 example.
RFC2195_SECRET = b"tanstaaftanstaaf"
RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_DIGEST = "b913a602c7eda7a495b4e6e7334d3890"

#: Cheap cost settings so the round trips stay fast.
FAST = {"BLF-CRYPT": 4, "ARGON2ID": 1, "ARGON2I": 1, "SHA512-CRYPT": 1000,
        "SHA256-CRYPT": 1000, "PBKDF2": 1000, "SCRAM-SHA-1": 4096, "SCRAM-SHA-256": 4096,
        "YESCRYPT": 1, "SCRYPT": 6}

#: What each makeable scheme's field starts with (yescrypt and scrypt are Dovecot's {CRYPT}).
MADE_AS = {"YESCRYPT": "{CRYPT}$y$", "SCRYPT": "{CRYPT}$7$"}


@pytest.mark.parametrize("field", ALL_VECTORS)
def test_vector_accepts_right_password(field: str) -> None:
    """Each known vector verifies the password "test" (as str and as bytes)."""
    assert verify_password(field, PASSWORD) is True
    assert verify_password(field, PASSWORD.encode()) is True


@pytest.mark.parametrize("field", ALL_VECTORS)
def test_vector_rejects_wrong_password(field: str) -> None:
    """Each known vector refuses a wrong password, an empty one and a longer one."""
    assert verify_password(field, WRONG) is False
    assert verify_password(field, "") is False
    assert verify_password(field, "testtest") is False


def test_des_crypt_truncates_to_eight_characters() -> None:
    """Traditional DES crypt only looks at 8 characters (the classic htpasswd vector)."""
    assert verify_password("{CRYPT}rqXexS6ZhobKA", "myPassword") is True
    assert verify_password("{DES-CRYPT}rqXexS6ZhobKA", "myPasswo") is True
    assert verify_password("{CRYPT}rqXexS6ZhobKA", "myPassw") is False


def test_digest_md5_uses_the_username() -> None:
    """{DIGEST-MD5} is MD5(user:realm:pass): right with the username, False without it."""
    assert verify_password(DIGEST_MD5_VECTOR, PASSWORD, username="testuser1") is True
    assert verify_password(DIGEST_MD5_VECTOR, WRONG, username="testuser1") is False
    assert verify_password(DIGEST_MD5_VECTOR, PASSWORD, username="testuser2") is False
    assert verify_password(DIGEST_MD5_VECTOR, PASSWORD) is False


def test_digest_md5_realm_comes_from_the_username() -> None:
    """``user@realm`` hashes ``user:realm:pass`` (checked against doveadm -u a@b)."""
    field = "{DIGEST-MD5}75e5f2eab75ef80bca2055f90bc5e2a1"
    assert verify_password(field, PASSWORD, username="a@b") is True
    assert make_hash("DIGEST-MD5", PASSWORD, username="a@b") == field


@pytest.mark.parametrize("field, password", [(RFC5802_FIELD, "pencil"), (RFC7677_FIELD, "pencil")])
def test_scram_rfc_vectors(field: str, password: str) -> None:
    """The RFC 5802 / RFC 7677 StoredKey and ServerKey verify "pencil" and nothing else."""
    assert verify_password(field, password) is True
    assert verify_password(field, "pencil2") is False


def test_scram_keys_rfc5802() -> None:
    """scram_keys reproduces RFC 5802's derived StoredKey and ServerKey."""
    stored, server = scram_keys("sha1", "pencil", base64.b64decode("QSXCR+Q6sek8bf92"), 4096)
    assert base64.b64encode(stored) == b"6dlGYMOdZcOPutkcNY8U2g7vK9Y="
    assert base64.b64encode(server) == b"D+CSWLOshSulAsxiupA+qs2/fTE="


def test_cram_md5_context_matches_dovecot() -> None:
    """The HMAC-MD5 context of "test" is Dovecot's {CRAM-MD5} vector."""
    assert cram_md5_context("test") == SPEC_VECTORS[10].removeprefix("{CRAM-MD5}")


def test_cram_md5_digest_from_context_rfc2195() -> None:
    """A stored context answers RFC 2195's challenge exactly like the plaintext would."""
    context = cram_md5_context(RFC2195_SECRET)
    assert cram_md5_digest(context, RFC2195_CHALLENGE) == RFC2195_DIGEST
    assert cram_md5_digest(bytes.fromhex(context), RFC2195_CHALLENGE) == RFC2195_DIGEST


@pytest.mark.parametrize("secret", [b"", b"k" * 64, b"long" * 40, "pässwörd".encode()])
@pytest.mark.parametrize("challenge", [b"", b"<1.2@h>", b"c" * 200])
def test_cram_md5_digest_equals_hmac(secret: bytes, challenge: bytes) -> None:
    """The context route equals stdlib HMAC-MD5 for short, block-sized and long keys."""
    expected = hmac.new(secret, challenge, hashlib.md5).hexdigest()
    assert cram_md5_digest(cram_md5_context(secret), challenge) == expected


def test_cram_md5_digest_rejects_bad_context() -> None:
    """A context that is not 32 bytes is a clear error."""
    with pytest.raises(MalformedPassword):
        cram_md5_digest("abcd", b"x")


@pytest.mark.parametrize("scheme", MAKE_SCHEMES)
def test_make_hash_round_trip(scheme: str) -> None:
    """make_hash output verifies its password, refuses another, and names its scheme."""
    field = make_hash(scheme, "s3cret pässword", rounds=FAST.get(scheme), username="u@r")
    assert field.upper().startswith(MADE_AS.get(scheme, "{" + scheme.upper() + "}").upper())
    assert verify_password(field, "s3cret pässword", username="u@r") is True
    assert verify_password(field, "s3cret password", username="u@r") is False


def test_make_hash_default_rounds() -> None:
    """Defaults: SHA512-CRYPT 100000 rounds, SCRAM 4096 iterations, bcrypt cost 12."""
    assert "$6$rounds=100000$" in make_hash("SHA512-CRYPT", "x")
    assert make_hash("SCRAM-SHA-256", "x").startswith("{SCRAM-SHA-256}4096,")
    assert passwords.DEFAULT_ROUNDS["BLF-CRYPT"] == 12


def test_make_hash_with_fixed_salt_is_deterministic() -> None:
    """A fixed salt gives the known RFC 5802 keys and a known SSHA (from Dovecot's vector)."""
    field = make_hash("SCRAM-SHA-1", "pencil", salt=base64.b64decode("QSXCR+Q6sek8bf92"))
    assert field == RFC5802_FIELD
    ssha_raw = base64.b64decode("H/zrDv8FXUu1JmwvVYijfrYEF34jVZcO")
    assert make_hash("SSHA", "test", salt=ssha_raw[20:]) == SPEC_VECTORS[6]
    pbkdf2 = make_hash("PBKDF2", "test", salt=b"bUnT4Pl7yFtYX0KU", rounds=5000)
    assert pbkdf2 == SPEC_VECTORS[-1]


def test_make_hash_plain_refuses_colon() -> None:
    """{PLAIN} cannot hold ':' in a passwd-file; PLAIN.B64 can, and round-trips."""
    with pytest.raises(ValueError, match="PLAIN.B64"):
        make_hash("PLAIN", "a:b")
    field = make_hash("PLAIN.B64", "a:b")
    assert ":" not in field
    assert verify_password(field, "a:b") is True


def test_bcrypt_password_over_72_bytes_is_a_mismatch() -> None:
    """bcrypt 5 raises ValueError past 72 bytes; that must be a plain mismatch, not a crash."""
    field = make_hash("BLF-CRYPT", "a" * 72, rounds=4)
    assert verify_password(field, "a" * 72) is True
    assert verify_password(field, "a" * 73) is False
    assert verify_password(field, "a" * 500) is False
    assert verify_password("{CRYPT}" + field.removeprefix("{BLF-CRYPT}"), "a" * 73) is False
    with pytest.raises(ValueError, match="72 bytes"):
        make_hash("BLF-CRYPT", "a" * 73)


def test_unknown_scheme_is_a_clear_error() -> None:
    """An unknown {SCHEME} raises UnknownScheme naming the scheme, never the data."""
    with pytest.raises(UnknownScheme, match=r"\{NOPE\}") as info:
        verify_password("{NOPE}secretdata", "secretdata")
    assert "secretdata" not in str(info.value)
    with pytest.raises(UnknownScheme, match=r"\{NOPE\}"):
        make_hash("NOPE", "x")
    with pytest.raises(UnknownScheme, match="encoding"):
        parse_password("{SHA.rot13}abc")


def test_a_2x_bcrypt_hash_verifies_as_dovecot_does() -> None:
    """``$2x$`` (PHP's bcrypt before 5.3.7, 8-bit passwords hashed wrongly) is what
    Dovecot's crypt(3) still verifies; it was a 535 forever here."""
    stored = "{BLF-CRYPT}$2x$05$Nl7m.B6QXfD8EP7jbGLIR.4IER42h2JHQI/2FNTyFgrczxqV9TNzu"
    assert verify_password(stored, "password") is True
    assert verify_password(stored.replace("BLF-CRYPT", "CRYPT"), "password") is True
    assert verify_password(stored, "Password") is False


@pytest.mark.parametrize("field", [
    "{SHA}not base64!!",
    "{SHA}AAAA",                      # wrong length
    "{SSHA}" + base64.b64encode(b"x" * 20).decode(),   # no salt
    "{CRAM-MD5}zz",
    "{SCRAM-SHA-1}4096,abc",
    "{SCRAM-SHA-1}x,QSXCR+Q6sek8bf92,6dlGYMOdZcOPutkcNY8U2g7vK9Y=,D+CSWLOshSulAsxiupA+qs2/fTE=",
    "{SCRAM-SHA-256}4096,QSXCR+Q6sek8bf92,6dlGYMOdZcOPutkcNY8U2g7vK9Y=,D+CSWLOshSulAsxiupA+qs2/fTE=",
    "{PBKDF2}$1$salt$notanumber$abcd",
    "{BLF-CRYPT}$2y$05$short",
    "{ARGON2ID}$argon2id$garbage",
    "{SHA512-CRYPT}$1$GgvxyNz8$OjZhLh4P.gF1lxYEbLZ3e/",
    "{CRYPT}$y$j9T$abc$def",           # yescrypt without its 43-character hash
    "{CRYPT}$7$CU..../....salt$short",  # scrypt, the same
    "{CRYPT}not-a-crypt-hash!",
    "{PLAIN}",
    # well-formed to a parser, refused by bcrypt / Argon2 at every login: a 535 forever
    "{BLF-CRYPT}$2y$99$Nl7m.B6QXfD8EP7jbGLIR.vnWJtvKf1moG98wMZ74m9DHLtHH/j1W",   # cost
    "{BLF-CRYPT}$2y$03$Nl7m.B6QXfD8EP7jbGLIR.vnWJtvKf1moG98wMZ74m9DHLtHH/j1W",
    "{CRYPT}$2y$32$Nl7m.B6QXfD8EP7jbGLIR.vnWJtvKf1moG98wMZ74m9DHLtHH/j1W",
    "{BLF-CRYPT}$2y$05$Nl7m.B6QXfD8EP7jbGLIR.vnWJtvKf1moG98wMZ74m9DHLtHH/j1$",   # alphabet
    "{ARGON2ID}$argon2id$v=19$m=0,t=3,p=1$OTClbv6fXVAyo6BZpLqQ7A$"
    "hFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=0,p=1$OTClbv6fXVAyo6BZpLqQ7A$"
    "hFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf",
    "{ARGON2I}$argon2i$v=19$m=32768,t=4,p=0$OTClbv6fXVAyo6BZpLqQ7A$"
    "hFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf",
    "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$$hFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf",
    "{ARGON2ID}$argon2id$v=18$m=65536,t=3,p=1$OTClbv6fXVAyo6BZpLqQ7A$"
    "hFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf8DhFf",
])
def test_malformed_fields_raise(field: str) -> None:
    """Malformed data is a MalformedPassword (a PasswordError), not a silent mismatch."""
    with pytest.raises(MalformedPassword):
        parse_password(field)
    with pytest.raises(PasswordError):
        verify_password(field, "test")


def test_default_scheme_applies_to_bare_fields() -> None:
    """A bare field uses the default scheme given (Dovecot: default_password_scheme)."""
    assert verify_password("test", "test", default_scheme="PLAIN") is True
    assert verify_password("dGVzdA==", "test", default_scheme="PLAIN.b64") is True
    with pytest.raises(MalformedPassword):
        parse_password("test")  # CRYPT by default: not a crypt hash


def test_repr_hides_the_data() -> None:
    """StoredPassword's repr shows the scheme only."""
    sp = parse_password("{PLAIN}topsecret")
    assert "topsecret" not in repr(sp)
    assert sp.scheme == "PLAIN"


def test_stored_secrets() -> None:
    """Secret kinds per field: plaintext, cram-md5, scram tuples; nothing for one-way hashes."""
    assert stored_secrets("{PLAIN}test") == {"plaintext": "test"}
    assert stored_secrets("{PLAIN.b64}dGVzdA==") == {"plaintext": "test"}
    assert stored_secrets(SPEC_VECTORS[10]) == {"cram-md5": cram_md5_context("test")}
    assert stored_secrets(RFC5802_FIELD) == {"scram-sha-1": (
        4096, base64.b64decode("QSXCR+Q6sek8bf92"),
        base64.b64decode("6dlGYMOdZcOPutkcNY8U2g7vK9Y="),
        base64.b64decode("D+CSWLOshSulAsxiupA+qs2/fTE="))}
    (kind, value), = stored_secrets(RFC7677_FIELD).items()
    assert kind == "scram-sha-256" and value[0] == 4096 and len(value[2]) == 32
    for field in ("{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=", SPEC_VECTORS[3], SPEC_VECTORS[1]):
        assert stored_secrets(field) == {}


def test_cost_keys_and_expense() -> None:
    """cost_key groups hashes of equal cost; is_expensive separates KDFs from digests."""
    assert cost_key(SPEC_VECTORS[3]) == "bcrypt:05"
    assert cost_key(DOVEADM_VECTORS[5]) == "crypt6:rounds=5000"
    assert cost_key(DOVEADM_VECTORS[4]) == "crypt5:rounds=10000"
    assert cost_key(SPEC_VECTORS[4]) == "argon2:$argon2id$v=19$m=65536,t=3,p=1"
    assert cost_key(SPEC_VECTORS[11]) == "SCRAM-SHA-1:4096"
    assert cost_key(SPEC_VECTORS[-1]) == "PBKDF2:5000"
    assert cost_key("{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=") == "SHA"
    assert is_expensive(SPEC_VECTORS[3]) and is_expensive(SPEC_VECTORS[-1])
    assert not is_expensive("{PLAIN}x") and not is_expensive(SPEC_VECTORS[10])


def test_no_stdlib_crypt_import() -> None:
    """The module never uses the deprecated stdlib crypt module, nor passlib (Python
    hashing that holds the GIL, and a second SASLprep)."""
    source = open(passwords.__file__, encoding="utf-8").read()
    assert "import crypt" not in source
    assert "passlib" not in source


def _doveadm() -> str | None:
    from tests.conftest import require_binary
    return require_binary("doveadm", "dovecot-core")


@pytest.mark.parametrize("scheme", [s for s in MAKE_SCHEMES if s != "DIGEST-MD5"])
def test_dovecot_verifies_our_hashes(scheme: str) -> None:
    """Interop: ``doveadm pw -t`` accepts every field make_hash produces (non-ASCII password)."""
    doveadm = _doveadm()
    field = make_hash(scheme, "tést pw", rounds=FAST.get(scheme))
    result = subprocess.run([doveadm, "pw", "-t", field, "-p", "tést pw"],
                            capture_output=True, text=True, timeout=30)
    assert "(verified)" in result.stdout, result.stderr


#: ``doveadm pw -s SCHEME [-r ROUNDS] -p 'pässwörd €'`` (Dovecot 2.3.19.1): non-ASCII.
DOVEADM_UTF8_PASSWORD = "pässwörd €"
DOVEADM_UTF8_VECTORS = [
    "{SHA512-CRYPT}$6$rounds=100000$pgWh79iNHklM0n7A$hKo.kpFP6qta4fF/8V.Jcl23TGXoD9NpMUl18Lgaw"
    "jrTfw3SbO/PWtfj4w7lIPnT6HgriWt1vkqLcDzlHzL6Z1",
    "{SHA512-CRYPT}$6$vusWYdksI3VhvgPF$YCnXQUiO42z8hj11XumwURGdeRkpGHyutDnqSwAqgWt6GS7EH4Wx1deiUEb"
    "XfiM.yPh6URWJ7fBtkiwa6.cBW/",
    "{SHA256-CRYPT}$5$QHhPJI2hXRNA5jr5$eV.vj5KrjLssWX4EFxzuHFgPi9UhIGL/lOOIx/yxwV4",
    "{MD5-CRYPT}$1$0VWwh0W7$Lc5T1NnoWqJIC03NAATET1",
    "{CRYPT}$2y$05$hdLheJdLJw4vG3UgAtM6FORQB8Ph463KF1g1zMWQUdm05yCUF9mEK",
    "{DES-CRYPT}J74J9YRxaXR4g",
    # ``mkpasswd -m yescrypt|scrypt|gost-yescrypt 'pässwörd €'`` (whois 5.5.17, libxcrypt 4.4.33):
    # what Debian writes to /etc/shadow, as Dovecot's {CRYPT} and as a bare default-scheme field
    "{CRYPT}$y$j9T$0Y9yrHnXsa5dVS.6nByvb/$YEd.6dgEjmJUWZecgt9KNmzg8lAW2veCbRxi.ysWxa4",
    "$y$j9T$0Y9yrHnXsa5dVS.6nByvb/$YEd.6dgEjmJUWZecgt9KNmzg8lAW2veCbRxi.ysWxa4",
    "{CRYPT}$7$CU..../....ibQAi.FXw2P4DB7mdF9rP1$7x7i4ipj.OeJC26GXjDZd8SX9MwUEQtgYU0.wEmh.tA",
    "{CRYPT}$gy$j9T$W0Pi/szjpDNzcQ.26w3k50$GJX57i5r1MGBU1A8oTNYQ2nBX0CIGUD6EDxWdP4WK0/",
]


@pytest.mark.parametrize("field", DOVEADM_UTF8_VECTORS)
def test_doveadm_utf8_crypt_vectors(field: str) -> None:
    """crypt(3) schemes verify Dovecot's hashes of a non-ASCII password, and only it."""
    assert verify_password(field, DOVEADM_UTF8_PASSWORD) is True
    assert verify_password(field, "x" + DOVEADM_UTF8_PASSWORD) is False
    assert verify_password(field, DOVEADM_UTF8_PASSWORD + "\0x") is False


@pytest.mark.parametrize("scheme,rounds", [
    ("SHA512-CRYPT", 100_000), ("SHA256-CRYPT", 100_000), ("MD5-CRYPT", None),
    ("BLF-CRYPT", 8), ("ARGON2ID", 1), ("PBKDF2", 100_000), ("SCRAM-SHA-256", 20_000),
    ("YESCRYPT", 8), ("SCRYPT", 8),
])
def test_expensive_verification_releases_the_gil(scheme: str, rounds: int | None) -> None:
    """Every expensive scheme's verification leaves the GIL free while it computes: with a
    switch interval of one second, a worker thread that held the GIL while hashing would
    keep the main thread from waking up until it is done (libpass's Python SHA512-CRYPT
    starved it for the whole hash)."""
    import sys
    import threading
    import time
    stored = make_hash(scheme, "pw", rounds=rounds)
    assert is_expensive(stored)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        started = threading.Event()
        started_at: list[float] = []
        results: list[bool] = []

        def work() -> None:
            started_at.append(time.perf_counter())
            started.set()
            while time.perf_counter() - started_at[0] < 0.4:  # cheap schemes: repeat
                results.append(verify_password(stored, "pw"))

        worker = threading.Thread(target=work)
        worker.start()
        started.wait()
        gaps, last = [], started_at[0]
        while True:
            time.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            if not worker.is_alive():
                break
        elapsed = time.perf_counter() - started_at[0]
        worker.join()
    finally:
        sys.setswitchinterval(previous)
    assert results and all(results)
    assert elapsed >= 0.4
    # holding the GIL: one gap as long as all the hashing; releasing it: the main thread
    # ticks every ~2 ms (the margin is for a machine busy with other work)
    assert len(gaps) > 20 and max(gaps) < 0.4 * elapsed, \
        f"main thread starved for {max(gaps) * 1000:.0f} ms of {elapsed * 1000:.0f} ms"


@pytest.mark.parametrize("field", [
    "{SHA512-CRYPT}$6$broken",
    "{SHA512-CRYPT}$6$rounds=5000$salt$",
    "{SHA512-CRYPT}$6$salt$tooshort",
    "{SHA256-CRYPT}$5$V2zjtSbnPLg3xYQN$WUlqnA3JxzeqXrJIo5r80NobwHGyqqQdizyzsbJZIP",
    "{MD5-CRYPT}$1$GgvxyNz8$",
    "{CRYPT}$6$broken",
    "{CRYPT}//EsnG9FLTKj",
    "{CRYPT}$y$j9T$0Y9yrHnXsa5dVS.6nByvb/$YEd.6dgEjmJUWZecgt9KNmzg8lAW2veCbRxi.ysWxa",
    "{CRYPT}$7$CU..../....ibQAi.FXw2P4DB7mdF9rP1$",
])
def test_truncated_crypt_hashes_are_malformed(field: str) -> None:
    """A crypt hash without its full checksum can never verify: it is malformed, so
    ``--check`` and the users-file loader report it instead of a silent 535 forever."""
    with pytest.raises(MalformedPassword):
        parse_password(field)


@pytest.mark.parametrize("method,expected", [("yescrypt", "$y$"), ("scrypt", "$7$"),
                                             ("gost-yescrypt", "$gy$")])
def test_mkpasswd_hashes_verify(method: str, expected: str) -> None:
    """Interop: what ``mkpasswd -m yescrypt`` (Debian's /etc/shadow default) or ``-m scrypt``
    makes now verifies through {CRYPT}, and a bare field under the default scheme."""
    from tests.conftest import require_binary
    mkpasswd = require_binary("mkpasswd", "whois")
    made = subprocess.run([mkpasswd, "-m", method, "--stdin"], input="tést pw\n",
                          capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    assert made.startswith(expected)
    for field in (made, "{CRYPT}" + made):
        assert verify_password(field, "tést pw") is True
        assert verify_password(field, "tést pW") is False
        assert is_expensive(field)


def test_yescrypt_and_scrypt_costs() -> None:
    """The cost is libcrypt's (yescrypt 1-11, default 5: ``$y$j9T``, mkpasswd's; scrypt
    6-11, default 7: ``$7$CU``); the cost key keeps the parameters, not the salt."""
    assert make_hash("YESCRYPT", "x").startswith("{CRYPT}$y$j9T$")
    assert make_hash("SCRYPT", "x").startswith("{CRYPT}$7$CU..../....")
    a, b = make_hash("YESCRYPT", "x"), make_hash("YESCRYPT", "x", rounds=1)
    assert cost_key(a) == cost_key(make_hash("YESCRYPT", "y")) == "crypt:$y$j9T"
    assert cost_key(a) != cost_key(b)
    assert cost_key(make_hash("SCRYPT", "x")) == "crypt:$7$CU..../...."
    for scheme, bad in (("YESCRYPT", 12), ("SCRYPT", 5), ("SCRYPT", 12)):
        with pytest.raises(ValueError, match="cost must be between"):
            make_hash(scheme, "x", rounds=bad)
    with pytest.raises(UnknownScheme):  # Dovecot has no such scheme: {CRYPT} holds them
        parse_password("{YESCRYPT}$y$j9T$0Y9yrHnXsa5dVS.6nByvb/$YEd.6dgEjmJUWZecgt9KNmzg8lAW2veCbRxi.ysWxa4")
