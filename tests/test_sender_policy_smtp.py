"""Sender policy at MAIL FROM over the wire (string transport): ``login`` and ``map``
modes, ``<>``, a map edited while running, and the AUTH script's ``sender()`` hook."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import defer, task

from saslsmtp.script import Accept, AuthScript, Backends, Defer, Reject, ScriptRunner
from saslsmtp.sendercheck import SenderCheck
from saslsmtp.senders import SenderMap, SenderPolicy
from saslsmtp.testing import SMTPHarness

USERS = {"alice@example.test": "pw", "carol": "pw"}
OK = b"250 2.1.0 Sender OK\r\n"


def logged_in(check: SenderCheck, user: str = "alice@example.test", **kw) -> SMTPHarness:
    h = SMTPHarness(users=USERS, sender_check=check, **kw)
    assert h.login(user, "pw").startswith(b"235 ")
    return h


def mail(h: SMTPHarness, address: str) -> bytes:
    out = h.send(f"MAIL FROM:<{address}>\r\n".encode())
    if out.startswith(b"250"):
        h.send(b"RSET\r\n")
    return out


def test_login_policy() -> None:
    """``login``: the login itself (domain case-insensitive); another address is 553;
    ``<>`` follows allow_null_sender."""
    h = logged_in(SenderCheck(SenderPolicy("login", allow_null_sender=False)))
    assert mail(h, "alice@example.test") == OK
    assert mail(h, "alice@EXAMPLE.test") == OK
    assert mail(h, "bob@example.test") == (
        b"553 5.7.1 <bob@example.test>: Sender address rejected: not owned by user"
        b" alice@example.test\r\n")
    assert mail(h, "") == (b"553 5.7.1 <>: Sender address rejected: not owned by user"
                           b" alice@example.test\r\n")
    h = logged_in(SenderCheck(SenderPolicy("login", allow_null_sender=True)))
    assert mail(h, "") == OK


def test_map_policy_and_reload(tmp_path: Path) -> None:
    """``map``: listed addresses and @domain; the map is re-read when it changes."""
    path = tmp_path / "senders"
    path.write_text("carol: carol@example.test, @carol.example\n")
    policy = SenderPolicy("map", sender_map=SenderMap(str(path)))
    h = logged_in(SenderCheck(policy), "carol")
    assert mail(h, "carol@example.test") == OK
    assert mail(h, "anything@Carol.Example") == OK
    refused = (b"553 5.7.1 <boss@example.test>: Sender address rejected: not owned by"
               b" user carol\r\n")
    assert mail(h, "boss@example.test") == refused
    path.write_text("carol: carol@example.test, boss@example.test\n")
    os.utime(path, ns=(1, 10**18))  # a new mtime even within the same clock tick
    assert mail(h, "boss@example.test") == OK
    assert mail(h, "x@carol.example") == (
        b"553 5.7.1 <x@carol.example>: Sender address rejected: not owned by user carol\r\n")
    path.unlink()
    assert mail(h, "carol@example.test") == (
        b"451 4.3.0 Local error in processing; try again later\r\n")


def script_runner(sender, clock: task.Clock | None = None) -> ScriptRunner:
    script = AuthScript("<test>", lambda args, ctx: Reject(), None, sender=sender)
    return ScriptRunner(script, clock or task.Clock(), 5.0, Backends({}))


def test_script_sender_hook_accept_reject_defer() -> None:
    """The script's ``sender(arguments, context)`` sees the login, the address, the
    parameters and the connection, after the policy allowed it: Accept -> 250,
    Reject -> 553 5.7.1 (its reason), Defer -> 451 4.7.1."""
    seen = []

    def sender(arguments, context):
        seen.append((arguments["username"], arguments["sender"], arguments["parameters"],
                     arguments["remote_ip"], arguments["helo"]))
        context["mails"] = context.get("mails", 0) + 1
        if arguments["sender"].startswith("ok"):
            return Accept()
        if arguments["sender"].startswith("later"):
            return Defer("sender database down")
        return Reject("not while on holiday")

    h = logged_in(SenderCheck(SenderPolicy("any"), script_runner(sender)))
    assert h.send(b"MAIL FROM:<ok@example.test> BODY=8BITMIME\r\n") == OK
    h.send(b"RSET\r\n")
    assert mail(h, "no@example.test") == b"553 5.7.1 not while on holiday\r\n"
    assert mail(h, "later@example.test") == b"451 4.7.1 sender database down\r\n"
    assert seen[0] == ("alice@example.test", "ok@example.test", ("BODY=8BITMIME",),
                       "192.0.2.10", "client.example")
    assert h.protocol.context["mails"] == 3


def test_policy_refusal_comes_before_the_script_and_a_slow_script_defers() -> None:
    """The policy refuses first (the script is not asked); a script past its timeout
    answers 451 4.7.1 and the connection goes on."""
    calls = []

    def sender(arguments, context):
        calls.append(arguments["sender"])
        return defer.Deferred()  # never answers

    clock = task.Clock()
    h = logged_in(SenderCheck(SenderPolicy("login"), script_runner(sender, clock)), clock=clock)
    assert mail(h, "bob@example.test").startswith(b"553 5.7.1 <bob@example.test>")
    assert calls == []
    assert h.send(b"MAIL FROM:<alice@example.test>\r\n") == b""
    clock.advance(5.1)
    assert h.take() == (b"451 4.7.1 Sender address check failed temporarily,"
                        b" try again later\r\n")
    assert h.send(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"
