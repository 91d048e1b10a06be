"""The ``oauth2`` backend: bearer-token verdicts for OAUTHBEARER and XOAUTH2.

Pure claim checks first, then JWTs against a JWKS file, then a real twisted.web
"identity provider" on a free loopback port serving a JWKS (``/jwks``) and an RFC 7662
introspection endpoint (``/introspect``), which can answer errors or hang.  Test keys
and tokens are made with joserfc.  ``IdP``, ``signed`` and ``KeyPair`` are reused by
tests/test_mechanisms_e2e.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import pytest
import pytest_twisted
from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from saslsmtp.checkers.oauth2 import (ClaimPolicy, FileKeys, IntrospectionValidator, OAuth2Options,
                                      JwtValidator, KeySetError, RemoteKeys, from_config,
                                      parse_jwks)
from saslsmtp.checkers.registry import BackendDeps
from saslsmtp.checkers.secrets import ITokenValidator
from saslsmtp.config import ConfigError, parse_config
from saslsmtp.credentials import PasswordCredentials
from saslsmtp.errors import TemporaryFailure
from saslsmtp.options import OptionsError
from saslsmtp.sasl.oauth import TokenVerdict, ValidateToken
from saslsmtp.sasl.outcome import Session
from saslsmtp.threads import SynchronousRunner
from tests.conftest import event_text
from tests.stalehttp import ForgetfulFactory
from tests.upstreams import WebServer

ISSUER = "https://idp.example.test"
AUDIENCE = "smtp.example.test"
USER = "alice@example.test"
NOW = 1_700_000_000
CLIENT_ID = "saslsmtp client:1"  # a space and a colon: form-urlencoded in Basic auth
CLIENT_SECRET = "s3cret&=+/"


# ---- keys and tokens ----------------------------------------------------------------------


@dataclass
class KeyPair:
    """A private signing key and the ``alg`` it signs with."""

    key: Any
    alg: str

    @property
    def kid(self) -> str:
        return self.key.kid

    def public(self) -> dict[str, Any]:
        return self.key.as_dict(private=False)


def ec_key(kid: str = "ec1") -> KeyPair:
    return KeyPair(ECKey.generate_key("P-256", parameters={"kid": kid}, private=True), "ES256")


def rsa_key(kid: str = "rsa1") -> KeyPair:
    return KeyPair(RSAKey.generate_key(2048, parameters={"kid": kid}, private=True), "RS256")


def jwks(*pairs: KeyPair) -> bytes:
    """A JWKS document with the public halves of ``pairs``."""
    return json.dumps({"keys": [p.public() for p in pairs]}).encode()


def claims(now: float | None = None, **overrides: Any) -> dict[str, Any]:
    """Typical access-token claims for USER, valid for 5 minutes from ``now``."""
    now = time.time() if now is None else now
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": USER, "iat": int(now),
                            "nbf": int(now), "exp": int(now) + 300, "scope": "openid smtp"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def signed(pair: KeyPair, body: dict[str, Any], *, kid: Any = "", alg: str | None = None) -> str:
    """A compact JWS of ``body`` signed by ``pair`` (``kid=None`` leaves the kid out)."""
    header: dict[str, Any] = {"alg": alg or pair.alg, "typ": "at+jwt"}
    if kid is not None:
        header["kid"] = pair.kid if kid == "" else kid
    return jwt.encode(header, body, pair.key, algorithms=[header["alg"]])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], body: dict[str, Any], sign: Any) -> str:
    """A compact JWS built by hand (for headers joserfc would refuse to produce)."""
    signing_input = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(body).encode())
    return signing_input + "." + _b64(sign(signing_input.encode()))


def request(token: str, username: str = USER, mechanism: str = "OAUTHBEARER") -> ValidateToken:
    """What the mechanism hands the validator."""
    return ValidateToken(token, username, mechanism, "127.0.0.1", 587)


def run(d: Deferred) -> Any:
    """The result of an already-fired Deferred (file mode never waits)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred did not fire synchronously"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


@pytest.fixture(scope="module")
def keys() -> dict[str, KeyPair]:
    """Module-wide test keys (RSA generation takes a moment)."""
    return {"ec": ec_key("ec1"), "rsa": rsa_key("rsa1"), "other": ec_key("ec1"),
            "ec2": ec_key("ec2")}


# ---- claims --------------------------------------------------------------------------------

POLICY = ClaimPolicy(issuer=ISSUER, audience=(AUDIENCE,), leeway=60)


