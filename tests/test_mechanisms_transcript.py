"""The built-in challenge mechanisms on the wire: RFC vectors as exact-byte SMTP
transcripts over StringTransport (RFC 2195, RFC 5802, RFC 7677, RFC 7628, XOAUTH2)."""

from __future__ import annotations

import base64
import functools

import pytest
import scramp

from twisted.internet import defer

from saslsmtp.mechanisms import builtin_mechanisms
from saslsmtp.sasl.cram_md5 import CramMD5, cram_md5_context
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.oauth import OAuthBearer, XOAuth2
from saslsmtp.sasl.outcome import (TOKEN_VERDICT, Accept, Lookup, Secret, TokenVerdict,
                                   ValidateToken)
from saslsmtp.sasl.scram import Scram
from saslsmtp.testing import SMTPHarness
from tests.test_checker_file import captured_logs  # noqa: F401  (a fixture)

OK = b"235 2.7.0 Authentication successful\r\n"
INVALID = b"535 5.7.8 Authentication credentials invalid\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def secrets(table: dict[str, Secret]):
    """A resolver answering Lookup from a table, as the users file would."""
    def resolve(request, session):
        assert isinstance(request, Lookup)
        return defer.succeed(table.get(request.username))
    return resolve


# RFC 2195 section 2
RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_RESPONSE_B64 = b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"


def cram_harness(secret: Secret) -> SMTPHarness:
    spec = MechanismSpec("CRAM-MD5", functools.partial(
        CramMD5, random=lambda: 1896, clock=lambda: 697170952), client_first=False)
    h = SMTPHarness(mechanisms={"CRAM-MD5": spec}, resolver=secrets({"tim": secret}),
                    hostname="postoffice.reston.mci.net")
    h.send(b"EHLO client.example\r\n")
    return h


def test_rfc2195_cram_md5_from_plaintext_and_from_dovecot_context() -> None:
    from saslsmtp.sasl.cram_md5 import cram_md5_context
    for secret in (Secret("plaintext", "tanstaaftanstaaf"),
                   Secret("cram-md5", cram_md5_context("tanstaaftanstaaf"))):
        h = cram_harness(secret)
        assert h.send(b"AUTH CRAM-MD5\r\n") == b"334 " + b64(RFC2195_CHALLENGE) + b"\r\n"
        assert h.send(RFC2195_RESPONSE_B64 + b"\r\n") == OK
        assert h.realm.logins == ["tim"]


def test_cram_md5_wrong_digest_and_initial_response() -> None:
    h = cram_harness(Secret("plaintext", "other"))
    h.send(b"AUTH CRAM-MD5\r\n")
    assert h.send(RFC2195_RESPONSE_B64 + b"\r\n") == INVALID
    assert h.send(b"AUTH CRAM-MD5 " + RFC2195_RESPONSE_B64 + b"\r\n") == (
        b"501 5.7.0 Initial response not allowed for this mechanism\r\n")


# RFC 5802 section 5 and RFC 7677 section 3: user "user", password "pencil"
SCRAM_VECTORS = {
    "SCRAM-SHA-1": (
        "3rfcNHYJY1ZVvWVs7j",
        b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
        b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
        b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
        (4096, "QSXCR+Q6sek8bf92", "6dlGYMOdZcOPutkcNY8U2g7vK9Y=", "D+CSWLOshSulAsxiupA+qs2/fTE="),
    ),
    "SCRAM-SHA-256": (
        "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        (4096, "W22ZaJ0SNY7soEsUEjb6gQ==", "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=",
         "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="),
    ),
}


def scram_harness(name: str, secret: Secret) -> SMTPHarness:
    nonce = SCRAM_VECTORS[name][0]
    spec = MechanismSpec(name, functools.partial(Scram, name=name, nonce=lambda: nonce))
    h = SMTPHarness(mechanisms={name: spec}, resolver=secrets({"user": secret}))
    h.send(b"EHLO client.example\r\n")
    return h


def stored(name: str) -> Secret:
    iterations, salt, stored_key, server_key = SCRAM_VECTORS[name][5]
    return Secret(name.lower(), (iterations, base64.b64decode(salt), base64.b64decode(stored_key),
                                 base64.b64decode(server_key)))


