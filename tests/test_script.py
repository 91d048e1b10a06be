"""The AUTH script (the README's script API): transcripts over StringTransport.

Scripts here are small callables, plus the two shipped examples in etc/.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
from pathlib import Path
from typing import Any

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from zope.interface import implementer

from saslsmtp.config import ConfigError
from saslsmtp.errors import TemporaryFailure
from saslsmtp.script import Accept, Defer, Reject, Reply, Verdict, load_script
from saslsmtp.testing import SMTPHarness
from tests.conftest import event_text

ETC = Path(__file__).resolve().parent.parent / "etc"
EHLO = b"EHLO client.example\r\n"
OK = b"235 2.7.0 Authentication successful\r\n"
INVALID = b"535 5.7.8 Authentication credentials invalid\r\n"
TEMPFAIL = b"454 4.7.0 Temporary authentication failure\r\n"


def b64(data: bytes | str) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


def scripted(auth: Any, names: tuple[str, ...] = ("X-TEST", "PLAIN", "LOGIN"), **kw: Any) -> SMTPHarness:
    h = SMTPHarness(script=auth, mechanism_names=names, **kw)
    h.send(EHLO)
    return h


@pytest.fixture
def logged() -> list[dict]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- the four results, default and custom -------------------------------------------


@pytest.mark.parametrize("result, wire", [
    (Accept(username="u"), OK),
    (Accept(username="u", reason="Welcome back"), b"235 2.7.0 Welcome back\r\n"),
    (Reject(), INVALID),
    (Reject("Go away"), b"535 5.7.8 Go away\r\n"),
    (Reject("Too weak", code=534, enhanced="5.7.9"), b"534 5.7.9 Too weak\r\n"),
    (Reject("Not a 5xx", code=250), b"535 5.7.8 Not a 5xx\r\n"),
    (Defer(), TEMPFAIL),
    (Defer("Try later"), b"454 4.7.0 Try later\r\n"),
    (Defer("Transition", code=432, enhanced="4.7.12"), b"432 4.7.12 Transition\r\n"),
    (Reply(b"challenge"), b"334 " + b64(b"challenge") + b"\r\n"),
    (Reply("text"), b"334 dGV4dA==\r\n"),
    (Reply(b""), b"334 \r\n"),
    (Reply(b"\x00\xff\x01binary"), b"334 " + b64(b"\x00\xff\x01binary") + b"\r\n"),
    (None, INVALID),
])
def test_result_on_the_wire(result: Any, wire: bytes) -> None:
    """Each result with default and custom options gives its exact reply."""
    h = scripted(lambda a, c: result)
    assert h.send(b"AUTH X-TEST\r\n") == wire


def test_accept_for_custom_mechanism_needs_username(logged: list[dict]) -> None:
    """A custom mechanism's Accept() without username defers and says why in the log."""
    h = scripted(lambda a, c: Accept())
    assert h.send(b"AUTH X-TEST\r\n") == TEMPFAIL
    assert any("must name the user" in str(e.get("log_format", "")) for e in logged)


def test_accept_goes_through_the_portal() -> None:
    """Accept logs in through portal.login: the realm sees the user."""
    h = scripted(lambda a, c: Accept(username="carol"))
    assert h.send(b"AUTH X-TEST\r\n") == OK
    assert h.realm.logins == ["carol"]
    assert h.protocol.auth_user == "carol"


@pytest.mark.parametrize("result", [Reject("bye", disconnect=True), Defer("bye", disconnect=True)])
def test_disconnect(result: Any) -> None:
    h = scripted(lambda a, c: result)
    out = h.send(b"AUTH X-TEST\r\nNOOP\r\n")
    assert out in (b"535 5.7.8 bye\r\n", b"454 4.7.0 bye\r\n")
    assert h.transport.disconnecting


def test_reason_with_crlf_and_non_ascii_cannot_break_framing() -> None:
    h = scripted(lambda a, c: Reject("line one\r\n250 2.0.0 fake\r\nsmørrebrød\x00"))
    assert h.send(b"AUTH X-TEST\r\n") == b"535 5.7.8 line one 250 2.0.0 fake sm rrebr d\r\n"


# -- arguments and context --------------------------------------------------------


def test_arguments_for_custom_mechanism() -> None:
    """state, response (None without initial response, b"" for "="), connection data."""
    seen: list[dict] = []

    def auth(arguments, context):
        seen.append(dict(arguments))
        return Reply(b"") if arguments["state"] == 0 else Reject()

    h = scripted(auth)
    h.send(b"AUTH x-test\r\n")
    h.send(b"\r\n")
    h.send(b"AUTH X-TEST =\r\n")
    h.send(b"*\r\n")
    h.send(b"AUTH X-TEST " + b64(b"\x00bin\xff") + b"\r\n")
    first, second, third, fourth = seen
    assert (first["mechanism"], first["state"], first["response"]) == ("X-TEST", 0, None)
    assert (second["state"], second["response"]) == (1, b"")
    assert (third["state"], third["response"]) == (0, b"")
    assert (fourth["state"], fourth["response"]) == (0, b"\x00bin\xff")
    assert first["remote_ip"] == "192.0.2.10" and first["helo"] == "client.example"
    assert first["tls"] is False and first["hostname"] == "localhost"