@pytest.mark.parametrize("overrides, username, status, why", [
    ({}, USER, None, "ok"),
    ({}, "", None, "ok"),  # no username asked for: the claim decides
    ({"exp": NOW - 59}, USER, None, "ok"),  # within the leeway
    ({"exp": NOW - 60}, USER, "invalid_token", "expired"),
    ({"exp": None}, USER, "invalid_token", "no exp claim"),
    ({"exp": True}, USER, "invalid_token", "exp is not a number"),
    ({"exp": "9999999999"}, USER, "invalid_token", "exp is not a number"),
    ({"nbf": NOW + 61}, USER, "invalid_token", "not yet valid"),
    ({"nbf": NOW + 59}, USER, None, "ok"),
    ({"iat": NOW + 3600}, USER, "invalid_token", "issued in the future"),
    ({"iss": "https://evil.example"}, USER, "invalid_token", "wrong issuer"),
    ({"iss": None}, USER, "invalid_token", "wrong issuer"),
    ({"aud": "other-app"}, USER, "invalid_token", "wrong audience"),
    ({"aud": ["other-app", AUDIENCE]}, USER, None, "ok"),
    ({"aud": None}, USER, "invalid_token", "wrong audience"),
    ({"aud": {"x": AUDIENCE}}, USER, "invalid_token", "wrong audience"),
    ({"sub": None}, USER, "invalid_token", "no sub claim"),
    ({"sub": 42}, USER, "invalid_token", "no sub claim"),
    ({"sub": "mallory@example.test"}, USER, "invalid_token", "sub is not the requested user"),
    ({"sub": USER.upper()}, USER, "invalid_token", "sub is not the requested user"),
])
def test_claim_policy(overrides, username, status, why):
    """Each claim rule, at the leeway's edges; a username mismatch keeps the subject."""
    verdict, reason = POLICY.judge(claims(NOW, **overrides), username, NOW)
    assert reason == why
    if status is None:
        assert verdict == TokenVerdict(True, USER)
    else:
        assert not verdict.ok and verdict.status == status and verdict.scope is None


def test_claim_policy_scope_and_username_claim():
    """Required scopes from ``scope`` or ``scp``: missing -> insufficient_scope with the
    scope to ask for; ``username_claim = "email"`` reads that claim."""
    policy = ClaimPolicy(issuer=ISSUER, audience=(AUDIENCE,), scope=("smtp", "mail.send"),
                         username_claim="email")
    body = claims(NOW, sub="0b1c-opaque-id", email=USER, scope="smtp")
    verdict, why = policy.judge(body, USER, NOW)
    assert verdict == TokenVerdict(False, USER, "insufficient_scope", "smtp mail.send")
    assert why == "missing scope mail.send"
    assert policy.judge(dict(body, scope="openid smtp mail.send"), USER, NOW)[0] == TokenVerdict(True, USER)
    assert policy.judge(dict(body, scope=None, scp=["smtp", "mail.send"]), USER, NOW)[0].ok
    verdict, _ = policy.judge(dict(body, email=None), USER, NOW)
    assert verdict == TokenVerdict(False, None, "invalid_token", "smtp mail.send")


def test_claim_policy_introspection_needs_no_exp():
    """Introspection answers may omit ``exp`` (``active`` decides), but a past one counts."""
    policy = ClaimPolicy(require_exp=False)
    assert policy.judge({"sub": USER}, USER, NOW)[0].ok
    assert policy.judge({"sub": USER, "exp": NOW - 100}, USER, NOW)[1] == "expired"


# ---- JWTs against a JWKS file -------------------------------------------------------------


def file_validator(tmp_path, *pairs: KeyPair, now: float = NOW, **policy: Any) -> tuple[JwtValidator, Any]:
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(*pairs))
    clock = Clock()
    clock.advance(now)
    options = dict(issuer=ISSUER, audience=(AUDIENCE,))
    options.update(policy)
    return JwtValidator(FileKeys(str(path)), ClaimPolicy(**options),
                        algorithms=("RS256", "ES256", "PS256", "Ed25519"), clock=clock), path


def test_jwt_valid_ec_and_rsa(tmp_path, keys):
    """ES256 and RS256 tokens from keys in the file: ok with the subject; also with an
    empty requested username (OAUTHBEARER without a=)."""
    v, _ = file_validator(tmp_path, keys["ec"], keys["rsa"])
    for pair in (keys["ec"], keys["rsa"]):
        token = signed(pair, claims(NOW))
        assert run(v.validate_token(request(token))) == TokenVerdict(True, USER)
        assert run(v.validate_token(request(token, ""))) == TokenVerdict(True, USER)


def test_jwt_ed25519(tmp_path):
    """An Ed25519 (OKP) key and token."""
    pair = KeyPair(OKPKey.generate_key("Ed25519", parameters={"kid": "ed"}, private=True), "Ed25519")
    v, _ = file_validator(tmp_path, pair)
    assert run(v.validate_token(request(signed(pair, claims(NOW))))).ok


