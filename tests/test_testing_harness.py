"""SMTPHarness imports an AUTH script the way the daemon does: once per server start."""

from __future__ import annotations

from pathlib import Path

from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.testing import SMTPHarness

COUNTING = '''
from saslsmtp.script import Accept, Reply

CALLS = 0


def auth(arguments, context):
    global CALLS
    CALLS += 1
    seen = context.get("seen", 0)
    context["seen"] = seen + 1
    return Accept(reason=f"call {CALLS} context {seen}")
'''


def test_connections_of_one_harness_share_the_module_not_the_context(tmp_path: Path) -> None:
    """Like the daemon: module globals live as long as the server, ``context`` as long as
    the connection; a new harness is a restart (the module is imported again)."""
    script = tmp_path / "counting.py"
    script.write_text(COUNTING)
    h = SMTPHarness(script=str(script))
    assert h.login("alice", "pw") == b"235 2.7.0 call 1 context 0\r\n"
    second = h.connect()
    assert second.login("alice", "pw") == b"235 2.7.0 call 2 context 0\r\n"
    assert second.transport is not h.transport
    assert second.realm is h.realm and h.realm.logins == ["alice", "alice"]
    restarted = SMTPHarness(script=str(script))
    assert restarted.login("alice", "pw") == b"235 2.7.0 call 1 context 0\r\n"


def test_connect_keeps_the_server_settings(tmp_path: Path) -> None:
    """A second connection gets the same mechanisms and users, and its own peer address."""
    h = SMTPHarness(users={"alice": "secret"}, mechanism_names=["PLAIN"])
    other = h.connect(peer="198.51.100.7")
    assert other.transport.getPeer().host == "198.51.100.7"
    assert other.login("alice", "secret") == b"235 2.7.0 Authentication successful\r\n"
    assert other.clock is h.clock and other.portal is h.portal


def test_tls_started_with_is_what_starttls_gave_the_transport() -> None:
    """``h.tls_started_with`` (typed on the harness: ``h.transport`` is a plain
    ``StringTransport`` to a type checker) is ``None`` until STARTTLS, then the context;
    PLAIN, hidden before TLS under require_tls, is offered after it."""
    h = SMTPHarness(users={"alice": "secret"}, starttls=True, require_tls=True)
    assert h.send(b"EHLO client.example\r\n").endswith(b"250 STARTTLS\r\n")
    assert h.tls_started_with is None
    assert h.send(b"STARTTLS\r\n") == b"220 2.0.0 Ready to start TLS\r\n"
    assert h.tls_started_with is not None and h.tls_started_with is h.protocol.tls_context
    assert h.login("alice", "secret") == b"235 2.7.0 Authentication successful\r\n"
    assert SMTPHarness().tls_started_with is None


DECLARING = '''
from saslsmtp.script import Accept

MECHANISMS = ["X-ONE"]


def auth(arguments, context):
    return Accept(username="alice")
'''


def test_a_mechanism_nothing_serves_is_refused_as_the_daemon_refuses_it(tmp_path: Path) -> None:
    """A name the script does not declare, or no script at all, is a ValueError saying so
    (it was quietly not offered, or served where the daemon would refuse to start: the
    test then saw a 504, or passed for a configuration that cannot run)."""
    import pytest
    script = tmp_path / "declaring.py"
    script.write_text(DECLARING)
    with pytest.raises(ValueError, match=r"X-TWO is not built in and .*declaring.py does not"
                                         r" serve it \(its MECHANISMS: X-ONE\)"):
        SMTPHarness(script=str(script), mechanism_names=["X-ONE", "X-TWO"])
    with pytest.raises(ValueError, match=r"X-ONE: not built in and no script serves it"):
        SMTPHarness(mechanism_names=["PLAIN", "X-ONE"])
    h = SMTPHarness(script=str(script), mechanism_names=["X-ONE", "PLAIN"])
    assert h.send(b"EHLO client.example\r\n").endswith(b"250 AUTH X-ONE PLAIN\r\n")


