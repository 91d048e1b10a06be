"""Real clients against the built-in mechanisms, over loopback TCP with STARTTLS.

Each test starts saslsmtp in-process (tests/support.start_server) with certificates
from tests/tlsutil.py and runs a real client in a subprocess (in a thread, so the
reactor keeps serving):

* gsasl (GNU SASL): SCRAM-SHA-1, SCRAM-SHA-256 (``--no-cb``: over TLS gsasl refuses the
  non-PLUS names otherwise) and SCRAM-SHA-256-PLUS (tls-exporter on TLS 1.3, tls-unique
  on TLS 1.2), from ``{PLAIN}`` and stored ``{SCRAM-*}`` entries;
* curl ``--oauth2-bearer``: OAUTHBEARER and XOAUTH2 with JWTs checked against a JWKS
  file, and OAUTHBEARER with an opaque token checked at an introspection endpoint
  (twisted.web, in this process).  curl 7.88 ignores ``--login-options AUTH=...`` for
  SMTP (curl issue #10259) and always prefers OAUTHBEARER, so the XOAUTH2 server offers
  XOAUTH2 alone;
* swaks and smtplib: CRAM-MD5 from ``{PLAIN}`` and ``{CRAM-MD5}`` entries;
* msmtp and Python's ssl: EXTERNAL with a client certificate (``[tls] client_ca``).

Every client also fails the way it should: wrong password, expired token, wrong audience,
another user's token, an IdP that is down, an untrusted certificate, a foreign authzid.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
import smtplib
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import threads
from twisted.logger import globalLogPublisher

from saslsmtp.passwords import make_hash
from tests.conftest import event_text, require_binary
from tests.support import RunningServer, smtp_login, start_server
from tests.test_checker_oauth2 import (AUDIENCE, CLIENT_ID, CLIENT_SECRET, ISSUER, IdP,
                                       KeyPair, claims, ec_key, jwks, signed)
from tests.tlsutil import CA, issue_cert, make_ca
from tests.upstreams import WebServer

GSASL, CURL, SWAKS, MSMTP = "/usr/bin/gsasl", "/usr/bin/curl", "/usr/bin/swaks", "/usr/bin/msmtp"

PASSWORDS = {"plain": "pw-plain-7Q", "s1": "pw-sha1-8R", "s256": "pw-sha256-9S", "cram": "pw-cram-5T"}
USER = "alice@example.test"  # the token subject
MESSAGE = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: e2e\r\n\r\nhello\r\n"


# ---- the world: certificates, users, signing key ---------------------------------------


@dataclass
class ClientCert:
    """A client certificate (clientAuth) and its key, as PEM files."""

    cert_path: str
    key_path: str


def issue_client_cert(ca: CA, folder: Path, cn: str, email: str) -> ClientCert:
    """A TLS client certificate signed by ``ca``: CN ``cn``, e-mail SAN ``email``."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False)
            .sign(ca.private_key, hashes.SHA256()))
    cert_path, key_path = folder / f"{cn}.pem", folder / f"{cn}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ClientCert(str(cert_path), str(key_path))


@dataclass
class World:
    """Everything the servers and clients of this module share."""

    root: Path
    server_ca: str
    server_cert: str
    server_key: str
    client_ca: str
    alice: ClientCert
    rogue: ClientCert  # same names, signed by a CA the server does not trust
    users: Path
    signer: KeyPair
    jwks: Path
    message: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: Any) -> World:
    """Certificates (server, client, rogue client), the users file and the JWKS."""
    root = tmp_path_factory.mktemp("mechanisms")
    server_ca = make_ca(root, "server CA")
    server = issue_cert(server_ca, root, names=["localhost", "127.0.0.1"])
    client_ca = make_ca(root, "client CA")
    rogue_ca = make_ca(root, "rogue CA")
    users = root / "users"
    users.write_text("".join([
        f"plain:{{PLAIN}}{PASSWORDS['plain']}\n",
        f"s1:{make_hash('SCRAM-SHA-1', PASSWORDS['s1'])}\n",
        f"s256:{make_hash('SCRAM-SHA-256', PASSWORDS['s256'])}\n",
        f"cram:{make_hash('CRAM-MD5', PASSWORDS['cram'])}\n",
    ]))
    signer = ec_key("e2e-key")
    (root / "jwks.json").write_bytes(jwks(signer))
    (root / "message.eml").write_bytes(MESSAGE)
    return World(root, server_ca.cert_path, server.chain_path, server.key_path,
                 client_ca.cert_path, issue_client_cert(client_ca, root / "alice", "alice", USER),
                 issue_client_cert(rogue_ca, root / "rogue", "alice", USER), users, signer,
                 root / "jwks.json", root / "message.eml")