def test_jwt_refusals(tmp_path, keys):
    """Forged signature (same kid, other key), tampered payload, expired, wrong audience,
    other user, alg none, HS256 signed with the public key (alg confusion), unknown kid,
    garbage and JWE-shaped input: all invalid_token, never an exception."""
    v, _ = file_validator(tmp_path, keys["ec"], keys["rsa"])
    good = signed(keys["ec"], claims(NOW))
    head, body, sig = good.split(".")
    evil_body = base64.urlsafe_b64encode(json.dumps(claims(NOW, sub="root")).encode()).rstrip(b"=").decode()
    none_token = (base64.urlsafe_b64encode(b'{"alg":"none","kid":"ec1"}').rstrip(b"=").decode()
                  + "." + evil_body + ".")
    # alg confusion: HMAC "signed" with the RSA public key anyone can fetch
    hs_token = raw_token({"alg": "HS256", "kid": "rsa1"}, claims(NOW),
                         lambda data: hmac.new(keys["rsa"].key.as_pem(private=False), data,
                                               hashlib.sha256).digest())
    bad = {
        "forged": signed(keys["other"], claims(NOW)),
        "tampered": f"{head}.{evil_body}.{sig}",
        "expired": signed(keys["ec"], claims(NOW - 3600)),
        "audience": signed(keys["ec"], claims(NOW, aud="other-app")),
        "none": none_token,
        "hs256": hs_token,
        "unknown kid": signed(keys["ec2"], claims(NOW)),
        "kid not a string": raw_token({"alg": "ES256", "kid": 7}, claims(NOW), lambda d: b"x" * 64),
    }
    for name, token in bad.items():
        verdict = run(v.validate_token(request(token)))
        assert verdict == TokenVerdict(False, None, "invalid_token", None), name
    verdict = run(v.validate_token(request(good, "bob@example.test")))
    assert verdict == TokenVerdict(False, USER, "invalid_token", None)


def test_jwt_no_opinion_on_foreign_tokens(tmp_path, keys):
    """Not a JWT (opaque, JWE-shaped, bad base64, oversized) or another issuer, even
    well signed: ``None``, so that a next oauth2 backend may judge it (the engine turns
    "no opinion anywhere" into invalid_token)."""
    v, _ = file_validator(tmp_path, keys["ec"])
    foreign = {
        "opaque": "not-a-jwt",
        "jwe": "a.b.c.d.e",
        "bad base64": "!!!.???.***",
        "oversized": "a" * 20000 + "." + "b" + "." + "c",
        "payload not JSON": raw_token({"alg": "ES256"}, {}, lambda d: b"x").replace(
            ".e30.", "." + _b64(b"[1,") + "."),
        "another issuer": signed(keys["ec"], claims(NOW, iss="https://other-idp.example")),
        "no issuer": signed(keys["ec"], claims(NOW, iss=None)),
    }
    for name, token in foreign.items():
        assert run(v.validate_token(request(token))) is None, name


def test_jwt_without_kid(tmp_path, keys):
    """No kid: each key of the right type is tried."""
    v, _ = file_validator(tmp_path, keys["ec2"], keys["ec"], keys["rsa"])
    assert run(v.validate_token(request(signed(keys["ec"], claims(NOW), kid=None)))).ok
    assert run(v.validate_token(request(signed(keys["rsa"], claims(NOW), kid=None)))).ok
    assert not run(v.validate_token(request(signed(keys["other"], claims(NOW), kid=None)))).ok


def test_jwt_algorithm_must_be_allowed(tmp_path, keys):
    """A token signed with an algorithm outside ``algorithms`` is refused even when the
    signature is good; a JWK pinned to another ``alg`` is not used."""
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(keys["rsa"]))
    clock = Clock()
    clock.advance(NOW)
    v = JwtValidator(FileKeys(str(path)), POLICY, algorithms=("ES256",), clock=clock)
    assert not run(v.validate_token(request(signed(keys["rsa"], claims(NOW))))).ok
    pinned = dict(keys["rsa"].public(), alg="PS256")
    path.write_text(json.dumps({"keys": [pinned]}))
    v = JwtValidator(FileKeys(str(path)), POLICY, algorithms=("RS256", "PS256"), clock=clock)
    assert not run(v.validate_token(request(signed(keys["rsa"], claims(NOW))))).ok
    assert run(v.validate_token(request(signed(keys["rsa"], claims(NOW), alg="PS256")))).ok


