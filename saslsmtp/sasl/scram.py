"""SCRAM-SHA-1 and SCRAM-SHA-256 (RFC 5802, RFC 7677) with their -PLUS variants.

Exchange (over SMTP, RFC 4954)::

    start(b"n,,n=user,r=<cnonce>")        -> Lookup("user", ("scram-sha-256", "plaintext"))
    resume(Secret)                        -> Reply(b"r=<cnonce><snonce>,s=<salt>,i=4096")
    receive(b"c=biws,r=...,p=<proof>")    -> Reply(b"v=<server signature>")
    receive(b"")                          -> Accept("user")

Without an initial response ``start(None)`` sends an empty challenge first.

Failures are ``Reject`` (535): SMTP has no "failure with data", so the RFC 5802 ``e=``
value goes into the reply text (``535 5.7.8 Authentication failed (SCRAM e=...)``), except
``invalid-proof``, which uses the default text so that an unknown user and a wrong password
give the same answer.  An unknown user (``resume(None)``) is not revealed early: the
exchange continues with a salt derived from the username and a server secret, exactly as for
a user whose keys are derived from a stored plaintext, and fails at the proof.  A secret
with a ``refusal`` (a users file's ``nologin`` or ``allow_nets``) answers the refusal's
reply in place of ``v=`` when the proof is right: up to that step a refused user's exchange
is a wrong password's, and the server signature is never sent.

Channel binding: the ``-PLUS`` variants require ``p=<type>`` with a type present in
``Session.channel_bindings`` (``tls-unique``, ``tls-exporter``, ``tls-server-end-point``)
and compare ``c=`` with the gs2 header plus that data.  The plain variants refuse ``p=``
and refuse ``y`` when the server offers the ``-PLUS`` variant (a downgrade).

Deriving keys from a plaintext (PBKDF2, 4096 iterations) costs about a millisecond of CPU:
``prepare_secret`` is that step alone, pure and thread-safe, for the engine to run in a
thread pool between the lookup and ``resume``.  ``resume`` also accepts the plaintext and
derives inline if the engine does not do so.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Callable, Iterable

from saslsmtp.sasl.mechanism import ClientFirst, MechanismSpec
from saslsmtp.sasl.saslprep import decode_saslname, saslprep
from saslsmtp.sasl.outcome import (
    Accept,
    Defer,
    Lookup,
    MechanismStateError,
    Outcome,
    Refusal,
    Reject,
    Reply,
    Secret,
    Session,
)

# mechanism name -> (hashlib name, secret kind)
HASHES: dict[str, tuple[str, str]] = {
    "SCRAM-SHA-1": ("sha1", "scram-sha-1"),
    "SCRAM-SHA-256": ("sha256", "scram-sha-256"),
}
CHANNEL_BINDING_TYPES = ("tls-unique", "tls-exporter", "tls-server-end-point")
DEFAULT_ITERATIONS = 4096

INVALID = Reject()  # invalid-proof and unknown-user: indistinguishable on purpose
BAD_AUTHZID = Reject("Not authorized to requested authorization identity")
MISCONFIGURED = Defer()  # a stored verifier that is not (int, bytes, bytes, bytes)

_CB_NAME = re.compile(r"[A-Za-z0-9.\-]+")
_NONCE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
_ATTR = re.compile(r"[A-Za-z]=")

# A secret for this process only: derived salts (unknown users, plaintext entries) when no
# ``salt_key`` gives one that every process shares (another worker, or the server after a
# restart, would derive other salts: an unknown user's salt would change, a stored
# verifier's would not, and that tells them apart).
_PROCESS_SECRET = secrets.token_bytes(32)


def scram_error(value: str) -> Reject:
    """The 535 for an RFC 5802 ``e=`` value (``invalid-proof`` keeps the default text)."""
    if value in ("invalid-proof", "unknown-user"):
        return INVALID
    return Reject(f"Authentication failed (SCRAM e={value})")


# -- the algorithm (RFC 5802 section 3) -------------------------------------------


@dataclass(frozen=True, repr=False)
class ScramKeys:
    """A stored SCRAM verifier; ``as_tuple()`` is the ``Secret.value`` format."""

    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def as_tuple(self) -> tuple[int, bytes, bytes, bytes]:
        """``(iterations, salt, stored_key, server_key)`` as ``ISecretSource`` hands it out."""
        return (self.iterations, self.salt, self.stored_key, self.server_key)

    def __repr__(self) -> str:
        return f"ScramKeys(iterations={self.iterations}, salt=***, stored_key=***, server_key=***)"


def normalize(password: str) -> bytes:
    """Normalize(password): SASLprep, or the raw UTF-8 if the profile prohibits it."""
    try:
        return saslprep(password).encode("utf-8")
    except ValueError:
        return password.encode("utf-8")


def _hmac(hash_name: str, key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hash_name).digest()


def derive_keys(hash_name: str, password: str, salt: bytes, iterations: int) -> ScramKeys:
    """The verifier for ``password`` (PBKDF2: slow on purpose; run it in a thread)."""
    return keys_from_bytes(hash_name, normalize(password), salt, iterations)


def keys_from_bytes(hash_name: str, normalized: bytes, salt: bytes, iterations: int) -> ScramKeys:
    """The verifier for an already normalized password (RFC 5802 section 3).

    ``hashlib.pbkdf2_hmac`` releases the GIL while it iterates."""
    salted = hashlib.pbkdf2_hmac(hash_name, normalized, salt, iterations)
    client_key = _hmac(hash_name, salted, b"Client Key")
    return ScramKeys(
        iterations,
        salt,
        hashlib.new(hash_name, client_key).digest(),
        _hmac(hash_name, salted, b"Server Key"),
    )


# Keys derived from a stored plaintext are the same for every login within one process
# (the salt is derived per user), so a small cache spares PBKDF2 on repeat logins.  It
# holds nothing the process does not already hold: the plaintext came from the users file.
_derive_cached = functools.lru_cache(maxsize=4096)(derive_keys)


def derived_salt(server_secret: bytes, mechanism: str, username: str) -> bytes:
    """A per-user salt that stays the same within one process (16 bytes)."""
    msg = b"saslsmtp scram salt\0" + mechanism.encode("ascii") + b"\0" + username.encode("utf-8")
    return hmac.new(server_secret, msg, "sha256").digest()[:16]


def _b64decode(value: str) -> bytes:
    return base64.b64decode(value.encode("ascii"), validate=True)


def _default_nonce() -> str:
    return base64.b64encode(secrets.token_bytes(18)).decode("ascii")


# -- the mechanism ------------------------------------------------------------------


class Scram(ClientFirst):
    """One SCRAM exchange for ``name`` (``SCRAM-SHA-256``, ``SCRAM-SHA-1-PLUS``, ...).

    The server "supports channel binding" for this hash (so the plain variant refuses
    the ``y`` flag) when the session has channel bindings and the ``-PLUS`` variant is
    configured: ``plus_configured`` says whether it is (``None``: assume it is, the
    cautious choice; ``specs_for`` fills it from the configured list).  ``nonce``
    (server nonce) and ``server_secret`` are injectable for tests.  ``salt_key`` gives the
    key of derived salts, asked once the lookup is done (``None`` from it, or no
    ``salt_key``: ``server_secret``): the users file's, the same in every worker and
    after a restart, so an unknown user's salt is as stable as a stored one.
    """

    first_stage = "client-first"

    def __init__(
        self,
        session: Session | None = None,
        *,
        name: str = "SCRAM-SHA-256",
        plus_configured: bool | None = None,
        nonce: Callable[[], str] | None = None,
        server_secret: bytes | None = None,
        iterations: int = DEFAULT_ITERATIONS,
        salt_key: Callable[[], bytes | None] | None = None,
    ) -> None:
        self._session = session or Session()
        self.plus = name.endswith("-PLUS")
        base = name[: -len("-PLUS")] if self.plus else name
        if base not in HASHES:
            raise ValueError(f"unknown SCRAM mechanism {name!r}")
        self.name = name
        self._base = base
        self._hash, self._kind = HASHES[base]
        self._digest_size = hashlib.new(self._hash).digest_size
        self._plus_offered = bool(self._session.channel_bindings) and plus_configured is not False
        self._nonce_factory = nonce or _default_nonce
        self._server_secret = _PROCESS_SECRET if server_secret is None else server_secret
        self._salt_key = salt_key
        self._iterations = iterations
        self._stage = "new"
        self._username = ""
        self._gs2_header = b""
        self._cb_data = b""
        self._client_first_bare = b""
        self._nonce = ""
        self._server_first = b""
        self._keys: ScramKeys | None = None
        self._unknown = False
        self._refusal: Refusal | None = None

    # -- driving ----------------------------------------------------------------

    def receive(self, response: bytes) -> Outcome:
        if self._stage == "client-first":
            return self._first(response)
        if self._stage == "client-final":
            return self._client_final(response)
        if self._stage == "ack":
            self._stage = "done"
            if response != b"":
                return Reject(f"Malformed {self.name} response")
            return Accept(self._username)
        raise MechanismStateError(f"{self.name} is not waiting for a response (stage {self._stage})")

    def resume(self, secret: Secret | None) -> Outcome:
        if self._stage != "lookup":
            raise MechanismStateError(f"{self.name} did not ask for a secret (stage {self._stage})")
        secret = self.prepare_secret(secret)
        self._refusal = secret.refusal if secret is not None else None
        if secret is None:
            self._unknown = True
            self._keys = ScramKeys(
                self._iterations,
                derived_salt(self._salt_secret(), self._base, self._username),
                secrets.token_bytes(self._digest_size),
                secrets.token_bytes(self._digest_size),
            )
        elif secret.kind == self._kind:
            keys = self._check_verifier(secret.value)
            if keys is None:
                self._stage = "done"
                return MISCONFIGURED
            self._keys = keys
        else:
            raise MechanismStateError(f"{self.name} asked for {self._kinds()}, got kind {secret.kind!r}")
        self._server_first = b"r=%s,s=%s,i=%d" % (
            self._nonce.encode("ascii"),
            base64.b64encode(self._keys.salt),
            self._keys.iterations,
        )
        self._stage = "client-final"
        return Reply(self._server_first)

    def prepare_secret(self, secret: Secret | None) -> Secret | None:
        """Turn a ``"plaintext"`` secret into this mechanism's verifier (PBKDF2).

        Pure and thread-safe (reads only what ``start`` fixed): the engine may run it in
        a thread pool after the ``Lookup`` and pass the result to ``resume``.  Any other
        secret (or ``None``) comes back unchanged.
        """
        if secret is None or secret.kind != "plaintext":
            return secret
        if self._stage not in ("lookup",):
            raise MechanismStateError(f"{self.name} has no username to derive a salt for yet")
        password = secret.value
        if not isinstance(password, str):
            raise MechanismStateError("a plaintext secret is a str")
        salt = derived_salt(self._salt_secret(), self._base, self._username)
        keys = _derive_cached(self._hash, password, salt, self._iterations)
        return Secret(self._kind, keys.as_tuple(), secret.refusal)

    def _salt_secret(self) -> bytes:
        """The key of derived salts: ``salt_key``'s when it has one."""
        key = self._salt_key() if self._salt_key is not None else None
        return key if key is not None else self._server_secret

    # -- messages ---------------------------------------------------------------

    def _kinds(self) -> tuple[str, ...]:
        return lookup_kinds(self.name)

    def _first(self, message: bytes) -> Outcome:
        """The client-first-message."""
        self._stage = "done"
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            return scram_error("invalid-encoding")
        parts = text.split(",", 2)
        if len(parts) != 3:
            return scram_error("invalid-encoding")
        flag, authz, bare = parts
        if flag.startswith("p="):
            cb_type = flag[2:]
            if not _CB_NAME.fullmatch(cb_type):
                return scram_error("invalid-encoding")
        elif flag not in ("n", "y"):
            return scram_error("invalid-encoding")
        authzid = ""
        if authz:
            if not authz.startswith("a="):
                return scram_error("invalid-encoding")
            decoded = decode_saslname(authz[2:])
            if decoded is None:
                return scram_error("invalid-username-encoding")
            authzid = decoded
        attrs = bare.split(",")
        if attrs[0].startswith("m="):
            return scram_error("extensions-not-supported")
        if len(attrs) < 2 or not attrs[0].startswith("n=") or not attrs[1].startswith("r="):
            return scram_error("invalid-encoding")
        if any(not _ATTR.match(a) for a in attrs[2:]):
            return scram_error("invalid-encoding")
        username = decode_saslname(attrs[0][2:])
        if username is None:
            return scram_error("invalid-username-encoding")
        client_nonce = attrs[1][2:]
        if not _NONCE.fullmatch(client_nonce):
            return scram_error("invalid-encoding")
        # channel binding policy
        if self.plus:
            if not flag.startswith("p="):
                return Reject(f"Authentication failed ({self.name} requires channel binding)")
            cb_data = self._session.channel_bindings.get(flag[2:])
            if flag[2:] not in CHANNEL_BINDING_TYPES or cb_data is None:
                return scram_error("unsupported-channel-binding-type")
            self._cb_data = bytes(cb_data)
        elif flag.startswith("p="):
            return scram_error("channel-binding-not-supported")
        elif flag == "y" and self._plus_offered:
            return scram_error("server-does-support-channel-binding")
        if authzid and authzid != username:
            return BAD_AUTHZID
        server_nonce = self._nonce_factory()
        if not _NONCE.fullmatch(server_nonce):
            raise MechanismStateError("the server nonce must be printable ASCII without ','")
        self._username = username
        self._gs2_header = f"{flag},{authz},".encode("utf-8")
        self._client_first_bare = bare.encode("utf-8")
        self._nonce = client_nonce + server_nonce
        self._stage = "lookup"
        return Lookup(username, self._kinds())

    def _client_final(self, message: bytes) -> Outcome:
        self._stage = "done"
        assert self._keys is not None
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            return scram_error("invalid-encoding")
        attrs = text.split(",")
        if (
            len(attrs) < 3
            or not attrs[0].startswith("c=")
            or not attrs[1].startswith("r=")
            or not attrs[-1].startswith("p=")
            or any(not _ATTR.match(a) or a.startswith("m=") for a in attrs[2:-1])
        ):
            return scram_error("invalid-encoding")
        try:
            cbind_input = _b64decode(attrs[0][2:])
            proof = _b64decode(attrs[-1][2:])
        except (binascii.Error, ValueError):
            return scram_error("invalid-encoding")
        expected_cbind = self._gs2_header + (self._cb_data if self.plus else b"")
        if not hmac.compare_digest(cbind_input, expected_cbind):
            return scram_error("channel-bindings-dont-match")
        if attrs[1][2:] != self._nonce:
            return scram_error("other-error")
        if len(proof) != self._digest_size:
            return scram_error("invalid-proof")
        without_proof = message[: message.rindex(b",p=")]
        auth_message = self._client_first_bare + b"," + self._server_first + b"," + without_proof
        keys = self._keys
        client_signature = _hmac(self._hash, keys.stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature))
        ok = hmac.compare_digest(hashlib.new(self._hash, client_key).digest(), keys.stored_key)
        if not ok or self._unknown:
            return INVALID
        if self._refusal is not None:  # proved, but refused anyway: no v=, no success
            return self._refusal.reply
        server_signature = _hmac(self._hash, keys.server_key, auth_message)
        self._stage = "ack"
        return Reply(b"v=" + base64.b64encode(server_signature))

    def _check_verifier(self, value: object) -> ScramKeys | None:
        """A stored ``(iterations, salt, stored_key, server_key)`` or ``None`` if malformed."""
        if not isinstance(value, (tuple, list)) or len(value) != 4:
            return None
        iterations, salt, stored_key, server_key = value
        if (
            not isinstance(iterations, int)
            or isinstance(iterations, bool)
            or iterations < 1
            or not isinstance(salt, bytes)
            or not salt
            or not isinstance(stored_key, bytes)
            or not isinstance(server_key, bytes)
            or len(stored_key) != self._digest_size
            or len(server_key) != self._digest_size
        ):
            return None
        return ScramKeys(iterations, salt, stored_key, server_key)