def test_plain_and_login_give_username_and_password() -> None:
    seen: list[dict] = []

    def auth(arguments, context):
        seen.append(dict(arguments))
        return Accept() if arguments["password"] == "pw" else Reject()

    h = scripted(auth)
    assert h.send(b"AUTH PLAIN " + b64("\0alice\0pw") + b"\r\n") == OK
    assert (seen[0]["mechanism"], seen[0]["username"], seen[0]["password"], seen[0]["authzid"],
            seen[0]["state"], seen[0]["response"]) == ("PLAIN", "alice", "pw", "", 0, None)
    h2 = scripted(auth)
    h2.send(b"AUTH LOGIN " + b64("bob") + b"\r\n")
    assert h2.send(b64("bad") + b"\r\n") == INVALID
    assert (seen[1]["mechanism"], seen[1]["username"]) == ("LOGIN", "bob")


def test_context_across_steps_and_auth_commands_and_not_connections() -> None:
    """context lives for the connection: kept across steps and AUTH commands; a new
    connection starts empty."""
    def auth(arguments, context):
        context["calls"] = context.get("calls", 0) + 1
        if arguments["state"] == 0:
            return Reply(str(context["calls"]))
        return Reject(f"calls={context['calls']}")

    h = scripted(auth)
    assert h.send(b"AUTH X-TEST\r\n") == b"334 " + b64("1") + b"\r\n"
    assert h.send(b"\r\n") == b"535 5.7.8 calls=2\r\n"
    assert h.send(b"AUTH X-TEST\r\n") == b"334 " + b64("3") + b"\r\n"
    h2 = scripted(auth)
    assert h2.send(b"AUTH X-TEST\r\n") == b"334 " + b64("1") + b"\r\n"