ALL = ["PLAIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS",
       "OAUTHBEARER", "EXTERNAL"]


async def serve(tmp_path: Path, world: World, mechanisms: list[str] = ALL, *,
                idp: str | None = None, identity: str = "cn",
                listen: list[str] | None = None, limits: str = "") -> RunningServer:
    """saslsmtp with STARTTLS, the users file and an oauth2 backend (the JWKS file, or
    the introspection endpoint ``idp``)."""
    if idp is None:
        oauth2 = (f'jwks_file = "{world.jwks}"\nissuer = "{ISSUER}"\naudience = "{AUDIENCE}"\n')
    else:
        oauth2 = (f'introspection_url = "{idp}"\nclient_id = "{CLIENT_ID}"\n'
                  f'client_secret = "{CLIENT_SECRET}"\nusername_claim = "username"\n')
    backends = (f'[backends.users]\ntype = "file"\npath = "{world.users}"\n\n'
                f'[backends.idp]\ntype = "oauth2"\n{oauth2}')
    tls = (f'[tls]\ncertificate = "{world.server_cert}"\nprivate_key = "{world.server_key}"\n'
           f'client_ca = "{world.client_ca}"\nclient_identity = "{identity}"\n')
    if limits:
        tls += f"\n[limits]\n{limits}"
    return await start_server(tmp_path, backends, mechanisms=mechanisms, extra=tls,
                              listen=listen)


