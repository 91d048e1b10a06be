"""Dovecot password schemes: parse ``{SCHEME}data``, verify a plaintext, make new hashes.

No Twisted here: callers decide where the (possibly expensive) work runs.

A stored password field is ``{SCHEME}data``, ``{SCHEME.b64}data``, ``{SCHEME.hex}data``
or a bare ``data`` that uses the default scheme (Dovecot's default is ``CRYPT``).  Scheme
names are case-insensitive.  As in Dovecot, each scheme has a natural encoding (none,
base64 or hex); fixed-length digests (``{SHA}``, ``{SHA256}``, ``{LDAP-MD5}``...) accept
either hex or base64 and the length tells which; ``.b64``/``.hex`` override the guess.

Supported for verification: PLAIN (CLEAR, CLEARTEXT), CRYPT (``$1$`` ``$5$`` ``$6$``
``$2a$``/``$2b$``/``$2y$``, DES), DES-CRYPT, MD5-CRYPT (MD5), SHA256-CRYPT, SHA512-CRYPT,
BLF-CRYPT, ARGON2I, ARGON2ID, ARGON2, SHA (SHA1), SSHA, SHA256, SSHA256, SHA512, SSHA512,
SMD5, LDAP-MD5, PLAIN-MD5, CRAM-MD5 (HMAC-MD5), DIGEST-MD5 (needs the username),
SCRAM-SHA-1, SCRAM-SHA-256, PBKDF2.

Nothing in this module puts a password (or a stored hash) into an exception message
or a repr.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from typing import Callable

from saslsmtp.sasl import cram_md5 as _cram

__all__ = [
    "PasswordError", "UnknownScheme", "MalformedPassword", "StoredPassword",
    "parse_password", "verify_password", "make_hash", "stored_secrets", "cost_key",
    "is_expensive", "cram_md5_context", "cram_md5_digest", "scram_keys",
    "MAKE_SCHEMES", "VERIFY_SCHEMES", "DEFAULT_ROUNDS",
]


class PasswordError(ValueError):
    """A stored password field cannot be used (its message never contains secrets)."""


class UnknownScheme(PasswordError):
    """The ``{SCHEME}`` is not one this module knows."""


class MalformedPassword(PasswordError):
    """The data after ``{SCHEME}`` does not fit the scheme's format."""


# ---- small helpers -----------------------------------------------------------------


def _b(password: bytes | str) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


def _eq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _b64decode(data: bytes) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedPassword("invalid base64 data") from None


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


# ---- SCRAM (RFC 5802) -----------------------------------------------------------------

_SCRAM_HASHES = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}