def test_rfc5802_and_rfc7677_exact_transcripts() -> None:
    """AUTH with the client-first message, 334 server-first, client-final, 334 v=, empty
    line, 235: byte for byte, from stored keys and from the plaintext "pencil"."""
    for name, (_, first, server_first, final, server_final, _) in SCRAM_VECTORS.items():
        for secret in (stored(name), Secret("plaintext", "pencil")):
            h = scram_harness(name, secret)
            if secret.kind == "plaintext":
                # a plaintext entry gets a salt derived per user: only s= differs, and a
                # client that knows "pencil" completes the exchange with that salt
                out = base64.b64decode(h.send(b"AUTH " + name.encode() + b" " + b64(first) + b"\r\n")[4:])
                assert out.startswith(server_first.split(b",s=")[0] + b",s=")
                assert out.endswith(b",i=4096") and out != server_first
                client = scramp.ScramClient([name], "user", "pencil",
                                            c_nonce=first.split(b",r=")[1].decode())
                assert client.get_client_first().encode() == first
                client.set_server_first(out.decode())
                reply = h.send(b64(client.get_client_final().encode()) + b"\r\n")
                assert reply.startswith(b"334 ")
                client.set_server_final(base64.b64decode(reply[4:]).decode())  # checks v=
                assert h.send(b"\r\n") == OK
                assert h.realm.logins == ["user"]
                continue
            assert h.send(b"AUTH " + name.encode() + b" " + b64(first) + b"\r\n") == (
                b"334 " + b64(server_first) + b"\r\n"), name
            assert h.send(b64(final) + b"\r\n") == b"334 " + b64(server_final) + b"\r\n"
            assert h.send(b"\r\n") == OK
            assert h.realm.logins == ["user"]


def test_scram_wrong_proof_and_unknown_user_look_the_same() -> None:
    name, (_, first, _, final, _, _) = "SCRAM-SHA-256", SCRAM_VECTORS["SCRAM-SHA-256"]
    bad = final[:-8] + b"AAAAAAA="
    h = scram_harness(name, stored(name))
    h.send(b"AUTH SCRAM-SHA-256 " + b64(first) + b"\r\n")
    assert h.send(b64(bad) + b"\r\n") == INVALID
    h2 = scram_harness(name, stored(name))
    h2.protocol.auth.resolver = secrets({})  # the user is unknown
    assert h2.send(b"AUTH SCRAM-SHA-256 " + b64(first) + b"\r\n").startswith(b"334 ")
    assert h2.send(b64(final) + b"\r\n") == INVALID


# RFC 7628 section 4.1 (SMTP variant)
RFC7628_SUCCESS_B64 = (
    b"bixhPXVzZXJAZXhhbXBsZS5jb20sAWhvc3Q9c2VydmVyLmV4YW1wbGUuY29tAXBvcnQ9NTg3AWF1dGg9QmVhcmVy"
    b"IHZGOWRmdDRxbVRjMk52YjNSbGNrQmhiSFJoZG1semRHRXVZMjl0Q2c9PQEB")
RFC7628_TOKEN = "vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg=="
GOOGLE_XOAUTH2_B64 = (
    b"dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0"
    b"Q2cBAQ==")
GOOGLE_TOKEN = "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg"


def token_harness(valid: dict[str, str], seen: list | None = None) -> SMTPHarness:
    """TLS session; a fake validator that knows ``valid`` tokens (token -> subject)."""
    def resolve(request, session):
        assert isinstance(request, ValidateToken)
        if seen is not None:
            seen.append(request)
        subject = valid.get(request.token)
        return defer.succeed(Secret(TOKEN_VERDICT, TokenVerdict(subject is not None, subject)))
    specs = {"OAUTHBEARER": MechanismSpec("OAUTHBEARER", functools.partial(
                 OAuthBearer, scope="https://mail.example.com/"), needs_tls=True),
             "XOAUTH2": MechanismSpec("XOAUTH2", XOAuth2, needs_tls=True)}
    h = SMTPHarness(mechanisms=specs, resolver=resolve, tls=True, hostname="server.example.com")
    h.send(b"EHLO client.example\r\n")
    return h


def test_rfc7628_oauthbearer_success() -> None:
    seen: list = []
    h = token_harness({RFC7628_TOKEN: "user@example.com"}, seen)
    assert h.send(b"AUTH OAUTHBEARER " + RFC7628_SUCCESS_B64 + b"\r\n") == OK
    assert h.realm.logins == ["user@example.com"]
    assert (seen[0].username, seen[0].host, seen[0].port) == ("user@example.com", "server.example.com", 587)


def test_rfc7628_oauthbearer_error_flow() -> None:
    """An invalid token: 334 with the JSON status, the client's %x01, then 535."""
    h = token_harness({})
    out = h.send(b"AUTH OAUTHBEARER " + RFC7628_SUCCESS_B64 + b"\r\n")
    assert out == b"334 " + b64(b'{"status":"invalid_token","scope":"https://mail.example.com/"}') + b"\r\n"
    assert h.send(b"AQ==\r\n") == INVALID