def test_a_script_that_cannot_load_is_a_public_config_error(tmp_path: Path) -> None:
    """``embed.ConfigError`` (file, line, why), catchable without a private import."""
    import pytest
    from saslsmtp import embed
    broken = tmp_path / "broken.py"
    broken.write_text("def auth(arguments, context):\n    return (\n")
    with pytest.raises(embed.ConfigError) as caught:
        SMTPHarness(script=str(broken))
    assert str(caught.value) == f"{broken}:2: auth.script: syntax error: '(' was never closed"


def test_users_serve_cram_md5_exact_transcript() -> None:
    """``users=`` serves CRAM-MD5 as a users file's ``{PLAIN}`` entries do (it answered 454
    at every attempt: the in-memory users had no secret to hand out).  RFC 2195's own
    example, with the RFC's challenge fixed by a mechanism spec of the same class."""
    import base64
    import functools

    from saslsmtp.sasl.cram_md5 import CramMD5
    h = SMTPHarness(users={"tim": "tanstaaftanstaaf"}, hostname="postoffice.reston.mci.net",
                    mechanisms={"CRAM-MD5": MechanismSpec("CRAM-MD5", functools.partial(
                        CramMD5, random=lambda: 1896, clock=lambda: 697170952),
                        client_first=False, secret_kinds=("plaintext", "cram-md5"))})
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"AUTH CRAM-MD5\r\n") == (
        b"334 " + base64.b64encode(b"<1896.697170952@postoffice.reston.mci.net>") + b"\r\n")
    assert h.send(b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw\r\n") == (
        b"235 2.7.0 Authentication successful\r\n")
    assert h.realm.logins == ["tim"]


def test_users_serve_scram_against_an_independent_client() -> None:
    """SCRAM-SHA-256 from ``users=``, checked by scramp (a client that is not ours): the
    server's proof verifies, then 235; a wrong password is 535."""
    import base64

    from scramp import ScramClient
    for password, last in (("pencil", b"235 2.7.0 Authentication successful\r\n"),
                           ("wrong", b"535 5.7.8 Authentication credentials invalid\r\n")):
        h = SMTPHarness(users={"user": "pencil"}, mechanism_names=["SCRAM-SHA-256"])
        h.send(b"EHLO client.example\r\n")
        client = ScramClient(["SCRAM-SHA-256"], "user", password)
        first = h.send(b"AUTH SCRAM-SHA-256 " + base64.b64encode(
            client.get_client_first().encode()) + b"\r\n")
        assert first.startswith(b"334 ")
        client.set_server_first(base64.b64decode(first[4:]).decode())
        final = h.send(base64.b64encode(client.get_client_final().encode()) + b"\r\n")
        if password == "wrong":
            assert final == last
            continue
        assert final.startswith(b"334 ")
        client.set_server_final(base64.b64decode(final[4:]).decode())  # raises if forged
        assert h.send(b"\r\n") == last


def test_a_challenge_mechanism_without_secrets_is_refused_as_the_daemon_refuses_it() -> None:
    """CRAM-MD5 or SCRAM with only password checkers (nothing to hand out a secret) is a
    ValueError, as it stops the daemon, not a 454 at every attempt; OAUTHBEARER without a
    token validator too.  An explicit ``resolver`` is the caller's word."""
    import pytest
    from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
    from twisted.internet import defer
    plain_only = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    for name in ("CRAM-MD5", "SCRAM-SHA-256"):
        with pytest.raises(ValueError, match=f"^{name} needs a stored secret: pass users="):
            SMTPHarness(backends={"ldap": plain_only}, mechanism_names=["PLAIN", name])
    with pytest.raises(ValueError, match="^OAUTHBEARER needs a token validator"):
        SMTPHarness(users={"alice": "secret"}, mechanism_names=["OAUTHBEARER"])
    h = SMTPHarness(backends={"ldap": plain_only}, mechanism_names=["CRAM-MD5"],
                    resolver=lambda request, session: defer.succeed(None))
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"AUTH CRAM-MD5\r\n").startswith(b"334 ")
