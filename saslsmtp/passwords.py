"""Dovecot password schemes: parse ``{SCHEME}data``, verify a plaintext, make new hashes.

No Twisted here: callers decide where the (possibly expensive) work runs.

A stored password field is ``{SCHEME}data``, ``{SCHEME.b64}data``, ``{SCHEME.hex}data``
or a bare ``data`` that uses the default scheme (Dovecot's default is ``CRYPT``).  Scheme
names are case-insensitive.  As in Dovecot, each scheme has a natural encoding (none,
base64 or hex); fixed-length digests (``{SHA}``, ``{SHA256}``, ``{LDAP-MD5}``...) accept
either hex or base64 and the length tells which; ``.b64``/``.hex`` override the guess.

Every scheme is described in ONE place, its ``Scheme`` entry in ``SCHEMES`` (below): names,
encoding, format check, verification, cost, what challenge mechanisms can use, how to make
one, default cost and help text.  ``VERIFY_SCHEMES``, ``MAKE_SCHEMES`` and
``DEFAULT_ROUNDS`` are derived from it.

Expensive schemes are computed by code that releases the GIL (see docs/passwords.md):
the crypt(3) family by the system's libcrypt (``saslsmtp.libcrypt``), bcrypt and Argon2 by
their C extensions, SCRAM and PBKDF2 by ``hashlib.pbkdf2_hmac``.

Nothing in this module puts a password (or a stored hash) into an exception message
or a repr.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from saslsmtp import libcrypt
from saslsmtp.sasl import cram_md5 as _cram
from saslsmtp.sasl import scram as _scram

__all__ = [
    "PasswordError", "UnknownScheme", "MalformedPassword", "StoredPassword", "Scheme",
    "SCHEMES", "parse_password", "verify_password", "make_hash", "stored_secrets",
    "cost_key", "is_expensive", "cram_md5_context", "cram_md5_digest", "scram_keys",
    "MAKE_SCHEMES", "VERIFY_SCHEMES", "DEFAULT_ROUNDS",
]


class PasswordError(ValueError):
    """A stored password field cannot be used (its message never contains secrets)."""


class UnknownScheme(PasswordError):
    """The ``{SCHEME}`` is not one this module knows."""


class MalformedPassword(PasswordError):
    """The data after ``{SCHEME}`` does not fit the scheme's format."""


# ---- small helpers -----------------------------------------------------------------

NONE, B64, HEX = "none", "b64", "hex"

Verify = Callable[[bytes, bytes, "str | None"], bool]     # (raw, password, username)
Make = Callable[[bytes, "int | None", "bytes | None", "str | None"], str]  # -> data


def _b(password: bytes | str) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