def test_oauth_needs_tls() -> None:
    h = SMTPHarness(mechanism_names=["OAUTHBEARER"], users={},
                    resolver=lambda request, session: defer.succeed(None))
    assert b"AUTH" not in h.send(b"EHLO c\r\n")
    assert h.send(b"AUTH OAUTHBEARER " + RFC7628_SUCCESS_B64 + b"\r\n") == (
        b"538 5.7.11 Encryption required for requested authentication mechanism\r\n")


def test_google_xoauth2_success_and_error_round() -> None:
    h = token_harness({GOOGLE_TOKEN: "someuser@example.com"})
    assert h.send(b"AUTH XOAUTH2 " + GOOGLE_XOAUTH2_B64 + b"\r\n") == OK
    h2 = token_harness({})
    out = h2.send(b"AUTH XOAUTH2 " + GOOGLE_XOAUTH2_B64 + b"\r\n")
    assert out == b"334 " + b64(b'{"status":"401","schemes":"bearer"}') + b"\r\n"
    assert h2.send(b"\r\n") == INVALID


# -- "*" cancels at every step (RFC 4954 section 4) --------------------------------------

def _cancel_cases() -> dict[str, tuple]:
    """name -> (harness factory, lines sent before the "*", the replies they get)."""
    from saslsmtp.sasl.external import SPEC as EXTERNAL

    def passwords() -> SMTPHarness:
        h = SMTPHarness(users={"tim": "secret"})
        h.send(b"EHLO client.example\r\n")
        return h

    def external() -> SMTPHarness:
        h = SMTPHarness(mechanisms={"EXTERNAL": EXTERNAL}, tls=True)
        h.send(b"EHLO client.example\r\n")
        return h
    sha256 = "SCRAM-SHA-256"
    _, first, server_first, final, server_final, _ = SCRAM_VECTORS[sha256]
    scram = functools.partial(scram_harness, sha256, stored(sha256))
    cram = functools.partial(cram_harness, Secret("plaintext", "tanstaaftanstaaf"))
    oauth_error = b64(b'{"status":"invalid_token","scope":"https://mail.example.com/"}')
    return {
        "PLAIN, empty challenge": (passwords, [(b"AUTH PLAIN", b"334 ")]),
        "LOGIN, Username:": (passwords, [(b"AUTH LOGIN", b"334 VXNlcm5hbWU6")]),
        "LOGIN, Password:": (passwords, [(b"AUTH LOGIN", b"334 VXNlcm5hbWU6"),
                                         (b64(b"tim"), b"334 UGFzc3dvcmQ6")]),
        "CRAM-MD5, challenge": (cram, [(b"AUTH CRAM-MD5", b"334 " + b64(RFC2195_CHALLENGE))]),
        "SCRAM, empty challenge": (scram, [(b"AUTH " + sha256.encode(), b"334 ")]),
        "SCRAM, server-first": (scram, [(b"AUTH " + sha256.encode() + b" " + b64(first),
                                         b"334 " + b64(server_first))]),
        "SCRAM, server-final": (scram, [(b"AUTH " + sha256.encode() + b" " + b64(first),
                                         b"334 " + b64(server_first)),
                                        (b64(final), b"334 " + b64(server_final))]),
        "OAUTHBEARER, empty challenge": (lambda: token_harness({}), [(b"AUTH OAUTHBEARER", b"334 ")]),
        "OAUTHBEARER, error status": (lambda: token_harness({}), [
            (b"AUTH OAUTHBEARER " + RFC7628_SUCCESS_B64, b"334 " + oauth_error)]),
        "XOAUTH2, error status": (lambda: token_harness({}), [
            (b"AUTH XOAUTH2 " + GOOGLE_XOAUTH2_B64, b"334 " + b64(b'{"status":"401","schemes":"bearer"}'))]),
        "EXTERNAL, empty challenge": (external, [(b"AUTH EXTERNAL", b"334 ")]),
    }


CANCEL_CASES = _cancel_cases()