def test_jwks_file_reloaded_for_an_unknown_kid(tmp_path, keys):
    """A key added to the file is found when a token names it (the file is re-read
    because it changed); a broken rewrite keeps the old keys."""
    import os
    v, path = file_validator(tmp_path, keys["ec"])
    token2 = signed(keys["ec2"], claims(NOW))
    assert not run(v.validate_token(request(token2))).ok
    path.write_bytes(jwks(keys["ec"], keys["ec2"]))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert run(v.validate_token(request(token2))).ok
    path.write_text("{broken")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert not run(v.validate_token(request(signed(keys["rsa"], claims(NOW))))).ok
    assert run(v.validate_token(request(token2))).ok


def test_parse_jwks_skips_unusable_keys(keys):
    """Encryption keys, symmetric keys and junk are skipped; private parts are dropped;
    no usable key at all is an error."""
    doc = {"keys": [dict(keys["ec2"].public(), use="enc"), {"kty": "oct", "k": "c2VjcmV0"},
                    {"kty": "EC", "crv": "P-256", "x": "bad"}, "junk",
                    keys["rsa"].key.as_dict(private=True)]}
    ks = parse_jwks(json.dumps(doc).encode(), "test")
    assert [(k.kid, k.is_private) for k in ks.keys] == [("rsa1", False)]
    for data in (b"{", b"[]", b'{"keys": {}}', b'{"keys": [{"kty": "oct", "k": "AA"}]}'):
        with pytest.raises(KeySetError):
            parse_jwks(data, "test")


def test_token_validator_refuses_passwords(tmp_path, keys):
    """Listed in auth.backends, the backend answers every password with UnauthorizedLogin."""
    v, _ = file_validator(tmp_path, keys["ec"])
    assert ICredentialsChecker.providedBy(v) and ITokenValidator.providedBy(v)
    creds = PasswordCredentials(b"alice", b"pw", Session())
    with pytest.raises(UnauthorizedLogin):
        run(v.requestAvatarId(creds))


# ---- configuration ------------------------------------------------------------------------

BASE = """
[auth]
mechanisms = ["OAUTHBEARER"]
backends = ["idp"]
[backends.idp]
type = "oauth2"
"""


def parse(tmp_path, table: str) -> Any:
    path = tmp_path / "c.toml"
    path.write_text(BASE + table)
    return parse_config(path.read_text(), str(path))


def test_config_valid_and_repr_hides_the_secret(tmp_path):
    """A JWKS-file table and an introspection table parse; the client secret is not in
    the options' repr; jwks_file is resolved relative to the config file."""
    (tmp_path / "jwks.json").write_bytes(jwks(ec_key()))
    c = parse(tmp_path, f'jwks_file = "jwks.json"\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n')
    o = c.backends["idp"].options
    assert o.jwks_file == str(tmp_path / "jwks.json") and o.audience == (AUDIENCE,)
    assert o.username_claim == "sub" and "EdDSA" not in o.algorithms
    c = parse(tmp_path, 'introspection_url = "https://idp.example/introspect"\n'
                        'client_id = "smtp"\nclient_secret = "s3cr3t-value"\n')
    assert "s3cr3t-value" not in repr(c)


@pytest.mark.parametrize("table, message", [
    ("", "exactly one of jwks_file, jwks_url or introspection_url"),
    ('jwks_url = "https://a/j"\nintrospection_url = "https://a/i"\n', "exactly one of"),
    ('jwks_url = "https://a/j"\naudience = "x"\n', "issuer: is required"),
    ('jwks_url = "https://a/j"\nissuer = "x"\n', "audience: is required"),
    ('jwks_file = "nope.json"\nissuer = "x"\naudience = "x"\n', "no such file"),
    ('jwks_url = "ftp://a/j"\nissuer = "x"\naudience = "x"\n', "http:// or https://"),
    ('introspection_url = "https://a/i"\nclient_id = "x"\n', "go together"),
    ('jwks_url = "https://a/j"\nissuer = "x"\naudience = "x"\nclient_id = "a"\n'
     'client_secret = "b"\n', "only used with introspection_url"),
    ('jwks_url = "https://a/j"\nissuer = "x"\naudience = "x"\nalgorithms = ["HS256"]\n',
     "'HS256' is not allowed"),
    ('jwks_url = "https://a/j"\nissuer = "x"\naudience = "x"\nalgorithms = ["none"]\n',
     "'none' is not allowed"),
    ('introspection_url = "https://a/i"\nleeway = -1\n', "leeway: must not be negative"),
    ('introspection_url = "https://a/i"\ntimeout = 0\n', "timeout: must be positive"),
    ('introspection_url = "https://a/i"\nusername_claim = ""\n', "must not be empty"),
])
def test_config_problems(tmp_path, table, message):
    """Every contradiction is a config error naming the key."""
    with pytest.raises(ConfigError, match=message):
        parse(tmp_path, table)


