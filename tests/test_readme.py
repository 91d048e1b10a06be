"""The README stays true: its code examples run, and its commands exist."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_testing_example_runs() -> None:
    """The "Testing a script" example is a working pytest test."""
    [block] = [b for b in python_blocks() if "SMTPHarness" in b]
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(block, "README.md", "exec"), namespace)
        tests = [v for k, v in namespace.items() if k.startswith("test_")]
        assert tests
        for test in tests:
            test()
    finally:
        os.chdir(cwd)


def test_script_example_compiles_and_uses_the_api() -> None:
    [block] = [b for b in python_blocks() if "async def auth" in b]
    compile(block, "README.md", "exec")
    from saslsmtp import script
    for name in ("Accept", "Defer", "Reject", "Reply", "Verdict"):
        assert hasattr(script, name)


def test_commands_are_the_ci_ones() -> None:
    """.ci/run runs exactly the README's test command."""
    assert "bash scripts/test.sh" in README
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "twistd -n saslsmtp --config etc/saslsmtp.toml" in README


def test_library_example_serves_stock_esmtp_and_imap(tmp_path: Path) -> None:
    """The "As a library" example, in a stock ESMTP and a stock IMAP4Server."""
    import base64
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.mail import imap4, smtp
    from saslsmtp.testing import MemoryRealm
    [block] = [b for b in python_blocks() if "def add_saslsmtp" in b]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    users = tmp_path / "users.passwd"
    users.write_text("alice:{PLAIN}alice-secret\n")
    plain = base64.b64encode(b"\0alice\0alice-secret")

    realm = MemoryRealm()
    server = namespace["add_saslsmtp"](smtp.ESMTP(), Clock(), realm, str(users))
    transport = StringTransport()
    server.makeConnection(transport)
    server.dataReceived(b"EHLO client\r\nAUTH PLAIN " + plain + b"\r\n")
    assert b"AUTH PLAIN LOGIN CRAM-MD5" in transport.value()
    assert transport.value().endswith(b"235 Authentication successful.\r\n")
    assert realm.logins == ["alice"]

    from twisted.cred.portal import IRealm
    from zope.interface import implementer

    @implementer(IRealm)
    class Accounts:
        def requestAvatar(self, avatar_id: bytes, mind: object, *interfaces: object) -> tuple:
            return imap4.IAccount, imap4.MemoryAccount(avatar_id.decode()), lambda: None

    imap = namespace["add_saslsmtp"](imap4.IMAP4Server(), Clock(), Accounts(), str(users))
    transport = StringTransport()
    imap.makeConnection(transport)
    imap.dataReceived(b"a1 AUTHENTICATE PLAIN\r\n" + plain + b"\r\n")
    assert transport.value().endswith(b"+\r\na1 OK Authentication successful\r\n")