def lookup_kinds(name: str) -> tuple[str, ...]:
    """The secret kinds the mechanism ``name`` asks for (``-PLUS`` the same as its hash)."""
    base = name[: -len("-PLUS")] if name.endswith("-PLUS") else name
    return (HASHES[base][1], "plaintext")


def make_spec(name: str, plus_configured: bool | None = None,
              salt_key: Callable[[], bytes | None] | None = None) -> MechanismSpec:
    """The ``MechanismSpec`` for one SCRAM name (``plus_configured`` and ``salt_key`` go to
    ``Scram``)."""
    factory = functools.partial(Scram, name=name, plus_configured=plus_configured,
                                salt_key=salt_key)
    return MechanismSpec(name, factory, plaintext=False, client_first=True, needs_tls=name.endswith("-PLUS"),
                         secret_kinds=lookup_kinds(name))


NAMES = ("SCRAM-SHA-1", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS")

SPECS: tuple[MechanismSpec, ...] = tuple(make_spec(name) for name in NAMES)


def specs_for(configured: Iterable[str],
              salt_key: Callable[[], bytes | None] | None = None) -> dict[str, MechanismSpec]:
    """The SCRAM specs for the configured mechanism names, each plain variant knowing
    whether its ``-PLUS`` sibling is configured (for the ``y`` downgrade check), with
    ``salt_key`` (see ``Scram``)."""
    names = {n.upper() for n in configured}
    return {
        name: make_spec(name, None if name.endswith("-PLUS") else f"{name}-PLUS" in names,
                        salt_key)
        for name in NAMES
        if name in names
    }