@pytest.mark.parametrize("document, message", [
    ('{"keys": []}', "no usable signature key"),
    ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "no usable signature key"),
    ("{}", 'not a JWKS (no "keys" array)'),
    ("nope", "not JSON"),
])
def test_unusable_jwks_file_is_a_config_error_at_its_line(tmp_path, document, message):
    """A JWKS file that cannot be used is found when the file is read (so ``--check``
    reports it), at the jwks_file line, as every other option problem."""
    (tmp_path / "jwks.json").write_text(document)
    with pytest.raises(ConfigError) as caught:
        parse(tmp_path, f'issuer = "{ISSUER}"\naudience = "{AUDIENCE}"\njwks_file = "jwks.json"\n')
    assert str(caught.value) == (f"{tmp_path / 'c.toml'}:9: backends.idp.jwks_file:"
                                 f" {tmp_path / 'jwks.json'}: {message}")


def test_unusable_jwks_file_from_keyword_arguments(tmp_path):
    """The same rule without a file: an OptionsError naming jwks_file, also when the key
    set became unusable between the check and the build."""
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": []}')
    with pytest.raises(OptionsError) as caught:
        OAuth2Options(jwks_file=str(path), issuer=ISSUER, audience=(AUDIENCE,))
    assert caught.value.key == "jwks_file" and "no usable signature key" in str(caught.value)
    path.write_bytes(jwks(ec_key()))
    options = OAuth2Options(jwks_file=str(path), issuer=ISSUER, audience=(AUDIENCE,))
    path.write_text('{"keys": []}')
    with pytest.raises(OptionsError) as caught:
        from_config("idp", options, deps())
    assert caught.value.key == "jwks_file"


# ---- a real identity provider on loopback ------------------------------------------------


