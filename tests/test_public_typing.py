"""The public names type-check in a user's program under ``mypy --strict``.

``--strict`` does not re-export what a module imports unless its ``__all__`` names it
(``from saslsmtp.protocol import EngineSettings`` was an error), and a builder typed as
returning ``ICredentialsChecker`` hides the methods docs/library.md shows (``stop()``,
``validate_token()``).  The package ships ``py.typed`` (tests/test_packaging.py) so that
this is what an installed saslsmtp gives its users too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

PROGRAM = '''\
from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from saslsmtp import embed
from saslsmtp.errors import AuthRejected, TemporaryFailure
from saslsmtp.protocol import EngineSettings, SubmissionESMTP
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.outcome import (Accept, Defer, Lookup, Reject, Reply, Secret, Session,
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
