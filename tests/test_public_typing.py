"""The public names type-check in a user's program under ``mypy --strict``.

``--strict`` does not re-export what a module imports unless its ``__all__`` names it
(``from saslsmtp.protocol import EngineSettings`` was an error), and a builder typed as
returning ``ICredentialsChecker`` hides the methods docs/library.md shows (``stop()``,
``validate_token()``).  A ``SubmissionESMTP`` built from public names only (its
mechanisms and resolver from ``embed.submission_auth``), a ``Portal`` of one's own and a
mechanism in Python type-check too.  The package ships ``py.typed`` (tests/test_packaging.py)
so that this is what an installed saslsmtp gives its users too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

PROGRAM = '''\
from __future__ import annotations

from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from zope.interface import implementer

from saslsmtp import embed
from saslsmtp.embed import MechanismAdapter, Resolver, SubmissionAuth
from saslsmtp.errors import AuthRejected, TemporaryFailure
from saslsmtp.protocol import EngineSettings, SubmissionESMTP
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.outcome import (Accept, Defer, Lookup, Outcome, Reject, Reply, Secret, Session,
                                   ValidateToken, Verify)
from saslsmtp.script import Verdict, load_script
from saslsmtp.testing import MemoryRealm, SMTPHarness, TLSStringTransport


def build(reactor: Clock, token: ValidateToken) -> list[Any]:
    users = embed.file_checker(reactor, path="users.passwd")
    directory = embed.ldap_checker(reactor, url="ldap://x", user_dn="uid={username}")
    directory.stop()
    embed.dovecot_checker(reactor, socket="/s").stop()
    idp = embed.oauth2_checker(reactor, introspection_url="https://x")
    script = embed.auth_script("auth.py", clock=reactor, backends={"users": users})
    portal = embed.portal(MemoryRealm(), [users, idp])
    return [users.lookup_secret("alice", ("plaintext",)), idp.stop(),
            idp.validate_token(token), embed.http_checker(reactor, url="http://x").stop(),
            embed.smtp_checker(reactor, host="h").credentialInterfaces,
            embed.script_password_checker(script).credentialInterfaces, portal,
            EngineSettings, SubmissionESMTP, MechanismSpec, Accept, Defer, Lookup, Reject,
            Reply, Secret, Session, Verify, Verdict, load_script, SMTPHarness,
            TLSStringTransport, AuthRejected, TemporaryFailure]


@implementer(ICredentialsChecker)
class Mine:
    """A checker of the application's own, in a Portal of its own."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes | tuple[()]]:
        return defer.fail(UnauthorizedLogin())


class Pin:
    """A mechanism in Python, typed."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def start(self, initial: bytes | None) -> Outcome:
        return Reply(b"") if initial is None else self.receive(initial)

    def receive(self, response: bytes) -> Outcome:
        return Accept(username="alice") if response == b"1234" else Reject()

    def resume(self, secret: Secret | None) -> Outcome:
        raise RuntimeError("never looks anything up")


PIN = MechanismSpec("X-PIN", Pin)


class AsyncPin:
    """A mechanism with ``async def`` steps (awaiting the application's service)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    async def start(self, initial: bytes | None) -> Outcome:
        return Reply(b"")

    async def receive(self, response: bytes) -> Outcome:
        return Lookup("alice", ("plaintext",))

    async def resume(self, secret: Secret | None) -> Outcome:
        return Accept(username="alice") if secret is not None else Reject()


ASYNC_PIN = MechanismSpec("X-ASYNC-PIN", AsyncPin)


@implementer(embed.ISecretSource)
class Keys:
    """A store of the application's own, for secrets=."""

    def secret_kinds(self) -> frozenset[str]:
        return frozenset({"scram-sha-256"})

    def lookup_secret(self, username: str, kinds: tuple[str, ...],
                      session: Session | None = None) -> defer.Deferred[Secret | None]:
        return defer.succeed(Secret("scram-sha-256", embed.scram_keys("pw")))


def step_by_step() -> Outcome:
    mechanism = embed.mechanism("SCRAM-SHA-256", Session(hostname="imap.example.test"))
    outcome = mechanism.start(b"n,,n=alice,r=nonce")
    if isinstance(outcome, Lookup):
        outcome = mechanism.resume(Secret("scram-sha-256", embed.scram_keys("pw")))
    return outcome


def no_secrets(request: Lookup | ValidateToken, session: Session) -> defer.Deferred[Secret | None]:
    return defer.succeed(None)


class Factory(protocol.ServerFactory):
    """One SubmissionESMTP per connection, from public names only."""

    def __init__(self, reactor: Clock, portal: Portal, auth: SubmissionAuth) -> None:
        self.reactor, self.portal, self.auth = reactor, portal, auth

    def buildProtocol(self, addr: IAddress | None) -> SubmissionESMTP:
        settings = EngineSettings(hostname="mx.example.test", mechanisms=self.auth.names)
        return SubmissionESMTP(portal=self.portal, settings=settings, clock=self.reactor,
                               mechanisms=self.auth.mechanisms, resolver=self.auth.resolver,
                               blocking=self.auth.blocking, tls_context=None)


def serve(reactor: Clock) -> list[Any]:
    users = embed.file_checker(reactor, path="users.passwd")
    script = embed.auth_script("auth.py", clock=reactor, backends={"users": users})
    portal = Portal(MemoryRealm(), [Mine(), *embed.exchange_checkers()])
    auth = embed.submission_auth(["PLAIN", "CRAM-MD5", PIN, "X-SCRIPTED"], script=script,
                                 secrets=[users], pool=embed.thread_pool(reactor, "scram"))
    resolver: Resolver = auth.resolver
    SubmissionESMTP(portal=portal, settings=EngineSettings(), clock=reactor,
                    mechanisms=auth.mechanisms, resolver=no_secrets, script=script)
    adapter: MechanismAdapter = embed.challengers([PIN, ASYNC_PIN, "SCRAM-SHA-256"],
                                                  secrets=[Keys()])[b"X-PIN"]()
    harness = SMTPHarness(starttls=True)
    return [Factory(reactor, portal, auth).buildProtocol(None), resolver, adapter, step_by_step(),
            MechanismAdapter(PIN, resolver=no_secrets), harness.tls_started_with]
'''


#: As a Twisted user runs mypy: with mypy-zope, so that a class that ``@implementer``s
#: ``ICredentialsChecker`` is one (stock ``Portal(realm, [checker])`` needs it too).
CONFIG = "[mypy]\nstrict = True\nplugins = mypy_zope:plugin\nfollow_imports = silent\n"


def test_a_user_program_type_checks_strictly(tmp_path: Path) -> None:
    program = tmp_path / "user.py"
    program.write_text(PROGRAM)
    (tmp_path / "mypy.ini").write_text(CONFIG)
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini",
                           "--no-incremental", "--cache-dir", os.devnull, str(program)],
                          cwd=tmp_path, env=dict(os.environ, MYPYPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