class IdP(Resource):
    """``GET /jwks`` serves ``keyset``; ``POST /introspect`` answers from ``tokens``
    (token -> claims, ``active`` added) after checking the client's Basic credentials.
    ``mode``: "normal", "500", "hang", "garbage"; every request is recorded."""

    isLeaf = True

    def __init__(self, *pairs: KeyPair) -> None:
        super().__init__()
        self.keyset = jwks(*pairs)
        self.tokens: dict[str, dict[str, Any]] = {}
        self.mode = "normal"
        self.requests: list[dict[str, Any]] = []
        self.hanging: list[Any] = []
        self.client = (CLIENT_ID, CLIENT_SECRET)

    def _common(self, request: Any) -> bytes | int | None:
        headers = {k.decode().lower(): v[0].decode()
                   for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append({"path": request.path, "method": request.method,
                              "headers": headers, "body": request.content.read()})
        if self.mode == "hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        if self.mode == "500":
            request.setResponseCode(500)
            return b"oops"
        if self.mode == "garbage":
            return b"<html>not json</html>"
        return None

    def render_GET(self, request: Any) -> bytes | int:
        early = self._common(request)
        if early is not None:
            return early
        if request.path != b"/jwks":
            request.setResponseCode(404)
            return b""
        request.setHeader(b"content-type", b"application/json")
        return self.keyset

    def render_POST(self, request: Any) -> bytes | int:
        early = self._common(request)
        if early is not None:
            return early
        if request.path != b"/introspect":
            request.setResponseCode(404)
            return b""
        auth = self.requests[-1]["headers"].get("authorization", "")
        try:
            user, _, secret = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
        except ValueError:
            user = secret = ""
        if (unquote_plus(user), unquote_plus(secret)) != self.client:
            request.setResponseCode(401)
            return b'{"error": "invalid_client"}'
        form = parse_qs(self.requests[-1]["body"].decode())
        token = form.get("token", [""])[0]
        request.setHeader(b"content-type", b"application/json")
        body = self.tokens.get(token)
        return json.dumps(dict(body, active=True) if body is not None else {"active": False}).encode()


@pytest.fixture
def idp(keys):
    """The identity provider on a free loopback port, with the ``ec`` and ``rsa`` keys."""
    server = WebServer(IdP(keys["ec"], keys["rsa"]))
    server.start()
    yield server
    pytest_twisted.blockon(Deferred.fromCoroutine(server.stop()))


def base(server: WebServer) -> str:
    """``http://127.0.0.1:PORT`` of the IdP."""
    return f"http://127.0.0.1:{server.port}"


def deps() -> BackendDeps:
    from twisted.internet import reactor
    return BackendDeps(reactor=reactor, hash_runner=SynchronousRunner(),
                       make_runner=lambda name, n: SynchronousRunner())


def remote(url: str, **options: Any) -> Any:
    """A validator built from config options, as the daemon builds it."""
    options.setdefault("timeout", 2.0)
    return from_config("idp", OAuth2Options(**options), deps())


def jwks_options(idp: Any, **more: Any) -> dict[str, Any]:
    return dict(jwks_url=base(idp) + "/jwks", issuer=ISSUER, audience=(AUDIENCE,), **more)


@pytest_twisted.ensureDeferred
async def test_jwks_url_fetched_once_and_cached(idp, keys):
    """Concurrent first logins share one JWKS request; later ones use the cache."""
    v = remote(base(idp), **jwks_options(idp))
    token = signed(keys["ec"], claims())
    verdicts = await gatherResults([v.validate_token(request(token)) for _ in range(5)])
    assert all(x == TokenVerdict(True, USER) for x in verdicts)
    assert await v.validate_token(request(signed(keys["rsa"], claims()))) == TokenVerdict(True, USER)
    assert [r["path"] for r in idp.resource.requests] == [b"/jwks"]
    assert idp.resource.requests[0]["headers"]["user-agent"] == "saslsmtp"
    await v.stop()


@pytest_twisted.ensureDeferred
async def test_jwks_url_unknown_kid_refetches_rate_limited(idp, keys):
    """A new key at the IdP is picked up by a token naming it; a stream of unknown kids
    costs at most one fetch per ``jwks_min_refresh``."""
    v = remote(base(idp), **jwks_options(idp, jwks_min_refresh=60.0))
    assert (await v.validate_token(request(signed(keys["ec"], claims())))).ok
    idp.resource.keyset = jwks(keys["ec"], keys["ec2"])
    # within min_refresh of the first fetch: no refetch, so the new kid is unknown
    assert not (await v.validate_token(request(signed(keys["ec2"], claims())))).ok
    assert len(idp.resource.requests) == 1
    v.keys._attempted_at -= 61  # as if a minute had passed
    assert (await v.validate_token(request(signed(keys["ec2"], claims())))).ok
    for _ in range(3):
        assert not (await v.validate_token(request(signed(keys["other"], claims(), kid="nope")))).ok
    assert len(idp.resource.requests) == 2
    await v.stop()


@pytest_twisted.ensureDeferred
async def test_a_new_kid_while_the_key_set_cannot_be_refreshed_is_temporary(idp, keys):
    """The IdP rotates its key and its JWKS endpoint fails (500, then gone) before
    saslsmtp saw the new key: a token naming the new kid cannot be judged, so 454
    (TemporaryFailure), not 535 (a client would throw away a good token); also while
    the next refetch waits for ``jwks_min_refresh``.  Tokens under the known key still
    pass, and once a refetch works the new kid does too."""
    v = remote(base(idp), **jwks_options(idp, jwks_min_refresh=60.0))
    assert (await v.validate_token(request(signed(keys["ec"], claims())))).ok
    idp.resource.keyset = jwks(keys["ec"], keys["ec2"])
    idp.resource.mode = "500"
    v.keys._attempted_at -= 61  # a refetch is allowed
    new = signed(keys["ec2"], claims())
    with pytest.raises(TemporaryFailure, match="cannot refresh its key set"):
        await v.validate_token(request(new))
    assert len(idp.resource.requests) == 2
    idp.resource.mode = "normal"
    with pytest.raises(TemporaryFailure, match="cannot refresh its key set"):
        await v.validate_token(request(new))  # within min_refresh of the failed attempt
    assert len(idp.resource.requests) == 2
    assert (await v.validate_token(request(signed(keys["ec"], claims())))).ok
    v.keys._attempted_at -= 61
    assert (await v.validate_token(request(new))).ok
    assert len(idp.resource.requests) == 3
    # a kid the IdP does not have, once the key set is fresh again: a refusal
    assert not (await v.validate_token(request(signed(keys["other"], claims(), kid="nope")))).ok
    await v.stop()


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_jwks_url_down_hung_or_broken_is_temporary(idp, keys):
    """No keys yet and the IdP answers 500, garbage, nothing (timeout) or is gone:
    TemporaryFailure (454); once keys are known, a failed refresh keeps them."""
    token = signed(keys["ec"], claims())
    for mode in ("500", "garbage"):
        idp.resource.mode = mode
        with pytest.raises(TemporaryFailure, match="key set unavailable"):
            await remote(base(idp), **jwks_options(idp)).validate_token(request(token))
    idp.resource.mode = "hang"
    started = time.monotonic()
    with pytest.raises(TemporaryFailure, match="no answer within 0.3s"):
        await remote(base(idp), **jwks_options(idp), timeout=0.3).validate_token(request(token))
    assert 0.25 < time.monotonic() - started < 1.5
    idp.resource.mode = "normal"
    v = remote(base(idp), **jwks_options(idp, jwks_cache_time=0.0))
    assert (await v.validate_token(request(token))).ok
    await idp.stop()
    assert (await v.validate_token(request(token))).ok  # refresh failed: old keys kept
    with pytest.raises(TemporaryFailure):
        await remote(base(idp), **jwks_options(idp)).validate_token(request(token))
    await v.stop()


@pytest_twisted.ensureDeferred
async def test_introspection(idp):
    """active + claims -> ok; unknown (inactive), another user, wrong audience -> refused;
    the request is a form POST with Basic client credentials (form-urlencoded)."""
    v = remote(base(idp), introspection_url=base(idp) + "/introspect", client_id=CLIENT_ID,
               client_secret=CLIENT_SECRET, audience=(AUDIENCE,), username_claim="username")
    assert isinstance(v, IntrospectionValidator)
    idp.resource.tokens = {
        "opaque-good": {"username": USER, "aud": AUDIENCE, "exp": int(time.time()) + 60},
        "opaque-other-aud": {"username": USER, "aud": "other"},
    }
    assert await v.validate_token(request("opaque-good")) == TokenVerdict(True, USER)
    assert await v.validate_token(request("opaque-good", "")) == TokenVerdict(True, USER)
    assert not (await v.validate_token(request("opaque-good", "bob"))).ok
    assert not (await v.validate_token(request("opaque-other-aud"))).ok
    assert await v.validate_token(request("unknown")) == TokenVerdict(False, None, "invalid_token")
    first = idp.resource.requests[0]
    assert first["method"] == b"POST"
    assert parse_qs(first["body"].decode()) == {"token": ["opaque-good"],
                                                "token_type_hint": ["access_token"]}
    assert first["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert CLIENT_SECRET not in repr(v)
    await v.stop()


@pytest_twisted.ensureDeferred
async def test_introspection_failures_are_temporary(idp):
    """Our client credentials refused (401), 500, not JSON, no ``active``, a hang, the
    endpoint gone: TemporaryFailure each time."""
    def validator(**kw: Any) -> Any:
        return remote(base(idp), introspection_url=base(idp) + "/introspect", client_id=CLIENT_ID,
                      client_secret=kw.pop("secret", CLIENT_SECRET), **kw)
    with pytest.raises(TemporaryFailure, match="answered 401"):
        await validator(secret="wrong").validate_token(request("t"))
    for mode, match in (("500", "answered 500"), ("garbage", "not JSON")):
        idp.resource.mode = mode
        with pytest.raises(TemporaryFailure, match=match):
            await validator().validate_token(request("t"))
    idp.resource.mode = "hang"
    with pytest.raises(TemporaryFailure, match="no answer within 0.3s"):
        await validator(timeout=0.3).validate_token(request("t"))
    idp.resource.mode = "normal"
    await idp.stop()
    with pytest.raises(TemporaryFailure):
        await validator().validate_token(request("t"))


@pytest_twisted.ensureDeferred
async def test_no_token_in_logs_or_errors(idp, keys):
    """Neither a JWT nor an opaque token shows up in any log event or failure message,
    whatever the verdict."""
    events: list[str] = []
    observer = lambda e: events.append(event_text(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    secret_jwt = signed(keys["other"], claims(jti="log-canary-jti-123"))
    opaque = "opaque-log-canary-456"
    try:
        v = remote(base(idp), **jwks_options(idp))
        await v.validate_token(request(secret_jwt))
        i = remote(base(idp), introspection_url=base(idp) + "/introspect", client_id=CLIENT_ID,
                   client_secret=CLIENT_SECRET)
        await i.validate_token(request(opaque))
        idp.resource.mode = "500"
        with pytest.raises(TemporaryFailure) as caught:
            await i.validate_token(request(opaque))
        events.append(str(caught.value))
    finally:
        globalLogPublisher.removeObserver(observer)
    text = "\n".join(events)
    assert "token refused" in text  # the verdicts were logged...
    for needle in (secret_jwt, secret_jwt.split(".")[1][:20], secret_jwt.split(".")[2][:20],
                   opaque, CLIENT_SECRET):
        assert needle not in text  # ...without the tokens


@pytest_twisted.ensureDeferred
async def test_jwt_backend_then_introspection_backend(idp, keys):
    """Two oauth2 backends, as the engine's resolver asks them: a JWT of our issuer is
    judged by the JWT backend alone; an opaque token gets no opinion there and goes to
    the introspection backend; a token nobody knows ends as "no verdict" (None)."""
    from saslsmtp.service import secret_resolver
    jwt_backend = remote(base(idp), **jwks_options(idp))
    introspection = remote(base(idp), introspection_url=base(idp) + "/introspect",
                           client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    resolve = secret_resolver([], [jwt_backend, introspection])
    idp.resource.tokens = {"opaque-1": {"sub": USER}}
    secret = await resolve(request(signed(keys["ec"], claims())), Session())
    assert secret.value == TokenVerdict(True, USER)
    assert [r["path"] for r in idp.resource.requests] == [b"/jwks"]
    secret = await resolve(request("opaque-1"), Session())
    assert secret.value == TokenVerdict(True, USER)
    assert [r["path"] for r in idp.resource.requests] == [b"/jwks", b"/introspect"]
    secret = await resolve(request("opaque-unknown"), Session())
    assert secret.value == TokenVerdict(False, None, "invalid_token")
    jwt_only = secret_resolver([], [jwt_backend])
    assert await jwt_only(request("opaque-1"), Session()) is None
    await jwt_backend.stop()
    await introspection.stop()


# ---- credentials in a URL: refused at load, masked in the log ------------------------------

URL_SECRET = "Url-Idp-Secret-6"


@pytest.mark.parametrize("key, more", [
    ("jwks_url", f'issuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n'),
    ("introspection_url", ""),
])
def test_credentials_in_a_url_are_refused_without_repeating_them(tmp_path, key, more):
    """``user:password@`` in ``jwks_url`` or ``introspection_url`` is never sent (every
    token login got 454, and the JWKS outage warning printed the URL, password and all):
    --check refuses it and shows the URL with the password masked."""
    import os
    import subprocess
    from tests.support import ROOT, twistd_command, write_config
    config = write_config(tmp_path, f'[backends.idp]\ntype = "oauth2"\n{more}'
                                    f'{key} = "https://smtp:{URL_SECRET}@idp.example/keys"\n')
    out = subprocess.run(twistd_command(config, "--check"), capture_output=True, text=True,
                         timeout=30, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 1, out.stdout
    assert (f"backends.idp.{key}: 'https://smtp:***@idp.example/keys': a user name or"
            " password in the URL is never sent") in out.stderr
    assert URL_SECRET not in out.stdout + out.stderr


@pytest_twisted.ensureDeferred
async def test_key_set_outage_warning_masks_a_password_in_the_url(idp, keys):
    """Built in Python around the options' check, a key set whose URL holds a password
    and a query is still named in the outage warning with both masked."""
    from tests.conftest import event_text
    from saslsmtp.checkers.http import make_client, make_pool
    from twisted.internet import reactor
    pool = make_pool(reactor)
    url = f"http://smtp:{URL_SECRET}@127.0.0.1:{idp.port}/jwks?key={URL_SECRET}"
    keyset = RemoteKeys(url, make_client(reactor, pool, None, 2.0), reactor, timeout=2.0,
                        name="idp")
    v = JwtValidator(keyset, ClaimPolicy(issuer=ISSUER, audience=(AUDIENCE,)),
                     algorithms=("ES256",), clock=reactor, name="idp", pool=pool)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        with pytest.raises(TemporaryFailure) as caught:
            await v.validate_token(request(signed(keys["ec"], claims())))
    finally:
        globalLogPublisher.removeObserver(events.append)
        await v.stop()
    texts = [event_text(e) for e in events] + [str(caught.value), repr(v), repr(keyset)]
    assert any(f"cannot fetch http://smtp:***@127.0.0.1:{idp.port}/jwks?key=***" in t
               for t in texts), texts
    assert not [t for t in texts if URL_SECRET in t]


@pytest.mark.parametrize("kind", ["introspection", "jwks"])
@pytest_twisted.ensureDeferred
async def test_a_dead_kept_alive_connection_is_retried_once(keys, kind):
    """The second introspection POST (or key set GET) goes out on the kept-alive
    connection, which the IdP drops unanswered: it is asked once more on a fresh
    connection and the login succeeds, as with the http backend; it was a 454 (the JWKS:
    a refresh that failed)."""
    from twisted.internet import reactor
    factory = ForgetfulFactory(content_type=b"application/json")
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    url = f"http://127.0.0.1:{port.getHost().port}"
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        if kind == "introspection":
            factory.body = json.dumps({"active": True, "username": USER}).encode()
            v = remote(url, introspection_url=url + "/introspect", username_claim="username")
            token = "opaque"
        else:
            factory.body = jwks(keys["ec"])
            v = remote(url, jwks_url=url + "/jwks", issuer=ISSUER, audience=(AUDIENCE,),
                       jwks_cache_time=0.0)
            token = signed(keys["ec"], claims())
        for _ in range(2):
            assert await v.validate_token(request(token)) == TokenVerdict(True, USER)
        assert (factory.connections, factory.requests) == (2, 3)
        await v.stop()
    finally:
        globalLogPublisher.removeObserver(events.append)
        await port.stopListening()
    assert not [e for e in events if e.get("log_namespace") == "saslsmtp.backend"]
