"""OAUTHBEARER (RFC 7628) and XOAUTH2 (Google): a bearer token checked by a validator.

Exchange::

    start(b"n,a=user@example.com,\\x01auth=Bearer <token>\\x01\\x01")
                     -> ValidateToken(token, "user@example.com", "OAUTHBEARER", host, port)
    resume(Secret("token-verdict", TokenVerdict(ok=True, subject="user@example.com")))
                     -> Accept("user@example.com")

On a bad token the server sends a JSON error as a challenge and fails only after the
client's answer: ``\\x01`` for OAUTHBEARER (RFC 7628 section 3.2.3), an empty line for
XOAUTH2.  So ``resume`` returns ``Reply(json)`` and the next ``receive`` returns
``Reject()``.

``ValidateToken`` (in ``saslsmtp.sasl.outcome``, with ``TokenVerdict``) asks the token
validator backend about ``token`` (for ``username``); the engine then calls
``resume(Secret(TOKEN_VERDICT, TokenVerdict(...)))``, or ``resume(None)`` when no
validator has an opinion.  A temporary failure of the validator
is the engine's 454, without ``resume``.

The client's ``host`` and ``port`` are passed on to the validator but not checked here:
clients send the name they connected to (often an IP address or a CNAME), which the
server cannot know reliably.  Channel binding is not defined for OAUTHBEARER: the
``p=`` flag is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from saslsmtp.sasl.mechanism import ClientFirst, MechanismSpec
from saslsmtp.sasl.saslprep import decode_saslname
from saslsmtp.sasl.outcome import (
    TOKEN_VERDICT,
    Accept,
    MechanismStateError,
    Outcome,
    Reject,
    Reply,
    Secret,
    Session,
    TokenVerdict as TokenVerdict,  # re-exported: a backend's request and answer
    ValidateToken as ValidateToken,
)

MALFORMED_OAUTHBEARER = Reject("Malformed OAUTHBEARER response")
MALFORMED_XOAUTH2 = Reject("Malformed XOAUTH2 response")
INVALID = Reject()

_KEY = re.compile(r"[A-Za-z]+")
_VALUE = re.compile(r"[\x20-\x7e\t\r\n]*")
# RFC 6750 section 2.1: "Bearer" 1*SP b64token (the scheme name is case-insensitive)
_BEARER = re.compile(r"(?i:bearer) +(?P<token>[A-Za-z0-9\-._~+/]+=*)")
_USERNAME = re.compile(r"[^\x00-\x1f\x7f]+")




def _parse_kvpairs(body: str) -> dict[str, str] | None:
    """``*kvpair`` where each pair ends with ``\\x01``; ``None`` if malformed."""
    pairs: dict[str, str] = {}
    if not body:
        return pairs
    if not body.endswith("\x01"):
        return None
    for item in body[:-1].split("\x01"):
        key, sep, value = item.partition("=")
        if not sep or not _KEY.fullmatch(key) or not _VALUE.fullmatch(value) or key in pairs:
            return None
        pairs[key] = value
    return pairs


@dataclass(frozen=True, repr=False)
class BearerRequest:
    """A parsed client message: ``token`` is ``""`` when ``auth=`` was empty."""

    username: str
    token: str
    host: str | None = None
    port: int | None = None

    def __repr__(self) -> str:
        return f"BearerRequest(username={self.username!r}, token=***, host={self.host!r}, port={self.port!r})"


def parse_oauthbearer(message: bytes) -> BearerRequest | None:
    """RFC 7628 section 3.1 ``client-resp`` with a gs2 header; ``None`` if malformed.

    An empty ``auth=`` value is allowed (the discovery request of section 4.3) and
    gives ``token=""``; a non-Bearer scheme is malformed.
    """
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        return None
    parts = text.split(",", 2)
    if len(parts) != 3 or parts[0] not in ("n", "y"):
        return None
    authz, rest = parts[1], parts[2]
    username = ""
    if authz:
        if not authz.startswith("a="):
            return None
        decoded = decode_saslname(authz[2:])
        if decoded is None or not _USERNAME.fullmatch(decoded):
            return None
        username = decoded
    if len(rest) < 2 or rest[0] != "\x01" or rest[-1] != "\x01":
        return None
    pairs = _parse_kvpairs(rest[1:-1])
    if pairs is None or "auth" not in pairs:
        return None
    return _request(username, pairs)


def parse_xoauth2(message: bytes) -> BearerRequest | None:
    """``user=<user>\\x01auth=Bearer <token>\\x01\\x01``; ``None`` if malformed."""
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.endswith("\x01\x01"):
        return None
    pairs = _parse_kvpairs(text[:-1])
    if pairs is None or "auth" not in pairs or not pairs.get("auth"):
        return None
    username = pairs.get("user", "")
    if not _USERNAME.fullmatch(username):
        return None
    return _request(username, pairs)


def _request(username: str, pairs: dict[str, str]) -> BearerRequest | None:
    auth = pairs["auth"]
    token = ""
    if auth:
        m = _BEARER.fullmatch(auth)
        if m is None:
            return None
        token = m["token"]
    port: int | None = None
    if "port" in pairs:
        if not re.fullmatch(r"[0-9]{1,5}", pairs["port"]) or int(pairs["port"]) > 65535:
            return None
        port = int(pairs["port"])
    return BearerRequest(username, token, pairs.get("host"), port)


class _Bearer(ClientFirst):
    """Shared state machine: message -> ValidateToken -> Accept, or JSON error -> Reject."""

    first_stage = "message"
    _ack = b""
    _malformed = INVALID

    def __init__(
        self,
        session: Session | None = None,
        *,
        scope: str | None = None,
        openid_configuration: str | None = None,
    ) -> None:
        self._scope = scope
        self._openid_configuration = openid_configuration
        self._stage = "new"
        self._request: BearerRequest | None = None

    def receive(self, response: bytes) -> Outcome:
        if self._stage == "message":
            return self._first(response)
        if self._stage == "error":
            self._stage = "done"
            return INVALID if response == self._ack else self._malformed
        raise MechanismStateError(f"{self.name} is not waiting for a response (stage {self._stage})")

    def resume(self, secret: Secret | None) -> Outcome:
        if self._stage != "validate":
            raise MechanismStateError(f"{self.name} did not ask for a token check (stage {self._stage})")
        assert self._request is not None
        if secret is None:
            return self._error("invalid_token", None)
        if secret.kind != TOKEN_VERDICT or not isinstance(secret.value, TokenVerdict):
            raise MechanismStateError(f"{self.name} expects a {TOKEN_VERDICT!r} secret, got {secret.kind!r}")
        verdict = secret.value
        if not verdict.ok:
            return self._error(verdict.status, verdict.scope)
        asked, subject = self._request.username, verdict.subject
        if asked and subject and asked != subject:
            return self._error("invalid_token", verdict.scope)
        identity = asked or subject
        if not identity:
            return self._error("invalid_token", verdict.scope)
        self._stage = "done"
        return Accept(identity)

    def _parse(self, message: bytes) -> BearerRequest | None:
        raise NotImplementedError

    def _first(self, message: bytes) -> Outcome:
        self._stage = "done"
        request = self._parse(message)
        if request is None:
            return self._malformed
        self._request = request
        if not request.token:  # RFC 7628 section 4.3: a discovery request
            return self._error("invalid_token", None)
        self._stage = "validate"
        return ValidateToken(request.token, request.username, self.name, request.host, request.port)

    def _error(self, status: str, scope: str | None) -> Reply:
        self._stage = "error"
        return Reply(self.error_json(status, scope if scope is not None else self._scope))

    def error_json(self, status: str, scope: str | None) -> bytes:
        """The JSON error challenge for OAuth error code ``status``."""
        raise NotImplementedError


def _json(fields: dict[str, str]) -> bytes:
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode("ascii")


class OAuthBearer(_Bearer):
    """OAUTHBEARER (RFC 7628): the error round ends with the client's ``\\x01``."""

    name = "OAUTHBEARER"
    _ack = b"\x01"
    _malformed = MALFORMED_OAUTHBEARER

    def _parse(self, message: bytes) -> BearerRequest | None:
        return parse_oauthbearer(message)

    def error_json(self, status: str, scope: str | None) -> bytes:
        """RFC 7628 section 3.2.2: ``status``, then ``scope`` and ``openid-configuration``
        when known."""
        fields = {"status": status}
        if scope is not None:
            fields["scope"] = scope
        if self._openid_configuration is not None:
            fields["openid-configuration"] = self._openid_configuration
        return _json(fields)