@pytest.mark.parametrize("case", sorted(CANCEL_CASES))
def test_star_cancels_at_every_step_of_every_mechanism(case: str) -> None:
    """At each 334 of each built-in mechanism, ``*`` ends the exchange with 501 5.7.0:
    nobody is logged in, it is not an error nor a failed login (no 535, nothing
    counted towards ``max_failures``), and the session goes on (NOOP, a new AUTH)."""
    make, steps = CANCEL_CASES[case]
    h = make()
    for line, reply in steps:
        assert h.send(line + b"\r\n") == reply + b"\r\n"
    assert h.send(b"*\r\n") == b"501 5.7.0 Authentication aborted\r\n"
    assert h.send(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"
    assert h.realm.logins == [] and h.protocol.auth.exchange is None
    assert (h.protocol.guards.errors, h.protocol.auth.failures.failures) == (0, 0)
    assert h.send(steps[0][0] + b"\r\n") == steps[0][1] + b"\r\n"


# ---- a users file's extra fields after a challenge exchange ---------------------------


def fields_harness(tmp_path, name: str, spec: MechanismSpec, line: str, peer: str,
                   hostname: str = "localhost") -> SMTPHarness:
    """A harness whose secrets come from a real users file (one line) through the
    daemon's resolver, as a client from ``peer``."""
    from saslsmtp.checkers.file import FileChecker
    from saslsmtp.resolver import secret_resolver
    from saslsmtp.threads import SynchronousRunner
    path = tmp_path / f"users-{len(list(tmp_path.iterdir()))}"
    path.write_text(line + "\n")
    users = FileChecker(str(path), SynchronousRunner())
    h = SMTPHarness(mechanisms={name: spec}, backends={"users": users},
                    resolver=secret_resolver([users]), peer=peer, hostname=hostname)
    h.send(b"EHLO client.example\r\n")
    return h


CRAM_SPEC = MechanismSpec("CRAM-MD5", functools.partial(
    CramMD5, random=lambda: 1896, clock=lambda: 697170952), client_first=False)
WRONG_CRAM_B64 = b64(b"tim " + b"0" * 32)
MOVED = b"525 5.7.13 Mailbox-moved-to-mx2\r\n"


@pytest.mark.parametrize("fields, peer, right, wrong", [
    ("", "192.0.2.10", OK, INVALID),
    ("allow_nets=192.0.2.0/24", "192.0.2.10", OK, INVALID),
    ("allow_nets=192.0.2.0/24", "198.51.100.7", INVALID, INVALID),
    ("allow_nets=local", "192.0.2.10", INVALID, INVALID),
    ("nologin", "192.0.2.10", INVALID, INVALID),
    ("nologin reason=Mailbox-moved-to-mx2", "192.0.2.10", MOVED, INVALID),
    ("nologin reason=Mailbox-moved-to-mx2 allow_nets=198.51.100.0/24", "192.0.2.10", MOVED, INVALID),
    ("fail", "192.0.2.10", INVALID, INVALID),
])
def test_cram_md5_applies_the_users_files_extra_fields(tmp_path, fields, peer, right, wrong) -> None:
    """RFC 2195's exchange against a users file line with extra fields: the client's
    address reaches the lookup (allow_nets), and after the right digest the refusal is
    what PLAIN answers (the wrong password's 535, nologin's reason as 525 5.7.13); a wrong
    digest is the 535 either way, so only the password's owner learns a reason."""
    for entry in ("{PLAIN}tanstaaftanstaaf", "{CRAM-MD5}" + cram_md5_context("tanstaaftanstaaf")):
        line = f"tim:{entry}::::::{fields}"
        for response, expected in ((RFC2195_RESPONSE_B64, right), (WRONG_CRAM_B64, wrong)):
            h = fields_harness(tmp_path, "CRAM-MD5", CRAM_SPEC, line, peer,
                               hostname="postoffice.reston.mci.net")
            assert h.send(b"AUTH CRAM-MD5\r\n") == b"334 " + b64(RFC2195_CHALLENGE) + b"\r\n"
            assert h.send(response + b"\r\n") == expected, (line, response)
            assert h.realm.logins == (["tim"] if expected == OK else [])
        # PLAIN from the same client answers the same to the right password
        plain = fields_harness(tmp_path, "PLAIN", builtin_mechanisms(("PLAIN",))["PLAIN"], line, peer)
        assert plain.send(b"AUTH PLAIN " + b64(b"\0tim\0tanstaaftanstaaf") + b"\r\n") == right


def scram_stored_line(name: str, fields: str) -> str:
    iterations, salt, stored_key, server_key = SCRAM_VECTORS[name][5]
    return f"user:{{{name}}}{iterations},{salt},{stored_key},{server_key}::::::{fields}"


@pytest.mark.parametrize("name", list(SCRAM_VECTORS))
def test_scram_applies_the_users_files_extra_fields(tmp_path, name) -> None:
    """RFC 5802/7677 byte for byte from a users file's stored keys: inside allow_nets the
    exchange ends in 235; outside it, or for a nologin user, the same server-first
    message, then the wrong proof's 535 in place of v= (no server signature for a
    refused login); nologin with a reason answers 525 5.7.13 there, to the right proof
    only."""
    nonce, first, server_first, final, server_final, _ = SCRAM_VECTORS[name]
    spec = MechanismSpec(name, functools.partial(Scram, name=name, nonce=lambda: nonce))
    bad = final[:-8] + b"AAAAAAA="
    cases = [
        ("allow_nets=192.0.2.0/24", "192.0.2.10", b"334 " + b64(server_final) + b"\r\n"),
        ("allow_nets=192.0.2.0/24", "198.51.100.7", INVALID),
        ("nologin", "192.0.2.10", INVALID),
        ("nologin reason=Mailbox-moved-to-mx2", "192.0.2.10", MOVED),
    ]
    for fields, peer, after_proof in cases:
        for proof, expected in ((final, after_proof), (bad, INVALID)):
            h = fields_harness(tmp_path, name, spec, scram_stored_line(name, fields), peer)
            assert h.send(b"AUTH " + name.encode() + b" " + b64(first) + b"\r\n") == (
                b"334 " + b64(server_first) + b"\r\n"), (fields, peer)
            assert h.send(b64(proof) + b"\r\n") == expected, (fields, peer, proof)
            if expected.startswith(b"334 "):
                assert h.send(b"\r\n") == OK
                assert h.realm.logins == ["user"]
            else:
                assert h.realm.logins == []


def test_scram_from_a_plaintext_entry_outside_allow_nets(tmp_path) -> None:
    """A {PLAIN} entry (keys derived from it by prepare_secret, the refusal carried along):
    a real client with the right password gets the 535 where v= would come."""
    name, (_, first, _, _, _, _) = "SCRAM-SHA-256", SCRAM_VECTORS["SCRAM-SHA-256"]
    spec = MechanismSpec(name, functools.partial(Scram, name=name))
    for peer, refused in (("192.0.2.10", False), ("198.51.100.7", True)):
        h = fields_harness(tmp_path, name, spec, "user:{PLAIN}pencil::::::allow_nets=192.0.2.0/24",
                           peer)
        client = scramp.ScramClient([name], "user", "pencil")
        out = h.send(b"AUTH " + name.encode() + b" " + b64(client.get_client_first().encode()) + b"\r\n")
        client.set_server_first(base64.b64decode(out[4:]).decode())
        reply = h.send(b64(client.get_client_final().encode()) + b"\r\n")
        if refused:
            assert reply == INVALID
            continue
        client.set_server_final(base64.b64decode(reply[4:]).decode())
        assert h.send(b"\r\n") == OK


def test_a_refusal_is_logged_after_the_proof_only(tmp_path, captured_logs) -> None:
    """The refusal is logged (file:line, user, rule, mechanism) when the password was
    proved, not for a wrong one; a mechanism that accepts anyway (one that does not
    know refusals) is answered the refusal by the engine."""
    from twisted.logger import formatEvent
    line = "tim:{PLAIN}tanstaaftanstaaf::::::allow_nets=192.0.2.0/24"
    h = fields_harness(tmp_path, "CRAM-MD5", CRAM_SPEC, line, "203.0.113.5",
                       hostname="postoffice.reston.mci.net")
    h.send(b"AUTH CRAM-MD5\r\n")
    assert h.send(WRONG_CRAM_B64 + b"\r\n") == INVALID
    assert not [e for e in captured_logs if "refused" in formatEvent(e)]
    h.send(b"AUTH CRAM-MD5\r\n")
    assert h.send(RFC2195_RESPONSE_B64 + b"\r\n") == INVALID
    refused = [formatEvent(e) for e in captured_logs if "refused" in formatEvent(e)]
    assert refused == [f"{tmp_path / 'users-0'}:1: user 'tim' refused: client 203.0.113.5 not in"
                       " allow_nets (CRAM-MD5)"]
    assert not any("tanstaaf" in formatEvent(e) for e in captured_logs)

    class Careless:  # asks for a secret, accepts whatever it gets
        def __init__(self, session): ...
        def start(self, initial): return Lookup("tim", ("plaintext",))
        def resume(self, secret): return Accept("tim")
        def receive(self, response): raise AssertionError("no second step")
    careless = MechanismSpec("X-CARELESS", Careless)
    h = fields_harness(tmp_path, "X-CARELESS", careless, line, "203.0.113.5")
    assert h.send(b"AUTH X-CARELESS =\r\n") == INVALID
    assert h.realm.logins == []
    h = fields_harness(tmp_path, "X-CARELESS", careless, line, "192.0.2.1")
    assert h.send(b"AUTH X-CARELESS =\r\n") == OK