def test_star_in_the_middle_does_not_call_the_script() -> None:
    calls: list[int] = []

    def auth(arguments, context):
        calls.append(arguments["state"])
        return Reply(b"more")

    h = scripted(auth)
    h.send(b"AUTH X-TEST\r\n")
    h.send(b"\r\n")
    assert h.send(b"*\r\n") == b"501 5.7.0 Authentication aborted\r\n"
    assert calls == [0, 1]
    assert h.send(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_three_round_custom_mechanism() -> None:
    """Three challenges, then Accept on the fourth call."""
    def auth(arguments, context):
        state = arguments["state"]
        if state == 0:
            context["seen"] = []
        else:
            context["seen"].append(arguments["response"])
        if state < 3:
            return Reply(f"round {state + 1}")
        if context["seen"] == [b"a", b"b", b"c"]:
            return Accept(username="three")
        return Reject()

    h = scripted(auth)
    assert h.send(b"AUTH X-TEST\r\n") == b"334 " + b64("round 1") + b"\r\n"
    assert h.send(b64("a") + b"\r\n") == b"334 " + b64("round 2") + b"\r\n"
    assert h.send(b64("b") + b"\r\n") == b"334 " + b64("round 3") + b"\r\n"
    assert h.send(b64("c") + b"\r\n") == OK


def test_step_limit() -> None:
    """An exchange longer than script_max_steps challenges is refused."""
    h = scripted(lambda a, c: Reply(b"again"), max_steps=3)
    out = h.send(b"AUTH X-TEST\r\n") + h.send(b"\r\n") + h.send(b"\r\n")
    assert out == (b"334 " + b64("again") + b"\r\n") * 3
    assert h.send(b"\r\n") == b"535 5.7.8 Authentication exchange too long\r\n"


# -- asynchronous scripts, errors, timeouts ----------------------------------------


def test_deferred_script_fired_by_the_test() -> None:
    pending: list[defer.Deferred] = []

    def auth(arguments, context):
        d: defer.Deferred = defer.Deferred()
        pending.append(d)
        return d

    h = scripted(auth)
    assert h.send(b"AUTH X-TEST\r\nNOOP\r\n") == b""
    pending[0].callback(Accept(username="late"))
    assert h.take() == OK + b"250 2.0.0 OK\r\n"


def test_async_def_script_awaiting_a_deferred() -> None:
    gate: defer.Deferred = defer.Deferred()

    async def auth(arguments, context):
        value = await gate
        return Accept(username=value)

    h = scripted(auth)
    assert h.send(b"AUTH X-TEST\r\n") == b""
    gate.callback("asyncuser")
    assert h.take() == OK
    assert h.realm.logins == ["asyncuser"]


def errors(logged: list[dict], level: LogLevel = LogLevel.error) -> list[str]:
    return [formatEvent(e) for e in logged
            if e.get("log_namespace") == "saslsmtp.script" and e.get("log_level") == level]


def test_exception_defers_and_logs_one_line_with_file_and_line(tmp_path: Path,
                                                               logged: list[dict]) -> None:
    """A script that raises: 454, one error line naming the script's file:line, the
    exception and the step (no traceback in it: that is at debug level, from the
    script's first frame); the connection goes on."""
    script = tmp_path / "auth.py"
    script.write_text("MECHANISMS = ['X-TEST']\n\ndef helper():\n    raise ValueError('boom in script')\n"
                      "\ndef auth(arguments, context):\n    helper()\n")
    h = scripted(script, names=("X-TEST",))
    assert h.send(b"AUTH X-TEST\r\n") == TEMPFAIL
    assert errors(logged) == [f"AUTH script {script}:4: auth() raised ValueError: boom in script"
                              " (X-TEST state 0); answered as a temporary failure"]
    assert not any(e.get("log_failure") for e in logged)
    [debug] = errors(logged, LogLevel.debug)
    assert debug.splitlines()[1:] == [
        "Traceback (most recent call last):",
        f'  File "{script}", line 7, in auth', "    helper()",
        f'  File "{script}", line 4, in helper', "    raise ValueError('boom in script')",
        "ValueError: boom in script"]
    assert h.send(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"


@pytest.mark.parametrize("command, password", [
    (b"AUTH PLAIN " + b64("\0alice\0log-canary-Pw-1") + b"\r\n", "log-canary-Pw-1"),
    (b"AUTH X-TEST " + b64("alice\0log-canary-Pw-1") + b"\r\n", "log-canary-Pw-1"),
    (b"AUTH PLAIN " + b64("\0alice\0it's \\ q\u00e9") + b"\r\n", "it's \\ q\u00e9"),
])
def test_an_exception_that_quotes_the_credentials_is_logged_without_them(
        command: bytes, password: str, logged: list[dict]) -> None:
    """``int(arguments["password"])`` raises with the password in its message (and a
    custom mechanism's response may hold one): the log line has it replaced by
    ``<redacted>``, in the debug traceback too, whatever form (text or repr) it has there."""
    def auth(arguments, context):
        secret = arguments.get("password") or arguments["response"].split(b"\0")[1]
        return Accept() if int(secret) else Reject()

    h = scripted(auth)
    assert h.send(command) == TEMPFAIL
    text = "\n".join(event_text(e) for e in logged)
    assert "auth() raised ValueError: invalid literal for int() with base 10:" in text
    assert "<redacted>" in text
    for form in (password, repr(password)[1:-1], repr(password.encode())[2:-1]):
        assert form not in text


@pytest.mark.parametrize("keep", [
    "context['password'] = arguments['response']",                       # as sent
    "context['flow'] = {'pw': arguments['response'].decode().strip()}",  # decoded, stripped
    "context['parts'] = [arguments['response'].split(b' ')[1]]",         # split off a response
])
def test_a_secret_the_script_kept_from_an_earlier_step_is_redacted(keep: str,
                                                                   logged: list[dict]) -> None:
    """A custom mechanism's step 1 keeps the password in ``context``; step 2 raises with
    it in the message: the error line and the debug traceback show ``<redacted>``, in
    every form (text, repr, base64); what the server itself made (the nonce) stays."""
    namespace: dict[str, Any] = {}
    exec("def keep(arguments, context):\n    " + keep, namespace)

    def auth(arguments, context):
        if arguments["state"] == 0:
            context["nonce"] = "server-nonce-17"
            return Reply(b"Password:")
        if arguments["state"] == 1:
            namespace["keep"](arguments, context)
            return Reply(b"Code:")
        raise ValueError(f"code {arguments['response']!r} for {context!r} ({context['nonce']})")

    h = scripted(auth)
    assert h.send(b"AUTH X-TEST\r\n") == b"334 " + b64("Password:") + b"\r\n"
    assert h.send(b64("alice kept-Pw-canary9") + b"\r\n") == b"334 " + b64("Code:") + b"\r\n"
    assert h.send(b64("123456") + b"\r\n") == TEMPFAIL
    text = "\n".join(event_text(e) for e in logged)
    assert "auth() raised ValueError: code b'<redacted>' for" in text
    assert "(server-nonce-17)" in text
    for form in ("kept-Pw-canary9", "a2VwdC1Qdy1jYW5hcnk5", b64("alice kept-Pw-canary9").decode()):
        assert form not in text


@pytest.mark.parametrize("first", [
    b"AUTH X-TEST " + b64("alice conn-Pw-canary7") + b"\r\n",  # a custom mechanism's response
    b"AUTH PLAIN " + b64("\0alice\0conn-Pw-canary7") + b"\r\n",  # PLAIN's decoded password
])
def test_a_secret_kept_from_an_earlier_auth_command_is_redacted(first: bytes,
                                                                logged: list[dict]) -> None:
    """The first AUTH command's password is kept in ``context`` (and the login fails); a
    later AUTH command on the same connection raises with ``context`` in its message:
    the kept password is redacted there too, in every form, though this exchange never
    heard it; what the server made itself stays readable."""
    def auth(arguments, context):
        said = arguments.get("password") or arguments["response"] or b""
        if "kept" not in context:
            context["kept"] = {"pw": said.split(b" ")[-1].decode() if isinstance(said, bytes)
                               else said, "nonce": "server-nonce-18"}
            return Reject()
        raise ValueError(f"stale session {context!r}")

    h = scripted(auth)
    assert h.send(first) == INVALID
    assert h.send(b"AUTH X-TEST " + b64("alice 000000") + b"\r\n") == TEMPFAIL
    assert h.send(b"AUTH PLAIN " + b64("\0alice\0other") + b"\r\n") == TEMPFAIL
    text = "\n".join(event_text(e) for e in logged)
    assert text.count("auth() raised ValueError: stale session {'kept': {'pw': '<redacted>',"
                      " 'nonce': 'server-nonce-18'}}") == 2
    for form in ("conn-Pw-canary7", b64("conn-Pw-canary7").decode()):
        assert form not in text


def test_a_secret_kept_at_login_is_redacted_from_sender(logged: list[dict]) -> None:
    """``sender()`` at MAIL FROM quoting what ``auth()`` kept of the login's password in
    ``context``: redacted (the AUTH exchange is over, the connection remembers it)."""
    from twisted.internet.task import Clock
    from saslsmtp.script import AuthScript, Backends, ScriptRunner
    from saslsmtp.sendercheck import SenderCheck
    from saslsmtp.senders import SenderPolicy

    def auth(arguments, context):
        context["pw"] = arguments["password"]
        return Accept()

    def sender(arguments, context):
        raise LookupError(f"no list for {context}")

    runner = ScriptRunner(AuthScript("<test>", auth, None, sender=sender), Clock(), 5.0,
                          Backends({}))
    h = SMTPHarness(script=runner.script, sender_check=SenderCheck(SenderPolicy("any"), runner))
    assert h.login("alice", "sender-Pw-canary5").startswith(b"235 ")
    assert h.send(b"MAIL FROM:<a@example.test>\r\n").startswith(b"451 ")
    text = "\n".join(event_text(e) for e in logged)
    assert "sender() raised LookupError: no list for {'pw': '<redacted>'}" in text
    assert "sender-Pw-canary5" not in text


def test_the_connection_remembers_a_few_exchanges_only() -> None:
    """``Heard`` is bounded: the last ``EXCHANGES`` exchanges, at most ``LIMIT`` bytes of
    the earlier ones (the current one whole), nothing before the first AUTH."""
    from saslsmtp.sasl.heard import Heard
    heard = Heard()
    assert heard.said() == ()
    for n in range(Heard.EXCHANGES + 2):
        heard.begin()
        heard.add(f"exchange-{n}".encode())
        heard.add(b"")  # nothing said: nothing kept
    assert heard.said() == tuple(f"exchange-{n}".encode()
                                 for n in range(2, Heard.EXCHANGES + 2))
    big = b"x" * (Heard.LIMIT - 10)
    heard.begin()
    heard.add(big)
    heard.add("t\u00e9xt")
    heard.begin()
    heard.add(b"next")
    assert heard.said() == (big, "t\u00e9xt".encode(), b"next")  # older ones over LIMIT: gone
    huge = b"y" * (Heard.LIMIT + 1)
    heard.add(huge)
    assert heard.said()[-1] == huge  # the current exchange is kept whole
    heard.begin()
    assert heard.said() == ()  # once earlier, over LIMIT on its own: gone


def test_a_script_returning_another_awaitable_is_awaited() -> None:
    """Not only ``async def`` and Deferreds: any awaitable a script returns (an object
    with ``__await__``, a helper's coroutine) is awaited; it was a 454 ("returned
    Awaitable")."""
    gate: defer.Deferred = defer.Deferred()

    class Verdict:
        def __await__(self):
            name = yield from gate.__await__()
            return Accept(username=name)

    h = scripted(lambda a, c: Verdict())
    assert h.send(b"AUTH X-TEST\r\n") == b""
    gate.callback("awaited")
    assert h.take() == OK
    assert h.realm.logins == ["awaited"]


def test_exception_in_async_script() -> None:
    async def auth(arguments, context):
        raise RuntimeError("async boom")

    assert scripted(auth).send(b"AUTH X-TEST\r\n") == TEMPFAIL


def test_wrong_return_type_defers() -> None:
    assert scripted(lambda a, c: "yes").send(b"AUTH X-TEST\r\n") == TEMPFAIL


def test_a_challenge_that_is_not_bytes_or_str_defers(logged: list[dict]) -> None:
    """``Reply(5)`` is a script error (``bytes(5)`` would send five NULs), logged."""
    h = scripted(lambda a, c: Reply(5))
    assert h.send(b"AUTH X-TEST\r\n") == TEMPFAIL
    assert any("the challenge must be bytes or str" in str(e.get("log_format", "")) for e in logged)


@pytest.mark.parametrize("username", [5, "a\r\nb", "tab\tbed", b"nul\x00", "c1\x85"])
def test_an_unusable_username_in_accept_defers(username: Any, logged: list[dict]) -> None:
    """A login name that is not a string, or carries control characters (it goes into
    log lines and headers as it is), is refused with 454 and a logged reason."""
    h = scripted(lambda a, c: Accept(username=username))
    assert h.send(b"AUTH X-TEST\r\n") == TEMPFAIL
    assert h.realm.logins == []  # refused before the portal
    assert h.protocol.auth_user is None
    assert any("must be a string" in str(e.get("log_format", ""))
               or "refusing the identity" in str(e.get("log_format", "")) for e in logged)


def test_plain_username_with_crlf_accepted_by_a_script_is_refused() -> None:
    """PLAIN's username comes from the client: a script's ``Accept()`` of it does not
    log in a name with CR LF (a forged log line)."""
    h = scripted(lambda a, c: Accept())
    forged = "x\r\n2026-01-01T00:00:00+0000 [saslsmtp.auth#info] auth failed: user=\"root\""
    assert h.send(b"AUTH PLAIN " + b64("\0" + forged + "\0pw") + b"\r\n") == TEMPFAIL
    assert h.protocol.auth_user is None


def test_timeout_with_injected_clock(logged: list[dict]) -> None:
    """A script still running after script_timeout is cancelled and defers."""
    never: defer.Deferred = defer.Deferred()
    h = scripted(lambda a, c: never, script_timeout=5.0)
    assert h.send(b"AUTH X-TEST\r\n") == b""
    h.clock.advance(4.9)
    assert h.take() == b""
    h.clock.advance(0.2)
    assert h.take() == TEMPFAIL
    assert never.called  # cancelled
    assert any("timed out" in str(e.get("log_format", "")) for e in logged)
    assert h.send(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"


class Ticking:
    """A ``monotonic`` the script moves: ``hold(s)`` is a script blocking for s seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def hold(self, seconds: float) -> None:
        self.now += seconds


def run_once(auth: Any, monotonic: Ticking, timeout: float = 10.0) -> tuple[Any, defer.Deferred]:
    """(result, the Deferred the script awaits) of one call of ``auth``."""
    from twisted.internet.task import Clock
    from saslsmtp.script import AuthScript, Backends, ScriptRunner
    from saslsmtp.sasl.outcome import Session
    runner = ScriptRunner(AuthScript("<test>", auth, None), Clock(), timeout, Backends({}),
                          monotonic=monotonic)
    gate: defer.Deferred = defer.Deferred()
    results: list = []
    runner.run(runner.arguments(Session(), "X-TEST", gate=gate), {}).addBoth(results.append)
    return results, gate


def test_a_script_blocking_past_script_timeout_defers(logged: list[dict]) -> None:
    """A plain function that holds the reactor for longer than script_timeout (a
    time.sleep, a blocking socket) answered its verdict anyway, since no timer can fire
    meanwhile: now that verdict is a 454 with one error line saying why."""
    ticking = Ticking()

    def auth(arguments, context):
        ticking.hold(12.0)
        return Accept(username="alice")

    results, _ = run_once(auth, ticking)
    assert results == [Defer()]
    [line] = errors(logged)
    assert line.startswith("AUTH script <test>: auth() held the server for 12.0 s, past"
                           " script_timeout (10 s) (X-TEST state 0); answered as a temporary failure")


def test_an_async_script_blocking_after_an_await_defers() -> None:
    """The stretches after each ``await`` count too: 6 + 6 s of blocking around an await
    is past a 10 s script_timeout."""
    ticking = Ticking()

    async def auth(arguments, context):
        ticking.hold(6.0)
        await arguments["gate"]
        ticking.hold(6.0)
        return Accept(username="alice")

    results, gate = run_once(auth, ticking)
    assert results == []
    gate.callback(None)
    assert results == [Defer()]


def test_a_stretch_that_holds_the_server_is_a_warning(logged: list[dict]) -> None:
    """Under script_timeout, a stretch of BLOCKING_WARNING seconds or more keeps its
    verdict and logs a warning; waiting on a Deferred is not holding the server."""
    from saslsmtp.script import BLOCKING_WARNING
    ticking = Ticking()

    async def auth(arguments, context):
        ticking.hold(0.1)
        await arguments["gate"]
        ticking.hold(BLOCKING_WARNING + 0.2)
        return Accept(username="alice")

    results, gate = run_once(auth, ticking)
    gate.callback(None)
    assert results == [Accept(username="alice")]
    assert errors(logged, LogLevel.warn) == [
        f"AUTH script <test>: auth() held the server for {BLOCKING_WARNING + 0.2:.2f} s without"
        " awaiting (X-TEST state 0); every connection waited: await Deferreds instead of"
        " blocking calls"]
    quiet, gate = run_once(auth, Ticking())
    gate.callback(None)
    assert quiet == [Accept(username="alice")] and len(errors(logged, LogLevel.warn)) == 1


def test_a_real_sleep_in_the_harness_defers_as_in_the_daemon() -> None:
    """SMTPHarness measures the same way (real time, not its Clock)."""
    import time

    def auth(arguments, context):
        time.sleep(0.06)
        return Accept(username="alice")

    h = scripted(auth, script_timeout=0.05)
    assert h.send(b"AUTH X-TEST\r\n") == TEMPFAIL
    assert h.send(b"NOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_cancelling_an_async_script_still_cancels_what_it_awaits() -> None:
    """The stretch timing passes cancellation through: script_timeout cancels the
    Deferred the script awaits, and the script may catch it."""
    seen: list[str] = []
    gate: defer.Deferred = defer.Deferred(lambda d: seen.append("cancelled"))

    async def auth(arguments, context):
        try:
            await gate
        except defer.CancelledError:
            seen.append("caught")
            raise
        return Accept(username="alice")

    h = scripted(auth, script_timeout=5.0)
    assert h.send(b"AUTH X-TEST\r\n") == b""
    h.clock.advance(5.1)
    assert h.take() == TEMPFAIL
    assert seen == ["cancelled", "caught"]


def test_sender_errors_name_mail_from_not_an_empty_mechanism(logged: list[dict]) -> None:
    """sender() that raises or answers Reply(): 451 4.7.1, and the log line says MAIL
    FROM (it said "( state 0)", the mechanism being empty there)."""
    from twisted.internet.task import Clock
    from saslsmtp.script import AuthScript, Backends, ScriptRunner
    from saslsmtp.sendercheck import SenderCheck
    from saslsmtp.senders import SenderPolicy

    def sender(arguments, context):
        if arguments["sender"].startswith("raise"):
            raise LookupError("no such list")
        return Reply(b"?")

    runner = ScriptRunner(AuthScript("<test>", lambda a, c: Reject(), None, sender=sender),
                          Clock(), 5.0, Backends({}))
    h = SMTPHarness(users={"alice": "pw"}, sender_check=SenderCheck(SenderPolicy("any"), runner))
    assert h.login("alice", "pw").startswith(b"235 ")
    temporary = b"451 4.7.1 Sender address check failed temporarily, try again later\r\n"
    assert h.send(b"MAIL FROM:<raise@example.test>\r\n") == temporary
    assert h.send(b"MAIL FROM:<reply@example.test>\r\n") == temporary
    assert [line.split(": ", 1)[1] for line in errors(logged)] == [
        "sender() raised LookupError: no such list (MAIL FROM); answered as a temporary failure",
        "sender() returned Reply() (MAIL FROM); expected Accept, Reject or Defer; answered as a"
        " temporary failure"]


def test_sender_is_told_the_mechanism_the_client_logged_in_with() -> None:
    """At MAIL FROM, ``arguments["mechanism"]`` is the login's mechanism, as the README
    documents (it was "" there)."""
    import base64
    from twisted.internet.task import Clock
    from saslsmtp.script import AuthScript, Backends, ScriptRunner
    from saslsmtp.sendercheck import SenderCheck
    from saslsmtp.senders import SenderPolicy
    seen: list[str] = []

    def sender(arguments, context):
        seen.append(arguments["mechanism"])
        return Accept()

    runner = ScriptRunner(AuthScript("<test>", lambda a, c: Reject(), None, sender=sender),
                          Clock(), 5.0, Backends({}))
    h = SMTPHarness(users={"alice": "pw"}, sender_check=SenderCheck(SenderPolicy("any"), runner))
    assert h.login("alice", "pw").startswith(b"235 ")
    assert h.send(b"MAIL FROM:<alice@example.test>\r\n").startswith(b"250 ")
    h = SMTPHarness(users={"alice": "pw"}, sender_check=SenderCheck(SenderPolicy("any"), runner))
    h.send(b"EHLO client.example\r\n")
    assert h.send(b"AUTH LOGIN\r\n").startswith(b"334 ")
    assert h.send(base64.b64encode(b"alice") + b"\r\n").startswith(b"334 ")
    assert h.send(base64.b64encode(b"pw") + b"\r\n").startswith(b"235 ")
    assert h.send(b"MAIL FROM:<alice@example.test>\r\n").startswith(b"250 ")
    assert seen == ["PLAIN", "LOGIN"]


# -- PLAIN and LOGIN named in MECHANISMS ----------------------------------------------


NAMES_PLAIN = """
from saslsmtp.script import Accept, Reject
MECHANISMS = {declared}

def auth(arguments, context):
    if arguments["mechanism"] in ("PLAIN", "LOGIN"):
        ok = (arguments["username"], arguments["password"]) == ("alice", "pw")
        return Accept() if ok else Reject()
    return Accept(username="token-user")
"""


@pytest.mark.parametrize("declared", ['["PLAIN", "LOGIN", "X-TOKEN"]',
                                      '{"PLAIN": {}, "LOGIN": {}, "X-TOKEN": {}}'])
def test_plain_and_login_named_in_mechanisms_still_give_username_and_password(
        tmp_path: Path, declared: str) -> None:
    """A script that lists PLAIN and LOGIN among the mechanisms it serves (as one coming
    from Halon would) gets their username and password as documented; they used to be
    handed over raw (no "username": KeyError, 454 for every login)."""
    script = tmp_path / "auth.py"
    script.write_text(NAMES_PLAIN.format(declared=declared))
    h = scripted(script, names=("PLAIN", "LOGIN", "X-TOKEN"))
    assert h.send(b"AUTH PLAIN " + b64("\0alice\0pw") + b"\r\n") == OK
    login = h.connect()
    login.send(EHLO)
    assert login.send(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert login.send(b64("alice") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert login.send(b64("pw") + b"\r\n") == OK
    wrong = h.connect()
    wrong.send(EHLO)
    assert wrong.send(b"AUTH PLAIN " + b64("\0alice\0no") + b"\r\n") == INVALID


def test_plain_named_in_mechanisms_keeps_what_is_declared_about_tls(tmp_path: Path) -> None:
    """Naming PLAIN changes only the TLS needs it declares."""
    script = tmp_path / "auth.py"
    script.write_text(NAMES_PLAIN.format(declared='{"PLAIN": {"needs_tls": True}}'))
    h = SMTPHarness(script=script, mechanism_names=["PLAIN"], require_tls=False)
    assert b"AUTH PLAIN" not in h.send(EHLO)
    assert h.send(b"AUTH PLAIN " + b64("\0alice\0pw") + b"\r\n").startswith(b"538 5.7.11")
    assert h.mechanisms["PLAIN"].password and h.mechanisms["PLAIN"].needs_tls


# -- backends from scripts ------------------------------------------------------------


@implementer(ICredentialsChecker)
class DownBackend:
    """A backend that is down: every check is a temporary failure."""

    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        return defer.fail(TemporaryFailure("connection refused"))


def test_script_verifies_against_backends() -> None:
    verdicts: list[Verdict] = []

    async def auth(arguments, context):
        verdict = await arguments["backends"].verify("users", arguments["username"],
                                                     arguments["password"])
        verdicts.append(verdict)
        return {Verdict.ACCEPT: Accept(), Verdict.REJECT: Reject(),
                Verdict.TEMPORARY: Defer()}[verdict]

    h = scripted(auth, users={"alice": "pw"})
    assert h.send(b"AUTH PLAIN " + b64("\0alice\0pw") + b"\r\n") == OK
    h2 = scripted(auth, users={"alice": "pw"})
    assert h2.send(b"AUTH PLAIN " + b64("\0alice\0nope") + b"\r\n") == INVALID
    assert verdicts == [Verdict.ACCEPT, Verdict.REJECT]


def test_script_backend_down_is_454() -> None:
    async def auth(arguments, context):
        verdict = await arguments["backends"].verify("ldap", arguments["username"],
                                                     arguments["password"])
        return Defer() if verdict is Verdict.TEMPORARY else Reject()

    h = scripted(auth, backends={"ldap": DownBackend()})
    assert h.send(b"AUTH PLAIN " + b64("\0alice\0pw") + b"\r\n") == TEMPFAIL


def test_a_backend_failure_quoting_the_password_is_logged_without_it(logged: list[dict]) -> None:
    """A checker of the embedder's whose ``TemporaryFailure`` quotes the password: the
    script's ``backends.verify`` logs the failure with it redacted, as the chain does."""
    @implementer(ICredentialsChecker)
    class Quoting:
        credentialInterfaces = (IUsernamePassword,)

        def requestAvatarId(self, credentials: Any) -> defer.Deferred:
            return defer.fail(TemporaryFailure(f"cannot check {credentials.password!r} now"))

    async def auth(arguments, context):
        verdict = await arguments["backends"].verify("quoting", arguments["username"],
                                                     arguments["password"])
        return Defer() if verdict is Verdict.TEMPORARY else Reject()

    h = scripted(auth, backends={"quoting": Quoting()})
    assert h.send(b"AUTH PLAIN " + b64("\0alice\0quoted-Pw-canary3") + b"\r\n") == TEMPFAIL
    text = "\n".join(event_text(e) for e in logged)
    assert "backend quoting failed temporarily: cannot check b'<redacted>' now" in text
    assert "quoted-Pw-canary3" not in text


def test_script_unknown_backend_name_defers() -> None:
    async def auth(arguments, context):
        await arguments["backends"].verify("nope", "a", "b")
        return Accept()

    assert scripted(auth).send(b"AUTH PLAIN " + b64("\0a\0b") + b"\r\n") == TEMPFAIL


# -- the shipped examples ------------------------------------------------------------


def cram_response(user: str, secret: str, challenge_line: bytes) -> bytes:
    challenge = base64.b64decode(challenge_line[4:].strip())
    digest = hmac.new(secret.encode(), challenge, hashlib.md5).hexdigest()
    return b64(f"{user} {digest}") + b"\r\n"


def test_example_cram_md5_script() -> None:
    """etc/auth_cram_md5.py: challenge <uuid@hostname>, right and wrong secrets."""
    h = scripted(ETC / "auth_cram_md5.py", names=("CRAM-MD5", "PLAIN", "LOGIN"),
                 hostname="mx.example.test")
    challenge = h.send(b"AUTH CRAM-MD5\r\n")
    assert challenge.startswith(b"334 ")
    text = base64.b64decode(challenge[4:].strip()).decode()
    assert text.startswith("<") and text.endswith("@mx.example.test>")
    assert h.send(cram_response("tim", "tanstaaftanstaaf", challenge)) == OK
    # CRAM-MD5 stays server-first when a script serves it: an initial response is 501
    fresh = scripted(ETC / "auth_cram_md5.py", names=("CRAM-MD5",))
    assert fresh.send(b"AUTH CRAM-MD5 " + b64("tim 0123") + b"\r\n") == (
        b"501 5.7.0 Initial response not allowed for this mechanism\r\n")
    h2 = scripted(ETC / "auth_cram_md5.py", names=("CRAM-MD5",), max_failures=5)
    challenge = h2.send(b"AUTH CRAM-MD5\r\n")
    assert h2.send(cram_response("tim", "wrong", challenge)) == INVALID
    challenge = h2.send(b"AUTH CRAM-MD5\r\n")
    assert h2.send(cram_response("nobody", "x", challenge)) == INVALID
    challenge = h2.send(b"AUTH CRAM-MD5\r\n")
    assert h2.send(b64("no-space-here") + b"\r\n") == b"535 5.7.8 Malformed CRAM-MD5 response\r\n"


def test_example_cram_md5_script_plain_uses_backends_in_order() -> None:
    h = scripted(ETC / "auth_cram_md5.py", names=("PLAIN", "LOGIN"), users={"alice": "pw"},
                 backends={"directory": DownBackend()})
    assert h.send(b"AUTH PLAIN " + b64("\0alice\0pw") + b"\r\n") == OK
    h2 = scripted(ETC / "auth_cram_md5.py", names=("PLAIN", "LOGIN"), users={"alice": "pw"},
                  backends={"directory": DownBackend()})
    assert h2.send(b"AUTH PLAIN " + b64("\0alice\0bad") + b"\r\n") == TEMPFAIL


def load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ETC / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_totp_three_rounds() -> None:
    """etc/auth_totp.py: Username, Password, Code, then 235; a wrong code -> 535."""
    totp = load_example("auth_totp")
    h = scripted(ETC / "auth_totp.py", names=("X-PASSWORD-TOTP",), users={"demo": "demo-password"})
    assert h.send(b"AUTH X-PASSWORD-TOTP\r\n") == b"334 " + b64("Username:") + b"\r\n"
    assert h.send(b64("demo") + b"\r\n") == b"334 " + b64("Password:") + b"\r\n"
    assert h.send(b64("demo-password") + b"\r\n") == b"334 " + b64("Code:") + b"\r\n"
    assert h.send(b64(totp.totp(totp.TOTP_SECRETS["demo"])) + b"\r\n") == OK
    h2 = scripted(ETC / "auth_totp.py", names=("X-PASSWORD-TOTP",), users={"demo": "demo-password"})
    h2.send(b"AUTH X-PASSWORD-TOTP " + b64("demo") + b"\r\n")
    h2.send(b64("wrong-password") + b"\r\n")
    assert h2.send(b64(totp.totp(totp.TOTP_SECRETS["demo"])) + b"\r\n") == INVALID


def test_totp_rfc6238_vector() -> None:
    """RFC 6238 appendix B, SHA-1, T=59: 94287082 (8 digits)."""
    totp = load_example("auth_totp")
    secret = base64.b32encode(b"12345678901234567890").decode()
    assert totp.totp(secret, at=59, digits=8) == "94287082"


# -- loading ---------------------------------------------------------------------------


def test_load_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def auth(arguments, context):\n    return (\n")
    with pytest.raises(ConfigError) as e:
        load_script(str(bad))
    assert f"{bad}:2" in str(e.value) or f"{bad}:3" in str(e.value)
    none = tmp_path / "none.py"
    none.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no callable auth"):
        load_script(str(none))
    undecodable = tmp_path / "latin.py"
    undecodable.write_bytes(b"NAME = '\xe9'\n")
    with pytest.raises(ConfigError, match=f"{undecodable}:1: auth.script: syntax error:.*utf-8"):
        load_script(str(undecodable))
    declared = tmp_path / "declared.py"  # PEP 263: a coding line is honoured
    declared.write_bytes(b"# -*- coding: latin-1 -*-\nNAME = '\xe9'\n"
                         b"def auth(arguments, context):\n    return None\n")
    assert load_script(str(declared)).auth.__globals__["NAME"] == "\u00e9"
    raising = tmp_path / "raising.py"
    raising.write_text("import os\n\nraise RuntimeError('at import')\n")
    with pytest.raises(ConfigError) as e:
        load_script(str(raising))
    assert f"{raising}:3" in str(e.value) and "RuntimeError" in str(e.value)