XOAUTH2_STATUS = {"invalid_token": "401", "insufficient_scope": "403"}


class XOAuth2(_Bearer):
    """XOAUTH2 (Google): the error round ends with the client's empty line."""

    name = "XOAUTH2"
    _ack = b""
    _malformed = MALFORMED_XOAUTH2

    def _parse(self, message: bytes) -> BearerRequest | None:
        return parse_xoauth2(message)

    def error_json(self, status: str, scope: str | None) -> bytes:
        """Google's form, as Dovecot sends it: an HTTP-like status (invalid_token -> 401,
        insufficient_scope -> 403, anything else 400), ``"schemes":"bearer"``, ``scope``."""
        fields = {"status": XOAUTH2_STATUS.get(status, "400"), "schemes": "bearer"}
        if scope is not None:
            fields["scope"] = scope
        return _json(fields)


OAUTHBEARER_SPEC = MechanismSpec("OAUTHBEARER", OAuthBearer, plaintext=False, client_first=True,
                                 needs_tls=True, token_validator=True)
XOAUTH2_SPEC = MechanismSpec("XOAUTH2", XOAuth2, plaintext=False, client_first=True,
                             needs_tls=True, token_validator=True)
SPECS: tuple[MechanismSpec, ...] = (OAUTHBEARER_SPEC, XOAUTH2_SPEC)