async def run(argv: list[str], stdin: bytes = b"", timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a client without blocking the reactor (the server is in this process)."""
    return await threads.deferToThread(subprocess.run, argv, input=stdin, capture_output=True,
                                       timeout=timeout)


def authenticated_users(server: RunningServer) -> list[str]:
    """The "authenticated user" of every delivered message's Received line."""
    return [m.group(1).decode() for msg in server.messages()
            for m in [re.search(rb"\(authenticated user ([^)]+)\)", msg)] if m]


# ---- gsasl: SCRAM ---------------------------------------------------------------------


def gsasl(port: int, world: World, mechanism: str, user: str, password: str, *extra: str) -> list[str]:
    argv = [GSASL, "--smtp", "--starttls", f"--x509-ca-file={world.server_ca}",
            "-m", mechanism, "-a", user, "-p", password, "--quiet", *extra, "127.0.0.1", str(port)]
    if not mechanism.endswith("-PLUS"):
        argv.insert(-2, "--no-cb")
    return argv


def client_first(stdout: str) -> str:
    """The client-first message gsasl sent (the line after AUTH's empty 334)."""
    lines = stdout.splitlines()
    index = next(i for i, line in enumerate(lines) if line.strip() == "334")
    return base64.b64decode(lines[index + 1]).decode()


@pytest.mark.parametrize("mechanism, user, password, gs2, ok", [
    ("SCRAM-SHA-1", "plain", PASSWORDS["plain"], "n,,", True),
    ("SCRAM-SHA-1", "s1", PASSWORDS["s1"], "n,,", True),
    ("SCRAM-SHA-1", "s1", "wrong-password", "n,,", False),
    ("SCRAM-SHA-1", "s256", PASSWORDS["s256"], "n,,", False),  # only SHA-256 keys stored
    ("SCRAM-SHA-256", "plain", PASSWORDS["plain"], "n,,", True),
    ("SCRAM-SHA-256", "s256", PASSWORDS["s256"], "n,,", True),
    ("SCRAM-SHA-256", "s256", "wrong-password", "n,,", False),
    ("SCRAM-SHA-256", "nobody", "whatever", "n,,", False),
    ("SCRAM-SHA-256-PLUS", "plain", PASSWORDS["plain"], "p=tls-exporter,,", True),
    ("SCRAM-SHA-256-PLUS", "s256", PASSWORDS["s256"], "p=tls-exporter,,", True),
    ("SCRAM-SHA-256-PLUS", "s256", "wrong-password", "p=tls-exporter,,", False),
])
@pytest_twisted.ensureDeferred
async def test_gsasl_scram(tmp_path, world, mechanism, user, password, gs2, ok):
    """gsasl logs in (235, exit 0) or gets 535 5.7.8 (exit 1); its client-first message
    shows the channel binding it used."""
    require_binary(GSASL)
    server = await serve(tmp_path, world)
    try:
        done = await run(gsasl(server.port, world, mechanism, user, password))
    finally:
        await server.stop()
    out = done.stdout.decode(errors="replace")
    assert client_first(out).startswith(gs2 + "n=" + user + ",r="), out
    if ok:
        assert done.returncode == 0 and "235 2.7.0" in out, out + done.stderr.decode()
        finals = [base64.b64decode(line[4:]) for line in out.splitlines() if line.startswith("334 ")]
        assert finals[-1].startswith(b"v=")  # server-final in a 334, then the empty line
    else:
        assert done.returncode == 1 and "535 5.7.8" in out and "235" not in out, out


@pytest_twisted.ensureDeferred
async def test_gsasl_scram_plus_tls12_uses_tls_unique(tmp_path, world):
    """On TLS 1.2 (gsasl's GnuTLS priority without 1.3) the binding is tls-unique."""
    require_binary(GSASL)
    server = await serve(tmp_path, world)
    try:
        done = await run(gsasl(server.port, world, "SCRAM-SHA-256-PLUS", "s256", PASSWORDS["s256"],
                               "--priority=NORMAL:-VERS-TLS1.3"))
    finally:
        await server.stop()
    out = done.stdout.decode(errors="replace")
    assert client_first(out).startswith("p=tls-unique,,n=s256,"), out
    assert done.returncode == 0 and "235 2.7.0" in out, out


def scram_plus_implicit(port: int, world: World, binding: bytes | None) -> list[tuple[int, bytes]]:
    """SCRAM-SHA-256-PLUS with scramp over implicit TLS, bound with tls-server-end-point
    (the SHA-256 of the server certificate, or ``binding`` to forge it); the replies."""
    import hashlib

    import scramp
    context = ssl.create_default_context(cafile=world.server_ca)
    context.check_hostname = False
    with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=10) as s:
        s.ehlo("client.example")
        cert = s.sock.getpeercert(binary_form=True)
        data = binding if binding is not None else hashlib.sha256(cert).digest()
        client = scramp.ScramClient(["SCRAM-SHA-256-PLUS"], "s256", PASSWORDS["s256"],
                                    channel_binding=("tls-server-end-point", data))
        replies = [s.docmd("AUTH", "SCRAM-SHA-256-PLUS "
                           + base64.b64encode(client.get_client_first().encode()).decode())]
        client.set_server_first(base64.b64decode(replies[0][1]).decode())
        replies.append(s.docmd(base64.b64encode(client.get_client_final().encode()).decode()))
        if replies[-1][0] == 334:
            client.set_server_final(base64.b64decode(replies[-1][1]).decode())  # checks v=
            replies.append(s.docmd(""))
        return replies


@pytest_twisted.ensureDeferred
async def test_scram_plus_over_implicit_tls(tmp_path, world):
    """Implicit TLS (an ssl: listener) fills the channel bindings too: scramp binds with
    tls-server-end-point and logs in; a forged binding gets 535."""
    server = await serve(tmp_path, world, ["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"],
                         listen=["ssl:0:interface=127.0.0.1"])
    try:
        good = await threads.deferToThread(scram_plus_implicit, server.port, world, None)
        forged = await threads.deferToThread(scram_plus_implicit, server.port, world, b"\0" * 32)
    finally:
        await server.stop()
    assert [code for code, _ in good] == [334, 334, 235]
    assert [code for code, _ in forged] == [334, 535]
    assert b"channel-bindings-dont-match" in forged[1][1]


# ---- curl: OAUTHBEARER / XOAUTH2 -------------------------------------------------------


def curl(port: int, world: World, token: str, user: str = USER) -> list[str]:
    return [CURL, "-sS", "-v", "--max-time", "20", f"smtp://127.0.0.1:{port}", "--ssl-reqd",
            "--cacert", world.server_ca, "--user", f"{user}:", "--oauth2-bearer", token,
            "--mail-from", "a@example.test", "--mail-rcpt", "b@example.test",
            "--upload-file", str(world.message)]


def server_lines(stderr: bytes) -> list[str]:
    """What the server said, from curl -v (``< `` lines)."""
    return [line[2:] for line in stderr.decode(errors="replace").splitlines() if line.startswith("< ")]