def _saslprep_candidates(password: bytes) -> list[bytes]:
    """SASLprep(password) first; the raw bytes too when they differ (Dovecot does not
    normalize when it generates, so accept either)."""
    out = []
    try:
        from passlib.utils import saslprep
        out.append(saslprep(password.decode("utf-8")).encode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        pass
    if password not in out:
        out.append(password)
    return out


def scram_keys(hash_name: str, password: bytes | str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """``(StoredKey, ServerKey)`` for a password, without SASLprep (callers normalize)."""
    salted = hashlib.pbkdf2_hmac(hash_name, _b(password), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    stored_key = hashlib.new(hash_name, client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hash_name).digest()
    return stored_key, server_key


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


# ---- schemes -----------------------------------------------------------------------

NONE, B64, HEX = "none", "b64", "hex"


@dataclass(frozen=True)
class _Scheme:
    name: str
    encoding: str                  # natural encoding of the data
    raw_len: int                   # fixed raw length (encoding guessed), or 0
    verify: Callable[[bytes, bytes, str | None], bool]   # (raw, password, username)
    check: Callable[[bytes], None]                      # raises MalformedPassword
    expensive: bool


def _no_check(raw: bytes) -> None:
    return None


def _verify_plain(raw: bytes, pw: bytes, user: str | None) -> bool:
    return _eq(raw, pw)


def _digest(name: str) -> Callable[[bytes, bytes, str | None], bool]:
    def verify(raw: bytes, pw: bytes, user: str | None) -> bool:
        return _eq(hashlib.new(name, pw).digest(), raw)
    return verify


def _salted(name: str) -> tuple[Callable[[bytes, bytes, str | None], bool], Callable[[bytes], None]]:
    size = hashlib.new(name).digest_size

    def check(raw: bytes) -> None:
        if len(raw) <= size:
            raise MalformedPassword("salted digest is too short (no salt)")

    def verify(raw: bytes, pw: bytes, user: str | None) -> bool:
        check(raw)
        return _eq(hashlib.new(name, pw + raw[size:]).digest(), raw[:size])
    return verify, check


# crypt(3) families via libpass (imported lazily: passlib is slow to import).
_CRYPT_HANDLERS = {
    "MD5-CRYPT": ("md5_crypt",),
    "SHA256-CRYPT": ("sha256_crypt",),
    "SHA512-CRYPT": ("sha512_crypt",),
    "DES-CRYPT": ("des_crypt",),
    "CRYPT": ("sha512_crypt", "sha256_crypt", "md5_crypt", "des_crypt", "bsdi_crypt"),
}


def _crypt_handler(scheme: str, raw: bytes):  # type: ignore[no-untyped-def]
    import passlib.hash
    text = _ascii(raw)
    if scheme in ("CRYPT", "BLF-CRYPT") and text.startswith(("$2a$", "$2b$", "$2y$", "$2x$")):
        return "bcrypt"
    for name in _CRYPT_HANDLERS[scheme]:
        handler = getattr(passlib.hash, name)
        if handler.identify(text):
            return handler
    if text.startswith("$y$") or text.startswith("$7$"):
        raise MalformedPassword("yescrypt/scrypt crypt hashes are not supported")
    raise MalformedPassword(f"not a {scheme} hash this server can verify")


def _check_crypt(scheme: str) -> Callable[[bytes], None]:
    def check(raw: bytes) -> None:
        handler = _crypt_handler(scheme, raw)
        if handler == "bcrypt":
            _check_bcrypt(raw)
            return
        try:
            handler.from_string(_ascii(raw))
        except (ValueError, TypeError):
            raise MalformedPassword(f"malformed {scheme} hash") from None
    return check


def _verify_crypt(scheme: str) -> Callable[[bytes, bytes, str | None], bool]:
    def verify(raw: bytes, pw: bytes, user: str | None) -> bool:
        handler = _crypt_handler(scheme, raw)
        if handler == "bcrypt":
            return _verify_bcrypt(raw, pw, user)
        try:
            return bool(handler.verify(pw, _ascii(raw)))
        except (ValueError, TypeError):
            return False
    return verify


_BCRYPT_PREFIXES = (b"$2a$", b"$2b$", b"$2y$", b"$2x$")


def _check_bcrypt(raw: bytes) -> None:
    if not raw.startswith(_BCRYPT_PREFIXES) or len(raw) != 60 or not raw[4:6].isdigit() or raw[6:7] != b"$":
        raise MalformedPassword("malformed BLF-CRYPT hash")


def _verify_bcrypt(raw: bytes, pw: bytes, user: str | None) -> bool:
    import bcrypt
    _check_bcrypt(raw)
    if raw.startswith(b"$2x$"):
        return False  # the old buggy variant: never verifies correctly with modern code
    try:
        return bool(bcrypt.checkpw(pw, raw))
    except ValueError:
        # bcrypt >= 5 refuses passwords over 72 bytes; such a password cannot match.
        return False


def _check_argon2(raw: bytes) -> None:
    from argon2.exceptions import InvalidHashError
    from argon2 import extract_parameters
    try:
        extract_parameters(_ascii(raw))
    except (InvalidHashError, ValueError):
        raise MalformedPassword("malformed ARGON2 hash") from None


def _verify_argon2(raw: bytes, pw: bytes, user: str | None) -> bool:
    from argon2 import PasswordHasher
    from argon2.exceptions import VerificationError, InvalidHashError
    try:
        return bool(PasswordHasher().verify(_ascii(raw), pw))
    except (VerificationError, InvalidHashError, ValueError):
        return False


def _scram(scheme: str) -> tuple[Callable[[bytes, bytes, str | None], bool], Callable[[bytes], None]]:
    def check(raw: bytes) -> None:
        _parse_scram(scheme, raw)

    def verify(raw: bytes, pw: bytes, user: str | None) -> bool:
        iterations, salt, stored, server = _parse_scram(scheme, raw)
        ok = False
        for candidate in _saslprep_candidates(pw):
            s, k = scram_keys(_SCRAM_HASHES[scheme], candidate, salt, iterations)
            ok |= _eq(s, stored) & _eq(k, server)
        return ok
    return verify, check


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


def _verify_cram(raw: bytes, pw: bytes, user: str | None) -> bool:
    return _eq(bytes.fromhex(cram_md5_context(pw)), raw)


def _verify_digest_md5(raw: bytes, pw: bytes, user: str | None) -> bool:
    if user is None:
        return False
    name, _, realm = user.partition("@")
    return _eq(hashlib.md5(b"%s:%s:%s" % (name.encode(), realm.encode(), pw)).digest(), raw)


def _build_schemes() -> dict[str, _Scheme]:
    s: dict[str, _Scheme] = {}

    def add(name: str, encoding: str, raw_len: int, verify, check=_no_check,  # type: ignore[no-untyped-def]
            expensive: bool = False, aliases: tuple[str, ...] = ()) -> None:
        scheme = _Scheme(name, encoding, raw_len, verify, check, expensive)
        for n in (name, *aliases):
            s[n] = scheme

    add("PLAIN", NONE, 0, _verify_plain, aliases=("CLEAR", "CLEARTEXT"))
    for name in ("CRYPT", "DES-CRYPT", "MD5-CRYPT", "SHA256-CRYPT", "SHA512-CRYPT"):
        add(name, NONE, 0, _verify_crypt(name), _check_crypt(name), expensive=True,
            aliases=("MD5",) if name == "MD5-CRYPT" else ())
    add("BLF-CRYPT", NONE, 0, _verify_bcrypt, _check_bcrypt, expensive=True)
    add("ARGON2", NONE, 0, _verify_argon2, _check_argon2, expensive=True,
        aliases=("ARGON2I", "ARGON2ID"))
    add("SHA", B64, 20, _digest("sha1"), aliases=("SHA1",))
    add("SHA256", B64, 32, _digest("sha256"))
    add("SHA512", B64, 64, _digest("sha512"))
    add("LDAP-MD5", B64, 16, _digest("md5"), aliases=("PLAIN-MD5",))
    for name, h in (("SSHA", "sha1"), ("SSHA256", "sha256"), ("SSHA512", "sha512"), ("SMD5", "md5")):
        v, c = _salted(h)
        add(name, B64, 0, v, c)
    add("CRAM-MD5", HEX, 32, _verify_cram, aliases=("HMAC-MD5",))
    add("DIGEST-MD5", HEX, 16, _verify_digest_md5)
    for name in _SCRAM_HASHES:
        v, c = _scram(name)
        add(name, NONE, 0, v, c, expensive=True)
    add("PBKDF2", NONE, 0, _verify_pbkdf2, lambda raw: _parse_pbkdf2(raw) and None, expensive=True)
    return s


_SCHEMES = _build_schemes()
VERIFY_SCHEMES: tuple[str, ...] = tuple(sorted(_SCHEMES))


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
        return _SCHEMES[self.scheme].expensive


def _split_scheme(text: str, default_scheme: str) -> tuple[str, str | None, str]:
    if text.startswith("{"):
        end = text.find("}")
        if end > 0:
            name, _, enc = text[1:end].partition(".")
            return name.upper(), enc.lower() or None, text[end + 1:]
    name, _, enc = default_scheme.partition(".")
    return name.upper(), enc.lower() or None, text


def parse_password(text: str | StoredPassword, default_scheme: str = "CRYPT") -> StoredPassword:
    """Parse and validate a stored password field.

    Raises ``UnknownScheme`` or ``MalformedPassword`` (never with the data in the message).
    """
    if isinstance(text, StoredPassword):
        return text
    name, encoding, data_text = _split_scheme(text, default_scheme)
    scheme = _SCHEMES.get(name)
    if scheme is None:
        raise UnknownScheme(f"unknown password scheme {{{name}}}"
                            f" (known: {', '.join(VERIFY_SCHEMES)})")
    if encoding not in (None, "b64", "base64", "hex"):
        raise UnknownScheme(f"unknown password encoding .{encoding} (use .b64 or .hex)")
    # Dovecot's MD5 means MD5-CRYPT only when it looks like one; else LDAP-MD5.
    if name == "MD5" and not data_text.startswith("$1$"):
        name, scheme = "LDAP-MD5", _SCHEMES["LDAP-MD5"]
    data = data_text.encode("utf-8")
    if encoding is None and scheme.raw_len:
        guessed = HEX if len(data) == 2 * scheme.raw_len else B64
    else:
        guessed = {None: scheme.encoding, "b64": B64, "base64": B64, "hex": HEX}[encoding]
    if guessed == HEX:
        raw = _hexdecode(data)
    elif guessed == B64:
        raw = _b64decode(data)
    else:
        raw = data
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
    bytes) is just ``False``.
    """
    sp = parse_password(stored, default_scheme)
    return bool(_SCHEMES[sp.scheme].verify(sp.raw, _b(password), username))


def is_expensive(stored: str | StoredPassword, default_scheme: str = "CRYPT") -> bool:
    """Whether verifying ``stored`` costs real CPU (crypt, bcrypt, argon2, SCRAM, PBKDF2)."""
    return parse_password(stored, default_scheme).expensive


def cost_key(stored: str | StoredPassword, default_scheme: str = "CRYPT") -> str:
    """A key naming the scheme and its cost parameters: two fields with the same key
    cost the same to verify (used to pick a dummy hash for unknown users)."""
    sp = parse_password(stored, default_scheme)
    raw = sp.raw
    if sp.canonical in _CRYPT_HANDLERS or sp.canonical == "BLF-CRYPT":
        text = raw.decode("ascii", "replace")
        if text.startswith("$2"):
            return f"bcrypt:{text[4:6]}"
        if text.startswith(("$5$", "$6$")):
            rounds = text.split("$")[2] if text.split("$")[2].startswith("rounds=") else "rounds=5000"
            return f"crypt{text[1]}:{rounds}"
        return f"crypt:{text[:3] if text.startswith('$') else 'des'}"
    if sp.canonical == "ARGON2":
        return "argon2:" + raw.decode("ascii", "replace").rsplit("$", 2)[0]
    if sp.canonical in _SCRAM_HASHES:
        return f"{sp.canonical}:{raw.split(b',', 1)[0].decode('ascii', 'replace')}"
    if sp.canonical == "PBKDF2":
        return f"PBKDF2:{_parse_pbkdf2(raw)[1]}"
    return sp.canonical


def stored_secrets(stored: str | StoredPassword, default_scheme: str = "CRYPT") -> dict[str, object]:
    """What a challenge mechanism can use from this field (see ``checkers.secrets``):

    PLAIN -> ``{"plaintext": str}`` (CRAM-MD5 and SCRAM derive from it themselves);
    CRAM-MD5 -> ``{"cram-md5": 64 hex}``; SCRAM-SHA-1 / SCRAM-SHA-256 ->
    ``{"scram-sha-1" / "scram-sha-256": (iterations, salt, stored_key, server_key)}``;
    any one-way hash -> ``{}``.
    """
    sp = parse_password(stored, default_scheme)
    if sp.canonical == "PLAIN":
        try:
            return {"plaintext": sp.raw.decode("utf-8")}
        except UnicodeDecodeError:
            return {}
    if sp.canonical == "CRAM-MD5":
        return {"cram-md5": sp.raw.hex()}
    if sp.canonical in _SCRAM_HASHES:
        return {sp.canonical.lower(): _parse_scram(sp.canonical, sp.raw)}
    return {}


# ---- making new hashes (saslsmtp-passwd) ----------------------------------------------

#: Default cost per scheme: crypt rounds, bcrypt log2 cost, argon2 time cost,
#: SCRAM iterations, PBKDF2 rounds.
DEFAULT_ROUNDS: dict[str, int] = {
    "SHA512-CRYPT": 100_000,
    "SHA256-CRYPT": 100_000,
    "BLF-CRYPT": 12,
    "ARGON2ID": 3,
    "ARGON2I": 4,
    "SCRAM-SHA-1": 4096,
    "SCRAM-SHA-256": 4096,
    "PBKDF2": 100_000,
}

#: Schemes ``make_hash`` can produce, strongest first.
MAKE_SCHEMES: tuple[str, ...] = (
    "ARGON2ID", "ARGON2I", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "PBKDF2",
    "SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "SSHA512", "SSHA256", "SSHA", "SHA512",
    "SHA256", "SHA", "SMD5", "MD5-CRYPT", "LDAP-MD5", "PLAIN-MD5", "DIGEST-MD5", "PLAIN",
    "PLAIN.B64",
)


def _rounds(scheme: str, rounds: int | None) -> int:
    value = DEFAULT_ROUNDS[scheme] if rounds is None else int(rounds)
    if value < 1:
        raise ValueError("rounds must be positive")
    return value


def _salt_chars(n: int) -> str:
    alphabet = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    return "".join(alphabet[b % 64] for b in os.urandom(n))


def make_hash(scheme: str, password: bytes | str, *, rounds: int | None = None,
              salt: bytes | None = None, username: str | None = None) -> str:
    """A new stored field ``{SCHEME}data`` for ``password``, like ``doveadm pw``.

    ``rounds`` is the scheme's cost (see ``DEFAULT_ROUNDS``); ``salt`` forces a salt
    (tests only); ``username`` is needed by ``DIGEST-MD5`` (``user@realm``).
    """
    name = scheme.upper()
    pw = _b(password)
    if name in ("PLAIN", "CLEAR", "CLEARTEXT"):
        text = pw.decode("utf-8")
        if any(c in text for c in ":\r\n") or text != text.strip():
            raise ValueError("this password needs {PLAIN.B64} (it contains ':', a line break"
                             " or surrounding spaces)")
        return "{PLAIN}" + text
    if name == "PLAIN.B64":
        return "{PLAIN.B64}" + base64.b64encode(pw).decode("ascii")
    if name in ("SHA512-CRYPT", "SHA256-CRYPT", "MD5-CRYPT"):
        import passlib.hash
        handler = {"SHA512-CRYPT": passlib.hash.sha512_crypt,
                   "SHA256-CRYPT": passlib.hash.sha256_crypt,
                   "MD5-CRYPT": passlib.hash.md5_crypt}[name]
        settings: dict[str, object] = {}
        if name != "MD5-CRYPT":
            settings["rounds"] = _rounds(name, rounds)
        if salt is not None:
            settings["salt"] = salt.decode("ascii")
        return "{%s}%s" % (name, handler.using(**settings).hash(pw))
    if name == "BLF-CRYPT":
        import bcrypt
        if len(pw) > 72:
            raise ValueError("BLF-CRYPT (bcrypt) passwords are limited to 72 bytes")
        cost = _rounds(name, rounds)
        if not 4 <= cost <= 31:
            raise ValueError("BLF-CRYPT cost must be between 4 and 31")
        return "{BLF-CRYPT}" + bcrypt.hashpw(pw, bcrypt.gensalt(cost)).decode("ascii")
    if name in ("ARGON2ID", "ARGON2I"):
        from argon2 import PasswordHasher, Type
        hasher = PasswordHasher(time_cost=_rounds(name, rounds),
                                type=Type.ID if name == "ARGON2ID" else Type.I)
        if salt is not None:
            from argon2.low_level import hash_secret
            encoded = hash_secret(pw, salt, hasher.time_cost, hasher.memory_cost,
                                  hasher.parallelism, hasher.hash_len, hasher.type)
            return "{%s}%s" % (name, encoded.decode("ascii"))
        return "{%s}%s" % (name, hasher.hash(pw))
    digests = {"SHA": "sha1", "SHA256": "sha256", "SHA512": "sha512", "LDAP-MD5": "md5"}
    if name in digests:
        return "{%s}%s" % (name, base64.b64encode(hashlib.new(digests[name], pw).digest()).decode())
    if name == "PLAIN-MD5":
        return "{PLAIN-MD5}" + hashlib.md5(pw).hexdigest()
    salted = {"SSHA": "sha1", "SSHA256": "sha256", "SSHA512": "sha512", "SMD5": "md5"}
    if name in salted:
        s = os.urandom(8) if salt is None else salt
        raw = hashlib.new(salted[name], pw + s).digest() + s
        return "{%s}%s" % (name, base64.b64encode(raw).decode("ascii"))
    if name == "CRAM-MD5":
        return "{CRAM-MD5}" + cram_md5_context(pw)
    if name == "DIGEST-MD5":
        if not username:
            raise ValueError("DIGEST-MD5 needs the username (user@realm)")
        user, _, realm = username.partition("@")
        return "{DIGEST-MD5}" + hashlib.md5(b"%s:%s:%s" % (user.encode(), realm.encode(), pw)).hexdigest()
    if name in _SCRAM_HASHES:
        iterations = _rounds(name, rounds)
        s = os.urandom(16) if salt is None else salt
        stored, server = scram_keys(_SCRAM_HASHES[name], _saslprep_candidates(pw)[0], s, iterations)
        parts = [base64.b64encode(x).decode("ascii") for x in (s, stored, server)]
        return "{%s}%d,%s" % (name, iterations, ",".join(parts))
    if name == "PBKDF2":
        iterations = _rounds(name, rounds)
        s = (_salt_chars(16).encode("ascii") if salt is None else salt)
        if b"$" in s:
            raise ValueError("a PBKDF2 salt cannot contain '$'")
        digest = hashlib.pbkdf2_hmac("sha1", pw, s, iterations, 20).hex()
        return "{PBKDF2}$1$%s$%d$%s" % (s.decode("ascii"), iterations, digest)
    raise UnknownScheme(f"cannot make {{{name}}} hashes (known: {', '.join(MAKE_SCHEMES)})")