def _eq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _b64decode(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedPassword("invalid base64 data") from None


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _hexdecode(data: bytes) -> bytes:
    try:
        return bytes.fromhex(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedPassword("invalid hex data") from None


def _ascii(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedPassword("non-ASCII data") from None


def _salt_chars(n: int) -> str:
    alphabet = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    return "".join(alphabet[b % 64] for b in os.urandom(n))


def _no_check(raw: bytes) -> None:
    return None


# ---- the scheme record ---------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    """Everything about one password scheme."""

    name: str
    verify: Verify
    aliases: tuple[str, ...] = ()
    encoding: str = NONE             # natural encoding of the data
    raw_len: int = 0                 # fixed raw length (hex or base64 guessed), or 0
    check: Callable[[bytes], None] = _no_check   # raises MalformedPassword
    expensive: bool = False          # real CPU: run it in the thread pool
    cost: Callable[[bytes], str] | None = None   # cost key (default: the name)
    secrets: Callable[[bytes], dict[str, object]] | None = None  # for challenge mechanisms
    make: Make | None = None         # new data in the natural encoding
    default_rounds: int | None = None
    make_variants: tuple[str, ...] = ()   # extra ``make_hash`` names (``PLAIN.B64``)
    stored_as: str = ""              # make-only: the scheme the new field names (``CRYPT``)
    help: str = ""                   # one line for ``saslsmtp-passwd --help``


# ---- plain and digests ----------------------------------------------------------------


def _verify_plain(raw: bytes, pw: bytes, user: str | None) -> bool:
    return _eq(raw, pw)


def _plain_secrets(raw: bytes) -> dict[str, object]:
    try:
        return {"plaintext": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {}


def _make_plain(pw: bytes, rounds: int | None, salt: bytes | None, user: str | None) -> str:
    return pw.decode("utf-8")


def _digest(name: str) -> tuple[Verify, Make]:
    def verify(raw: bytes, pw: bytes, user: str | None) -> bool:
        return _eq(hashlib.new(name, pw).digest(), raw)

    def make(pw: bytes, rounds: int | None, salt: bytes | None, user: str | None) -> str:
        return _b64(hashlib.new(name, pw).digest())
    return verify, make


def _make_plain_md5(pw: bytes, rounds: int | None, salt: bytes | None, user: str | None) -> str:
    return hashlib.md5(pw).hexdigest()


def _salted(name: str) -> tuple[Verify, Callable[[bytes], None], Make]:
    size = hashlib.new(name).digest_size

    def check(raw: bytes) -> None:
        if len(raw) <= size:
            raise MalformedPassword("salted digest is too short (no salt)")

    def verify(raw: bytes, pw: bytes, user: str | None) -> bool:
        check(raw)
        return _eq(hashlib.new(name, pw + raw[size:]).digest(), raw[:size])

    def make(pw: bytes, rounds: int | None, salt: bytes | None, user: str | None) -> str:
        s = os.urandom(8) if salt is None else salt
        return _b64(hashlib.new(name, pw + s).digest() + s)
    return verify, check, make


# ---- CRAM-MD5 contexts: the MD5 that continues from a saved state lives in the mechanism

def cram_md5_context(password: bytes | str) -> str:
    """Dovecot's ``{CRAM-MD5}`` data: MD5 states after key^opad then key^ipad, 64 hex."""
    return _cram.cram_md5_context(_b(password))


def cram_md5_digest(context: str | bytes, challenge: bytes) -> str:
    """The CRAM-MD5 response digest (lowercase hex) for ``challenge``, from either a
    64-hex ``{CRAM-MD5}`` context or its 32 raw bytes; equals
    ``HMAC-MD5(password, challenge)``."""
    data = _b(context)
    raw = _hexdecode(data) if len(data) == 64 else data
    if len(raw) != 32:
        raise MalformedPassword("a CRAM-MD5 context is 32 bytes (64 hex characters)")
    return _cram.digest_from_context(raw.hex(), challenge)


def _verify_cram(raw: bytes, pw: bytes, user: str | None) -> bool:
    return _eq(bytes.fromhex(cram_md5_context(pw)), raw)


def _make_cram(pw: bytes, rounds: int | None, salt: bytes | None, user: str | None) -> str:
    return cram_md5_context(pw)


def _digest_md5_raw(pw: bytes, user: str) -> bytes:
    name, _, realm = user.partition("@")
    return hashlib.md5(b"%s:%s:%s" % (name.encode(), realm.encode(), pw)).digest()


def _verify_digest_md5(raw: bytes, pw: bytes, user: str | None) -> bool:
    return user is not None and _eq(_digest_md5_raw(pw, user), raw)


def _make_digest_md5(pw: bytes, rounds: int | None, salt: bytes | None, user: str | None) -> str:
    if not user:
        raise ValueError("DIGEST-MD5 needs the username (user@realm)")
    return _digest_md5_raw(pw, user).hex()


# ---- crypt(3): libcrypt computes, these patterns say what a complete hash looks like ---

_H64 = "[./0-9A-Za-z]"
_SALT = r"[^$:\s]"
_CRYPT_FORMATS: dict[str, re.Pattern[str]] = {
    "md5": re.compile(rf"\$1\${_SALT}{{0,8}}\${_H64}{{22}}"),
    "sha256": re.compile(rf"\$5\$(?:rounds=(?P<rounds>[0-9]+)\$)?{_SALT}{{0,16}}\${_H64}{{43}}"),
    "sha512": re.compile(rf"\$6\$(?:rounds=(?P<rounds>[0-9]+)\$)?{_SALT}{{0,16}}\${_H64}{{86}}"),
    "des": re.compile(rf"{_H64}{{13}}"),
    "bsdi": re.compile(rf"_{_H64}{{19}}"),
    "bcrypt": re.compile(rf"\$2[abxy]\$[0-9]{{2}}\${_H64}{{53}}"),
    # yescrypt (Debian's default for /etc/shadow), its GOST variant, and scrypt: libcrypt
    # reads their parameters from the hash itself
    "yescrypt": re.compile(rf"\$g?y\${_H64}+\${_H64}*\${_H64}{{43}}"),
    "scrypt": re.compile(rf"\$7\${_H64}{{11}}{_H64}*\${_H64}{{43}}"),
}


def _crypt_format(formats: tuple[str, ...], scheme: str, raw: bytes) -> str:
    """Which of ``formats`` the complete hash ``raw`` is; ``MalformedPassword`` if none."""
    text = _ascii(raw)
    for name in formats:
        match = _CRYPT_FORMATS[name].fullmatch(text)
        if match:
            rounds = match.groupdict().get("rounds")
            if rounds is not None and not 1000 <= int(rounds) <= 999_999_999:
                raise MalformedPassword(f"{scheme} rounds out of range (1000-999999999)")
            return name
    raise MalformedPassword(f"not a complete {scheme} hash (truncated, or another scheme)")


def _crypt(*formats: str) -> tuple[Callable[[str], Callable[[bytes], None]], Callable[[str], Verify]]:
    def check(scheme: str) -> Callable[[bytes], None]:
        def run(raw: bytes) -> None:
            if _crypt_format(formats, scheme, raw) == "bcrypt":
                _check_bcrypt(raw)  # its cost and alphabet too
        return run

    def verify(scheme: str) -> Verify:
        def run(raw: bytes, pw: bytes, user: str | None) -> bool:
            if _crypt_format(formats, scheme, raw) == "bcrypt":
                return _verify_bcrypt(raw, pw, user)
            result = libcrypt.crypt(pw, raw)
            return result is not None and _eq(result, raw)
        return run
    return check, verify


def _crypt_cost(raw: bytes) -> str:
    text = raw.decode("ascii", "replace")
    if text.startswith("$2"):
        return f"bcrypt:{text[4:6]}"
    if text.startswith(("$y$", "$gy$", "$7$")):  # the method and its parameters
        method, params = text.split("$")[1:3]
        return f"crypt:${method}${params[:11] if method == '7' else params}"
    if text.startswith(("$5$", "$6$")):
        part = text.split("$")[2]
        return f"crypt{text[1]}:{part if part.startswith('rounds=') else 'rounds=5000'}"
    return f"crypt:{text[:3] if text.startswith('$') else 'des'}"


def _make_crypt(prefix: str, salt_len: int, with_rounds: bool) -> Make:
    def make(pw: bytes, rounds: int | None, salt: bytes | None, user: str | None) -> str:
        setting = prefix
        if with_rounds:
            assert rounds is not None
            if not 1000 <= rounds <= 999_999_999:
                raise ValueError("crypt rounds must be between 1000 and 999999999")
            setting += f"rounds={rounds}$"
        setting += _salt_chars(salt_len) if salt is None else salt.decode("ascii")
        result = libcrypt.crypt(pw, setting.encode("ascii"))
        if result is None:
            raise ValueError("libcrypt refused this password (a NUL byte, or over 512 bytes)")
        return result.decode("ascii")
    return make


def _make_gensalt(prefix: bytes, name: str, costs: range) -> Make:
    """A new hash of a method whose setting libcrypt makes (``crypt_gensalt_rn``), at cost
    ``rounds`` (yescrypt 1-11, scrypt 6-11: libcrypt's ranges)."""
    def make(pw: bytes, rounds: int | None, salt: bytes | None, user: str | None) -> str:
        assert rounds is not None
        if rounds not in costs:
            raise ValueError(f"{name} cost must be between {costs.start} and {costs.stop - 1}")
        setting = libcrypt.gensalt(prefix, rounds, os.urandom(16) if salt is None else salt)
        if setting is None:
            raise ValueError(f"this system's libcrypt cannot make {name} hashes")
        result = libcrypt.crypt(pw, setting)
        if result is None:
            raise ValueError("libcrypt refused this password (a NUL byte, or over 512 bytes)")
        return result.decode("ascii")
    return make


_BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$", b"$2x$")


def _check_bcrypt(raw: bytes) -> None:
    """A complete bcrypt hash that can verify: prefix, a cost of 04-31 and 53 characters of
    bcrypt's base64 (bcrypt refuses any other, so that user could never log in)."""
    if not raw.startswith(_BCRYPT_PREFIXES) or len(raw) != 60 or not raw[4:6].isdigit() or raw[6:7] != b"$":
        raise MalformedPassword("malformed BLF-CRYPT hash")
    if not 4 <= int(raw[4:6]) <= 31:
        raise MalformedPassword("BLF-CRYPT cost out of range (04-31)")
    if not _CRYPT_FORMATS["bcrypt"].fullmatch(_ascii(raw)):
        raise MalformedPassword("malformed BLF-CRYPT hash (a character that is not bcrypt's base64)")


def _verify_bcrypt(raw: bytes, pw: bytes, user: str | None) -> bool:
    import bcrypt
    _check_bcrypt(raw)
    if raw.startswith(b"$2x$"):  # the old buggy variant: libcrypt still computes it, as for Dovecot
        result = libcrypt.crypt(pw, raw)
        return result is not None and _eq(result, raw)
    try:
        return bool(bcrypt.checkpw(pw, raw))
    except ValueError:
        # bcrypt >= 5 refuses passwords over 72 bytes; such a password cannot match.
        return False


def _make_bcrypt(pw: bytes, rounds: int | None, salt: bytes | None, user: str | None) -> str:
    import bcrypt
    assert rounds is not None
    if len(pw) > 72:
        raise ValueError("BLF-CRYPT (bcrypt) passwords are limited to 72 bytes")
    if not 4 <= rounds <= 31:
        raise ValueError("BLF-CRYPT cost must be between 4 and 31")
    return bcrypt.hashpw(pw, bcrypt.gensalt(rounds)).decode("ascii")


# ---- Argon2 (argon2-cffi) --------------------------------------------------------------


def _check_argon2(raw: bytes) -> None:
    from argon2 import extract_parameters
    from argon2.exceptions import InvalidHashError
    try:
        found = extract_parameters(_ascii(raw))
    except (InvalidHashError, ValueError):
        raise MalformedPassword("malformed ARGON2 hash") from None
    # what Argon2 (RFC 9106) accepts: anything else fails every verification silently
    if found.version not in (16, 19):
        raise MalformedPassword(f"ARGON2 version v={found.version} unknown (16 or 19)")
    if not (found.time_cost >= 1 and 1 <= found.parallelism < 2 ** 24
            and found.memory_cost >= 8 * found.parallelism):
        raise MalformedPassword("ARGON2 parameters out of range (t >= 1, 1 <= p < 2^24,"
                                " m >= 8 * p)")
    if found.salt_len < 8 or found.hash_len < 4:
        raise MalformedPassword("ARGON2 salt or hash too short (at least 8 and 4 bytes)")


def _verify_argon2(raw: bytes, pw: bytes, user: str | None) -> bool:
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError
    try:
        return bool(PasswordHasher().verify(_ascii(raw), pw))
    except (VerificationError, InvalidHashError, ValueError):
        return False


def _argon2_cost(raw: bytes) -> str:
    return "argon2:" + raw.decode("ascii", "replace").rsplit("$", 2)[0]


def _make_argon2(id_variant: bool) -> Make:
    def make(pw: bytes, rounds: int | None, salt: bytes | None, user: str | None) -> str:
        from argon2 import PasswordHasher, Type
        assert rounds is not None
        hasher = PasswordHasher(time_cost=rounds, type=Type.ID if id_variant else Type.I)
        if salt is None:
            return hasher.hash(pw)
        from argon2.low_level import hash_secret
        return hash_secret(pw, salt, hasher.time_cost, hasher.memory_cost, hasher.parallelism,
                           hasher.hash_len, hasher.type).decode("ascii")
    return make


# ---- SCRAM (RFC 5802): the algorithm is saslsmtp.sasl.scram's -------------------------

_SCRAM_HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}


def _password_candidates(password: bytes) -> list[bytes]:
    """Normalize(password) first; the raw bytes too when they differ (Dovecot does not
    SASLprep when it generates, so accept either)."""
    out = []
    try:
        out.append(_scram.normalize(password.decode("utf-8")))
    except UnicodeDecodeError:
        pass
    if password not in out:
        out.append(password)
    return out


def scram_keys(hash_name: str, password: bytes | str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """``(StoredKey, ServerKey)`` for a password, without SASLprep (callers normalize)."""
    keys = _scram.keys_from_bytes(hash_name, _b(password), salt, iterations)
    return keys.stored_key, keys.server_key


def _parse_scram(scheme: str, raw: bytes) -> tuple[int, bytes, bytes, bytes]:
    parts = _ascii(raw).split(",")
    if len(parts) != 4:
        raise MalformedPassword(f"{scheme} wants iterations,salt,StoredKey,ServerKey")
    try:
        iterations = int(parts[0])
    except ValueError:
        raise MalformedPassword(f"{scheme} iteration count is not a number") from None
    if not 1 <= iterations <= 10_000_000:
        raise MalformedPassword(f"{scheme} iteration count out of range")
    salt, stored, server = (_b64decode(p.encode("ascii")) for p in parts[1:])
    size = hashlib.new(_SCRAM_HASHES[scheme]).digest_size
    if len(stored) != size or len(server) != size or not salt:
        raise MalformedPassword(f"{scheme} keys have the wrong length")
    return iterations, salt, stored, server


def _scram_scheme(scheme: str, help: str) -> Scheme:
    hash_name = _SCRAM_HASHES[scheme]

    def verify(raw: bytes, pw: bytes, user: str | None) -> bool:
        iterations, salt, stored, server = _parse_scram(scheme, raw)
        ok = False
        for candidate in _password_candidates(pw):
            keys = _scram.keys_from_bytes(hash_name, candidate, salt, iterations)
            ok |= _eq(keys.stored_key, stored) & _eq(keys.server_key, server)
        return ok

    def make(pw: bytes, rounds: int | None, salt: bytes | None, user: str | None) -> str:
        assert rounds is not None
        s = os.urandom(16) if salt is None else salt
        keys = _scram.keys_from_bytes(hash_name, _password_candidates(pw)[0], s, rounds)
        return "%d,%s" % (rounds, ",".join(_b64(x) for x in (s, keys.stored_key, keys.server_key)))

    return Scheme(
        scheme, verify, check=lambda raw: _parse_scram(scheme, raw) and None, expensive=True,
        cost=lambda raw: f"{scheme}:{raw.split(b',', 1)[0].decode('ascii', 'replace')}",
        secrets=lambda raw: {scheme.lower(): _parse_scram(scheme, raw)},
        make=make, default_rounds=4096, help=help)


# ---- PBKDF2 (Dovecot's PBKDF2-HMAC-SHA1) -----------------------------------------------


def _parse_pbkdf2(raw: bytes) -> tuple[bytes, int, bytes]:
    parts = raw.split(b"$")
    if len(parts) != 5 or parts[0] != b"" or parts[1] != b"1" or not parts[3].isdigit():
        raise MalformedPassword("PBKDF2 wants $1$salt$rounds$hex")
    rounds = int(parts[3])
    if not 1 <= rounds <= 10_000_000:
        raise MalformedPassword("PBKDF2 rounds out of range")
    digest = _hexdecode(parts[4])
    if len(digest) != 20:
        raise MalformedPassword("PBKDF2 digest has the wrong length")
    return parts[2], rounds, digest


def _verify_pbkdf2(raw: bytes, pw: bytes, user: str | None) -> bool:
    salt, rounds, digest = _parse_pbkdf2(raw)
    return _eq(hashlib.pbkdf2_hmac("sha1", pw, salt, rounds, 20), digest)


def _make_pbkdf2(pw: bytes, rounds: int | None, salt: bytes | None, user: str | None) -> str:
    assert rounds is not None
    s = _salt_chars(16).encode("ascii") if salt is None else salt
    if b"$" in s:
        raise ValueError("a PBKDF2 salt cannot contain '$'")
    digest = hashlib.pbkdf2_hmac("sha1", pw, s, rounds, 20).hex()
    return "$1$%s$%d$%s" % (s.decode("ascii"), rounds, digest)


# ---- the schemes, one entry each (in MAKE_SCHEMES order: strongest first) --------------

_crypt_check, _crypt_verify = _crypt("md5", "sha256", "sha512", "des", "bsdi", "bcrypt",
                                     "yescrypt", "scrypt")
_md5c_check, _md5c_verify = _crypt("md5")
_sha256c_check, _sha256c_verify = _crypt("sha256")
_sha512c_check, _sha512c_verify = _crypt("sha512")
_desc_check, _desc_verify = _crypt("des")
_sha1_verify, _sha1_make = _digest("sha1")
_sha256_verify, _sha256_make = _digest("sha256")
_sha512_verify, _sha512_make = _digest("sha512")
_md5_verify, _md5_make = _digest("md5")
_ssha = {name: _salted(name) for name in ("sha1", "sha256", "sha512", "md5")}

SCHEMES: tuple[Scheme, ...] = (
    Scheme("ARGON2ID", _verify_argon2, check=_check_argon2, expensive=True, cost=_argon2_cost,
           make=_make_argon2(True), default_rounds=3,
           help="Argon2id (argon2-cffi defaults: 64 MiB, t=3; --rounds = time cost)"),
    Scheme("ARGON2I", _verify_argon2, check=_check_argon2, expensive=True, cost=_argon2_cost,
           make=_make_argon2(False), default_rounds=4, help="Argon2i (--rounds = time cost)"),
    Scheme("BLF-CRYPT", _verify_bcrypt, check=_check_bcrypt, expensive=True, cost=_crypt_cost,
           make=_make_bcrypt, default_rounds=12,
           help="bcrypt $2b$ (--rounds = log2 cost, default 12; max 72-byte passwords)"),
    # make-only: Dovecot has no scheme name for these, its {CRYPT} verifies them
    Scheme("YESCRYPT", _crypt_verify("CRYPT"), expensive=True, stored_as="CRYPT",
           make=_make_gensalt(b"$y$", "YESCRYPT", range(1, 12)), default_rounds=5,
           help="{CRYPT}$y$ yescrypt, Debian's /etc/shadow default (--rounds = cost 1-11,"
                " default 5)"),
    Scheme("SCRYPT", _crypt_verify("CRYPT"), expensive=True, stored_as="CRYPT",
           make=_make_gensalt(b"$7$", "SCRYPT", range(6, 12)), default_rounds=7,
           help="{CRYPT}$7$ scrypt (--rounds = cost 6-11, default 7)"),
    Scheme("SHA512-CRYPT", _sha512c_verify("SHA512-CRYPT"), check=_sha512c_check("SHA512-CRYPT"),
           expensive=True, cost=_crypt_cost, make=_make_crypt("$6$", 16, True),
           default_rounds=100_000, help="crypt $6$ (--rounds default 100000) [default]"),
    Scheme("SHA256-CRYPT", _sha256c_verify("SHA256-CRYPT"), check=_sha256c_check("SHA256-CRYPT"),
           expensive=True, cost=_crypt_cost, make=_make_crypt("$5$", 16, True),
           default_rounds=100_000, help="crypt $5$ (--rounds default 100000)"),
    Scheme("PBKDF2", _verify_pbkdf2, check=lambda raw: _parse_pbkdf2(raw) and None,
           expensive=True, cost=lambda raw: f"PBKDF2:{_parse_pbkdf2(raw)[1]}",
           make=_make_pbkdf2, default_rounds=100_000,
           help="Dovecot PBKDF2-HMAC-SHA1 (--rounds default 100000)"),
    _scram_scheme("SCRAM-SHA-256", "SCRAM verifier: also serves AUTH SCRAM-SHA-256 (--rounds default 4096)"),
    _scram_scheme("SCRAM-SHA-1", "SCRAM verifier: also serves AUTH SCRAM-SHA-1 (--rounds default 4096)"),
    Scheme("CRAM-MD5", _verify_cram, aliases=("HMAC-MD5",), encoding=HEX, raw_len=32,
           secrets=lambda raw: {"cram-md5": raw.hex()}, make=_make_cram,
           help="HMAC-MD5 context: also serves AUTH CRAM-MD5 (password-equivalent)"),
    Scheme("SSHA512", _ssha["sha512"][0], encoding=B64, check=_ssha["sha512"][1],
           make=_ssha["sha512"][2], help="salted SHA-512 (fast: weak against offline guessing)"),
    Scheme("SSHA256", _ssha["sha256"][0], encoding=B64, check=_ssha["sha256"][1],
           make=_ssha["sha256"][2], help="salted SHA-256 (fast: weak against offline guessing)"),
    Scheme("SSHA", _ssha["sha1"][0], encoding=B64, check=_ssha["sha1"][1],
           make=_ssha["sha1"][2], help="salted SHA-1 (weak)"),
    Scheme("SHA512", _sha512_verify, encoding=B64, raw_len=64, make=_sha512_make,
           help="unsalted SHA-512 (weak)"),
    Scheme("SHA256", _sha256_verify, encoding=B64, raw_len=32, make=_sha256_make,
           help="unsalted SHA-256 (weak)"),
    Scheme("SHA", _sha1_verify, aliases=("SHA1",), encoding=B64, raw_len=20, make=_sha1_make,
           help="unsalted SHA-1 (weak)"),
    Scheme("SMD5", _ssha["md5"][0], encoding=B64, check=_ssha["md5"][1], make=_ssha["md5"][2],
           help="salted MD5 (weak)"),
    # "MD5" is MD5-CRYPT when the data looks like one, else LDAP-MD5 (see parse_password)
    Scheme("MD5-CRYPT", _md5c_verify("MD5-CRYPT"), aliases=("MD5",), check=_md5c_check("MD5-CRYPT"),
           expensive=True, cost=_crypt_cost, make=_make_crypt("$1$", 8, False),
           help="crypt $1$ (weak)"),
    Scheme("LDAP-MD5", _md5_verify, encoding=B64, raw_len=16, make=_md5_make,
           help="unsalted MD5, base64 (weak)"),
    Scheme("PLAIN-MD5", _md5_verify, encoding=HEX, raw_len=16, make=_make_plain_md5,
           help="unsalted MD5, hex (weak)"),
    Scheme("DIGEST-MD5", _verify_digest_md5, encoding=HEX, raw_len=16, make=_make_digest_md5,
           help="MD5(user:realm:password), realm from USER@realm (weak)"),
    Scheme("PLAIN", _verify_plain, aliases=("CLEAR", "CLEARTEXT"), secrets=_plain_secrets,
           make=_make_plain, make_variants=("PLAIN.B64",),
           help="cleartext (serves every mechanism; anyone who reads the file has it)"),
    # verification only
    Scheme("CRYPT", _crypt_verify("CRYPT"), check=_crypt_check("CRYPT"), expensive=True,
           cost=_crypt_cost),
    Scheme("DES-CRYPT", _desc_verify("DES-CRYPT"), check=_desc_check("DES-CRYPT"),
           expensive=True, cost=_crypt_cost),
    Scheme("ARGON2", _verify_argon2, check=_check_argon2, expensive=True, cost=_argon2_cost),
)

_BY_NAME: dict[str, Scheme] = {n: s for s in SCHEMES if not s.stored_as
                               for n in (s.name, *s.aliases)}
_MAKERS: dict[str, Scheme] = {s.name: s for s in SCHEMES if s.make is not None}
VERIFY_SCHEMES: tuple[str, ...] = tuple(sorted(_BY_NAME))
#: Schemes ``make_hash`` can produce, strongest first.
MAKE_SCHEMES: tuple[str, ...] = tuple(
    n for s in SCHEMES if s.make is not None for n in (s.name, *s.make_variants))
#: Default cost per scheme: crypt rounds, bcrypt log2 cost, argon2 time cost,
#: SCRAM iterations, PBKDF2 rounds.
DEFAULT_ROUNDS: dict[str, int] = {s.name: s.default_rounds for s in SCHEMES if s.default_rounds}
#: One line per makeable scheme (``saslsmtp-passwd --help``).
MAKE_HELP: dict[str, str] = {s.name: s.help for s in SCHEMES if s.make is not None}
MAKE_HELP["PLAIN.B64"] = "cleartext, base64 (for passwords containing ':')"


# ---- parsing -----------------------------------------------------------------------


@dataclass(frozen=True)
class StoredPassword:
    """A parsed password field: scheme as written (upper case), canonical scheme,
    and the decoded data.  ``repr()`` hides the data."""

    scheme: str
    canonical: str
    raw: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"StoredPassword(scheme={self.scheme!r}, raw=***)"

    @property
    def expensive(self) -> bool:
        """Whether verifying this one costs real CPU (run it off the reactor thread)."""
        return _BY_NAME[self.canonical].expensive


def _split_scheme(text: str, default_scheme: str) -> tuple[str, str | None, str]:
    if text.startswith("{"):
        end = text.find("}")
        if end > 0:
            name, _, enc = text[1:end].partition(".")
            return name.upper(), enc.lower() or None, text[end + 1:]
    name, _, enc = default_scheme.partition(".")
    return name.upper(), enc.lower() or None, text


def _decode(data: bytes, encoding: str) -> bytes:
    if encoding == HEX:
        return _hexdecode(data)
    if encoding == B64:
        return _b64decode(data)
    return data


def parse_password(text: str | StoredPassword, default_scheme: str = "CRYPT") -> StoredPassword:
    """Parse and validate a stored password field.

    Raises ``UnknownScheme`` or ``MalformedPassword`` (never with the data in the message).
    """
    if isinstance(text, StoredPassword):
        return text
    name, encoding, data_text = _split_scheme(text, default_scheme)
    scheme = _BY_NAME.get(name)
    if scheme is None:
        raise UnknownScheme(f"unknown password scheme {{{name}}}"
                            f" (known: {', '.join(VERIFY_SCHEMES)})")
    if encoding not in (None, "b64", "base64", "hex"):
        raise UnknownScheme(f"unknown password encoding .{encoding} (use .b64 or .hex)")
    # Dovecot's MD5 means MD5-CRYPT only when it looks like one; else LDAP-MD5.
    if name == "MD5" and not data_text.startswith("$1$"):
        name, scheme = "LDAP-MD5", _BY_NAME["LDAP-MD5"]
    data = data_text.encode("utf-8")
    if encoding is None and scheme.raw_len:
        guessed = HEX if len(data) == 2 * scheme.raw_len else B64
    else:
        guessed = {None: scheme.encoding, "b64": B64, "base64": B64, "hex": HEX}[encoding]
    raw = _decode(data, guessed)
    if scheme.raw_len and len(raw) != scheme.raw_len:
        raise MalformedPassword(f"{{{name}}} data has length {len(raw)}, wants {scheme.raw_len}")
    if not raw:
        raise MalformedPassword(f"{{{name}}} data is empty")
    scheme.check(raw)
    return StoredPassword(name, scheme.name, raw)


def verify_password(stored: str | StoredPassword, password: bytes | str, *,
                    username: str | None = None, default_scheme: str = "CRYPT") -> bool:
    """Whether ``password`` matches the stored field.  Constant-time comparisons.

    ``username`` is only used by ``{DIGEST-MD5}``.  Raises ``PasswordError`` if the
    stored field itself is unusable; a mismatch (including a bcrypt password over 72
    bytes, or a password with a NUL byte for a crypt(3) scheme) is just ``False``.
    """
    sp = parse_password(stored, default_scheme)
    return bool(_BY_NAME[sp.canonical].verify(sp.raw, _b(password), username))


def is_expensive(stored: str | StoredPassword, default_scheme: str = "CRYPT") -> bool:
    """Whether verifying ``stored`` costs real CPU (crypt, bcrypt, argon2, SCRAM, PBKDF2)."""
    return parse_password(stored, default_scheme).expensive


def cost_key(stored: str | StoredPassword, default_scheme: str = "CRYPT") -> str:
    """A key naming the scheme and its cost parameters: two fields with the same key
    cost the same to verify (used to pick a dummy hash for unknown users)."""
    sp = parse_password(stored, default_scheme)
    scheme = _BY_NAME[sp.canonical]
    return scheme.cost(sp.raw) if scheme.cost is not None else scheme.name


def stored_secrets(stored: str | StoredPassword, default_scheme: str = "CRYPT") -> dict[str, object]:
    """What a challenge mechanism can use from this field (see ``checkers.secrets``):

    PLAIN -> ``{"plaintext": str}`` (CRAM-MD5 and SCRAM derive from it themselves);
    CRAM-MD5 -> ``{"cram-md5": 64 hex}``; SCRAM-SHA-1 / SCRAM-SHA-256 ->
    ``{"scram-sha-1" / "scram-sha-256": (iterations, salt, stored_key, server_key)}``;
    any one-way hash -> ``{}``.
    """
    sp = parse_password(stored, default_scheme)
    scheme = _BY_NAME[sp.canonical]
    return scheme.secrets(sp.raw) if scheme.secrets is not None else {}


# ---- making new hashes (saslsmtp-passwd) ----------------------------------------------


def make_hash(scheme: str, password: bytes | str, *, rounds: int | None = None,
              salt: bytes | None = None, username: str | None = None) -> str:
    """A new stored field ``{SCHEME}data`` for ``password``, like ``doveadm pw``.

    ``rounds`` is the scheme's cost (see ``DEFAULT_ROUNDS``); ``salt`` forces a salt
    (tests only); ``username`` is needed by ``DIGEST-MD5`` (``user@realm``).
    ``SCHEME.B64`` / ``SCHEME.HEX`` store the data in that encoding.
    """
    written = scheme.upper()
    name, _, encoding = written.partition(".")
    entry = _MAKERS.get(name)
    if entry is None or entry.make is None or (encoding and written not in entry.make_variants):
        raise UnknownScheme(f"cannot make {{{written}}} hashes (known: {', '.join(MAKE_SCHEMES)})")
    if entry.default_rounds is None:
        cost = None
    else:
        cost = entry.default_rounds if rounds is None else int(rounds)
        if cost < 1:
            raise ValueError("rounds must be positive")
    data = entry.make(_b(password), cost, salt, username)
    if encoding:
        raw = _decode(data.encode("utf-8"), entry.encoding)
        data = _b64(raw) if encoding == "B64" else raw.hex()
    elif any(c in data for c in ":\r\n") or data != data.strip():
        raise ValueError(f"this password needs {{{name}.B64}} (it contains ':', a line break"
                         " or surrounding spaces)")
    return "{%s}%s" % (entry.stored_as or written, data)