def error_json(lines: list[str]) -> dict[str, Any]:
    """The JSON error challenge of a failed OAuth exchange."""
    challenge = next(line for line in lines if line.startswith("334 ") and len(line) > 4)
    return json.loads(base64.b64decode(challenge[4:]))


@pytest_twisted.ensureDeferred
async def test_curl_oauthbearer_jwt(tmp_path, world):
    """A valid JWT: 235, the mail is delivered as the token's subject.  Expired, wrong
    audience, signed by another key, or presented for another user: the JSON error
    round (invalid_token) then 535, curl exit 67.  No token reaches a log event."""
    require_binary(CURL)
    events: list[str] = []
    observer = lambda e: events.append(event_text(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    good = signed(world.signer, claims())
    bad = {
        "expired": signed(world.signer, claims(time.time() - 7200)),
        "audience": signed(world.signer, claims(aud="another-app")),
        "forged": signed(ec_key("e2e-key"), claims()),
    }
    server = await serve(tmp_path, world)
    try:
        done = await run(curl(server.port, world, good))
        lines = server_lines(done.stderr)
        assert done.returncode == 0, done.stderr.decode()
        assert "235 2.7.0 Authentication successful" in lines
        assert authenticated_users(server) == [USER]
        for name, token in [*bad.items(), ("other user", good)]:
            user = "bob@example.test" if name == "other user" else USER
            done = await run(curl(server.port, world, token, user))
            lines = server_lines(done.stderr)
            assert done.returncode == 67, (name, done.stderr.decode())
            assert error_json(lines)["status"] == "invalid_token", name
            assert any(line.startswith("535 5.7.8") for line in lines), name
            assert "> AQ==" in done.stderr.decode()  # the client's \x01 ended the round
        assert authenticated_users(server) == [USER]
    finally:
        await server.stop()
        globalLogPublisher.removeObserver(observer)
    text = "\n".join(events)
    assert "token refused (expired)" in text and "token refused (wrong audience)" in text
    for token in (good, *bad.values()):
        assert token not in text and token.split(".")[2] not in text


@pytest_twisted.ensureDeferred
async def test_curl_xoauth2_jwt(tmp_path, world):
    """XOAUTH2 (offered alone: curl ignores --login-options for SMTP): a valid token is
    accepted; an expired one gets {"status": "401", "schemes": "bearer"}, curl answers
    with the empty line and gives up (exit 67) without reading the 535, so the same
    exchange is replayed with smtplib to see the 535 5.7.8 after the empty line."""
    require_binary(CURL)
    expired = signed(world.signer, claims(time.time() - 7200))
    server = await serve(tmp_path, world, ["XOAUTH2"])
    try:
        done = await run(curl(server.port, world, signed(world.signer, claims())))
        assert done.returncode == 0, done.stderr.decode()
        assert "> AUTH XOAUTH2" in done.stderr.decode()
        assert authenticated_users(server) == [USER]
        done = await run(curl(server.port, world, expired))
        assert done.returncode == 67
        assert error_json(server_lines(done.stderr)) == {"status": "401", "schemes": "bearer"}
        replies = await threads.deferToThread(xoauth2_replies, server.port, world, expired)
    finally:
        await server.stop()
    assert replies[0][0] == 334
    assert json.loads(base64.b64decode(replies[0][1])) == {"status": "401", "schemes": "bearer"}
    assert replies[1] == (535, b"5.7.8 Authentication credentials invalid")


def xoauth2_replies(port: int, world: World, token: str) -> list[tuple[int, bytes]]:
    """AUTH XOAUTH2 with ``token``, then the empty line: both replies."""
    with tls_session(port, world, None) as s:
        blob = base64.b64encode(f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()).decode()
        first = s.docmd("AUTH", "XOAUTH2 " + blob)
        return [first, s.docmd("")]


@pytest_twisted.ensureDeferred
async def test_curl_oauthbearer_introspection(tmp_path, world):
    """An opaque token the IdP calls active: 235; unknown (inactive): the error round
    and 535; the IdP down: 454 4.7.0 (no error round)."""
    require_binary(CURL)
    idp = WebServer(IdP())
    idp.start()
    idp.resource.tokens = {"opaque-e2e-token": {"username": USER, "exp": int(time.time()) + 60}}
    server = await serve(tmp_path, world, idp=f"http://127.0.0.1:{idp.port}/introspect")
    try:
        done = await run(curl(server.port, world, "opaque-e2e-token"))
        assert done.returncode == 0, done.stderr.decode()
        assert authenticated_users(server) == [USER]
        done = await run(curl(server.port, world, "opaque-unknown-token"))
        assert done.returncode == 67
        assert error_json(server_lines(done.stderr))["status"] == "invalid_token"
        await idp.stop()
        done = await run(curl(server.port, world, "opaque-e2e-token"))
        lines = server_lines(done.stderr)
        assert done.returncode != 0
        assert any(line.startswith("454 4.7.0") for line in lines), lines
        assert not any(line.startswith("334 ") and len(line) > 4 for line in lines)
    finally:
        await server.stop()
        await idp.stop()
    assert [r["path"] for r in idp.resource.requests] == [b"/introspect"] * 2


# ---- swaks and smtplib: CRAM-MD5 -------------------------------------------------------


@pytest.mark.parametrize("user, password, ok", [
    ("plain", PASSWORDS["plain"], True),
    ("cram", PASSWORDS["cram"], True),
    ("cram", "wrong-secret", False),
    ("nobody", "whatever", False),
])
@pytest_twisted.ensureDeferred
async def test_cram_md5_swaks_and_smtplib(tmp_path, world, user, password, ok):
    """swaks and smtplib with CRAM-MD5: 235 for {PLAIN} and {CRAM-MD5} entries;
    535 5.7.8 for a wrong secret or an unknown user (swaks exit 28)."""
    require_binary(SWAKS)
    server = await serve(tmp_path, world)
    try:
        done = await run([SWAKS, "--server", f"127.0.0.1:{server.port}", "--auth", "CRAM-MD5",
                          "--auth-user", user, "--auth-password", password, "--quit-after", "AUTH"])
        code, text = await smtp_login(server.port, user, password, mechanism="CRAM-MD5")
    finally:
        await server.stop()
    out = done.stdout.decode(errors="replace")
    if ok:
        assert done.returncode == 0 and "235 2.7.0" in out, out
        assert (code, text) == (235, b"2.7.0 Authentication successful")
    else:
        assert done.returncode == 28 and "535 5.7.8" in out, out
        assert code == 535 and text.startswith(b"5.7.8")


# ---- EXTERNAL: msmtp and Python ssl -----------------------------------------------------


def msmtp(port: int, world: World, cert: ClientCert, user: str) -> list[str]:
    return [MSMTP, "--file=/dev/null", "--host=127.0.0.1", f"--port={port}", "--tls=on",
            "--tls-starttls=on", f"--tls-trust-file={world.server_ca}",
            f"--tls-cert-file={cert.cert_path}", f"--tls-key-file={cert.key_path}",
            "--auth=external", f"--user={user}", "--from=a@example.test", "-d", "b@example.test"]


@pytest_twisted.ensureDeferred
async def test_msmtp_external(tmp_path, world):
    """msmtp with a client certificate signed by client_ca: authzid "alice" (the CN) ->
    235 and the mail is delivered as alice; authzid "bob" -> 535; the same names from an
    untrusted CA: the server's certificate request names client_ca, so msmtp (GnuTLS)
    does not send that certificate, and EXTERNAL without one -> 535."""
    require_binary(MSMTP)
    server = await serve(tmp_path, world)
    try:
        ok = await run(msmtp(server.port, world, world.alice, "alice"), MESSAGE)
        other = await run(msmtp(server.port, world, world.alice, "bob"), MESSAGE)
        rogue = await run(msmtp(server.port, world, world.rogue, "alice"), MESSAGE)
        delivered = authenticated_users(server)
    finally:
        await server.stop()
    text = [(r.stdout + r.stderr).decode(errors="replace") for r in (ok, other, rogue)]
    assert ok.returncode == 0, text[0]
    assert "<-- 235 2.7.0" in text[0]
    assert other.returncode == 77, text[1]  # EX_NOPERM: authentication failed
    assert "535 5.7.8 Not authorized to requested authorization identity" in text[1]
    assert rogue.returncode == 77, text[2]  # EX_NOPERM, not 74: no TLS alert
    assert "535 5.7.8 No verified client certificate" in text[2] and "<-- 235" not in text[2]
    assert delivered == ["alice"]


def tls_session(port: int, world: World, cert: ClientCert | None) -> smtplib.SMTP:
    context = ssl.create_default_context(cafile=world.server_ca)
    context.check_hostname = False
    if cert is not None:
        context.load_cert_chain(cert.cert_path, cert.key_path)
    s = smtplib.SMTP("127.0.0.1", port, timeout=10)
    s.ehlo("client.example")
    s.starttls(context=context)
    s.ehlo("client.example")
    return s


def external_attempts(port: int, world: World, attempts: list[tuple[ClientCert | None, str]]) -> list[Any]:
    """Each (certificate, AUTH EXTERNAL argument) on a fresh STARTTLS session: the
    reply (code, text), or the exception's class name when TLS failed."""
    results: list[Any] = []
    for cert, argument in attempts:
        try:
            with tls_session(port, world, cert) as s:
                results.append(s.docmd("AUTH", f"EXTERNAL {argument}"))
        except (ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError, socket.timeout) as e:
            results.append(type(e).__name__)
    return results


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest_twisted.ensureDeferred
async def test_external_python_client(tmp_path, world):
    """Raw AUTH EXTERNAL from Python: "=" (no authzid) authenticates as the CN; an
    explicit other authzid is refused; no certificate -> 535; an untrusted certificate
    gets a session, and EXTERNAL's 535 says why it does not count.  With client_identity = "email" the identity is the e-mail SAN."""
    server = await serve(tmp_path, world)
    try:
        results = await threads.deferToThread(external_attempts, server.port, world, [
            (world.alice, "="), (world.alice, b64("alice")), (world.alice, b64("bob")),
            (None, "="), (world.rogue, "=")])
    finally:
        await server.stop()
    assert results[0] == (235, b"2.7.0 Authentication successful")
    assert results[1] == (235, b"2.7.0 Authentication successful")
    assert results[2] == (535, b"5.7.8 Not authorized to requested authorization identity")
    assert results[3] == (535, b"5.7.8 No verified client certificate")
    assert results[4] == (535, b"5.7.8 Client certificate not verified: "
                                b"unable to get local issuer certificate")
    (tmp_path / "email").mkdir()
    server = await serve(tmp_path / "email", world, identity="email")
    try:
        results = await threads.deferToThread(external_attempts, server.port, world, [
            (world.alice, b64(USER)), (world.alice, b64("alice"))])
    finally:
        await server.stop()
    assert results[0] == (235, b"2.7.0 Authentication successful")
    assert results[1][0] == 535


@pytest_twisted.ensureDeferred
async def test_external_failures_say_why_and_guess_no_password(tmp_path, world):
    """Each failed EXTERNAL is one fail2ban line whose reason tells an operator what was
    wrong with the certificate (none, another authorization identity), not "invalid
    credentials"; none of them counts toward auth_failures_per_ip (no secret was
    tried), so a PLAIN login from that address still works after more of them than the
    limit allows, while wrong passwords still count."""
    from twisted.logger import formatEvent, globalLogPublisher
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    server = await serve(tmp_path, world, limits='auth_failures_per_ip = "2/1m"\n')
    plain = "PLAIN " + b64(f"\0plain\0{PASSWORDS['plain']}")
    wrong = ["PLAIN " + b64(f"\0plain\0wrong{n}") for n in (1, 2)]  # a repeated one counts once

    def attempts() -> list[Any]:
        results = external_attempts(server.port, world, [(None, "="), (None, "="), (None, "="),
                                                           (world.alice, b64("bob"))])
        with tls_session(server.port, world, None) as s:
            results.append(s.docmd("AUTH", plain))
        for argument in (*wrong, plain):
            with tls_session(server.port, world, None) as s:
                results.append(s.docmd("AUTH", argument))
        return results
    try:
        results = await threads.deferToThread(attempts)
    finally:
        globalLogPublisher.removeObserver(events.append)
        await server.stop()
    assert results[:4] == [(535, b"5.7.8 No verified client certificate")] * 3 + [
        (535, b"5.7.8 Not authorized to requested authorization identity")]
    assert results[4] == (235, b"2.7.0 Authentication successful")  # not limited
    assert [r[0] for r in results[5:]] == [535, 535, 454]  # passwords count: limited
    lines = [formatEvent(e) for e in events if formatEvent(e).startswith("auth failed:")]
    assert lines[:4] == [
        'auth failed: client=127.0.0.1 mechanism=EXTERNAL user="" reason="no client certificate"'] * 3 + [
        'auth failed: client=127.0.0.1 mechanism=EXTERNAL user="" reason="authorization identity not allowed"']
    assert lines[4:6] == ['auth failed: client=127.0.0.1 mechanism=PLAIN user="plain"'
                          ' reason="invalid credentials"'] * 2
