"""``arguments["rate"]`` in the AUTH script: Halon's rate() on the limits' store."""

import base64

import pytest_twisted
from twisted.internet.task import Clock

from saslsmtp.limits.limiter import Limiter
from saslsmtp.limits.settings import LimitsSettings
from saslsmtp.limits.store import MemoryStore
from saslsmtp.sasl.outcome import Session
from saslsmtp.script import Accept, Backends, Defer, ScriptRunner, load_script
from saslsmtp.testing import SMTPHarness

SCRIPT = '''
from saslsmtp.script import Accept, Defer

async def auth(arguments, context):
    if not await arguments["rate"]("logins", arguments["remote_ip"], 2, 60):
        return Defer("slow down")
    return Accept(username=arguments["username"])
'''


@pytest_twisted.ensureDeferred
async def test_script_rate_limits_per_entry(tmp_path):
    """The third login from one address within 60 s is deferred by the script itself;
    another address is unaffected; the window rolls."""
    path = tmp_path / "auth.py"
    path.write_text(SCRIPT)
    clock = Clock()
    limiter = Limiter(LimitsSettings(), MemoryStore(clock), clock)
    runner = ScriptRunner(load_script(str(path)), clock, 10.0, Backends({}), rate=limiter.rate)

    async def login(ip):
        args = runner.arguments(Session(remote_ip=ip), "PLAIN", username="alice",
                                password="x")
        return await runner.run(args, {})

    got = [await login("192.0.2.1") for _ in range(3)]
    assert [type(r) for r in got] == [Accept, Accept, Defer]
    assert isinstance(await login("192.0.2.2"), Accept)
    clock.advance(30)
    assert isinstance(await login("192.0.2.1"), Accept)


@pytest_twisted.ensureDeferred
async def test_rate_without_a_limiter_counts_in_memory_on_the_runners_clock(tmp_path):
    """A runner built without a limiter (library use, ``SMTPHarness``) still has the
    documented ``rate``: a memory store on its clock (it was missing: KeyError, 454)."""
    path = tmp_path / "auth.py"
    path.write_text(SCRIPT)
    clock = Clock()
    runner = ScriptRunner(load_script(str(path)), clock, 10.0, Backends({}))

    async def login():
        return await runner.run(runner.arguments(Session(remote_ip="192.0.2.1"), "PLAIN",
                                                 username="alice", password="x"), {})

    assert [type(await login()) for _ in range(3)] == [Accept, Accept, Defer]
    clock.advance(30)
    assert isinstance(await login(), Accept)


def test_a_script_using_rate_gives_the_daemons_verdicts_in_the_harness(tmp_path):
    """README "Testing a script": SMTPHarness runs a script that calls rate() as the
    daemon does; ``h.clock`` rolls the window."""
    path = tmp_path / "auth.py"
    path.write_text(SCRIPT)
    h = SMTPHarness(script=path, mechanism_names=["PLAIN"])
    plain = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0x") + b"\r\n"
    replies = []
    for _ in range(3):
        connection = h.connect()
        connection.send(b"EHLO client.example\r\n")
        replies.append(connection.send(plain))
    assert replies == [b"235 2.7.0 Authentication successful\r\n"] * 2 + [
        b"454 4.7.0 slow down\r\n"]
    h.clock.advance(30)
    h.send(b"EHLO client.example\r\n")
    assert h.send(plain) == b"235 2.7.0 Authentication successful\r\n"
