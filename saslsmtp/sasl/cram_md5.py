"""CRAM-MD5 (RFC 2195): server-first challenge ``<random.timestamp@host>``, HMAC-MD5 answer.

Exchange::

    start(None)        -> Reply(b"<1896.697170952@host>")
    receive(b"tim b913a602c7eda7a495b4e6e7334d3890")
                       -> Lookup("tim", ("cram-md5", "plaintext"))
    resume(Secret)     -> Accept("tim") | Reject()

A secret with a ``refusal`` (a users file's ``nologin`` or ``allow_nets``) answers the
refusal's reply where the right digest would be accepted; a wrong digest is ``Reject()``
either way.

The stored secret is either the plaintext password or Dovecot's ``{CRAM-MD5}``
context: 64 hex digits, the MD5 state after one block of ``key ^ opad`` and then
after one block of ``key ^ ipad``, each as A, B, C, D little-endian 32-bit words
(RFC 2195 section 2).  Continuing an MD5 from a given state is not possible with
``hashlib``, so this module carries a small pure-Python MD5 compression function
(RFC 1321) used only for that: two short continuations per login.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import struct
import time
from typing import Callable

from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.outcome import (
    Accept,
    Defer,
    Lookup,
    MechanismStateError,
    Outcome,
    Reject,
    Reply,
    Secret,
    Session,
)

NAME = "CRAM-MD5"
KINDS = ("cram-md5", "plaintext")
MALFORMED = Reject("Malformed CRAM-MD5 response")
INVALID = Reject()
MISCONFIGURED = Defer()  # a stored {CRAM-MD5} value that is not 64 hex digits

_RESPONSE = re.compile(rb"(?P<user>[^\x00-\x1f\x7f]+) (?P<digest>[0-9a-f]{32})")
_CONTEXT = re.compile(r"[0-9a-fA-F]{64}")

# -- MD5 (RFC 1321) that can continue from a saved state ----------------------------

_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_K = [int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64)]
_S = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_M32 = 0xFFFFFFFF


def _compress(state: tuple[int, int, int, int], block: bytes) -> tuple[int, int, int, int]:
    """One MD5 compression of a 64-byte ``block`` into ``state``."""
    x = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | (~d & _M32)), (7 * i) % 16
        f = (f + a + _K[i] + x[g]) & _M32
        a, d, c = d, c, b
        b = (b + ((f << _S[i]) | (f >> (32 - _S[i])))) & _M32
    return (
        (state[0] + a) & _M32,
        (state[1] + b) & _M32,
        (state[2] + c) & _M32,
        (state[3] + d) & _M32,
    )


def _md5_continue(state: tuple[int, int, int, int], data: bytes, done: int) -> bytes:
    """Finish an MD5 whose first ``done`` bytes (a multiple of 64) gave ``state``."""
    total = done + len(data)
    padded = data + b"\x80" + b"\x00" * ((55 - total) % 64) + struct.pack("<Q", (total * 8) & (2**64 - 1))
    for off in range(0, len(padded), 64):
        state = _compress(state, padded[off:off + 64])
    return struct.pack("<4I", *state)


def _pads(password: bytes) -> tuple[bytes, bytes]:
    """The HMAC ``key ^ ipad`` and ``key ^ opad`` blocks (RFC 2104)."""
    if len(password) > 64:
        password = hashlib.md5(password).digest()
    key = password.ljust(64, b"\x00")
    return bytes(k ^ 0x36 for k in key), bytes(k ^ 0x5C for k in key)


def cram_md5_context(password: str | bytes) -> str:
    """Dovecot's ``{CRAM-MD5}`` value for ``password`` (64 lowercase hex digits)."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    ipad, opad = _pads(password)
    outer = _compress(_IV, opad)
    inner = _compress(_IV, ipad)
    return struct.pack("<8I", *outer, *inner).hex()


def digest_from_context(context: str, challenge: bytes) -> str:
    """HMAC-MD5(password, ``challenge``) as lowercase hex, from a ``{CRAM-MD5}`` context."""
    if not _CONTEXT.fullmatch(context):
        raise ValueError("a CRAM-MD5 context is 64 hex digits")
    words = struct.unpack("<8I", bytes.fromhex(context))
    outer, inner = words[:4], words[4:]
    inner_digest = _md5_continue(inner, challenge, 64)
    return _md5_continue(outer, inner_digest, 64).hex()


def digest_from_password(password: str | bytes, challenge: bytes) -> str:
    """HMAC-MD5(``password``, ``challenge``) as lowercase hex (what the client sends)."""
    if isinstance(password, str):
        password = password.encode("utf-8")
    return hmac.new(password, challenge, "md5").hexdigest()


# -- the mechanism --------------------------------------------------------------------


class CramMD5:
    """Server-first: the engine answers an initial response with 501 and never calls
    ``start`` with one.  ``random`` and ``clock`` make the challenge reproducible."""

    def __init__(
        self,
        session: Session | None = None,
        *,
        random: Callable[[], int] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._hostname = (session or Session()).hostname
        self._random = random or (lambda: secrets.randbits(63))
        self._clock = clock or time.time
        self._stage = "new"
        self._challenge = b""
        self._username = ""
        self._digest = ""

    def start(self, initial: bytes | None) -> Outcome:
        if self._stage != "new":
            raise MechanismStateError("CRAM-MD5 already started")
        if initial is not None:
            raise MechanismStateError("CRAM-MD5 is server-first: no initial response (501)")
        self._challenge = f"<{self._random()}.{int(self._clock())}@{self._hostname}>".encode("utf-8")
        self._stage = "response"
        return Reply(self._challenge)

    def receive(self, response: bytes) -> Outcome:
        if self._stage != "response":
            raise MechanismStateError(f"CRAM-MD5 is not waiting for a response (stage {self._stage})")
        self._stage = "done"
        m = _RESPONSE.fullmatch(response)
        if m is None:
            return MALFORMED
        try:
            self._username = m["user"].decode("utf-8")
        except UnicodeDecodeError:
            return MALFORMED
        self._digest = m["digest"].decode("ascii")
        self._stage = "lookup"
        return Lookup(self._username, KINDS)

    def resume(self, secret: Secret | None) -> Outcome:
        if self._stage != "lookup":
            raise MechanismStateError(f"CRAM-MD5 did not ask for a secret (stage {self._stage})")
        self._stage = "done"
        if secret is None:
            return INVALID
        if secret.kind == "plaintext":
            if not isinstance(secret.value, (str, bytes)):
                return MISCONFIGURED
            expected = digest_from_password(secret.value, self._challenge)
        elif secret.kind == "cram-md5":
            if not isinstance(secret.value, str) or not _CONTEXT.fullmatch(secret.value):
                return MISCONFIGURED
            expected = digest_from_context(secret.value, self._challenge)
        else:
            raise MechanismStateError(f"CRAM-MD5 asked for {KINDS}, got kind {secret.kind!r}")
        if hmac.compare_digest(expected, self._digest):
            # the password is proved: a user the backend refuses anyway hears it now
            return secret.refusal.reply if secret.refusal is not None else Accept(self._username)
        return INVALID

    @property
    def challenge(self) -> bytes:
        """The challenge sent (empty before ``start``)."""
        return self._challenge


SPEC = MechanismSpec(NAME, CramMD5, plaintext=False, client_first=False, secret_kinds=KINDS)
