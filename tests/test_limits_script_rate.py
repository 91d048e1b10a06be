"""``arguments["rate"]`` in the AUTH script: Halon's rate() on the limits' store."""

import pytest_twisted
from twisted.internet.task import Clock

from saslsmtp.limits.limiter import Limiter
from saslsmtp.limits.settings import LimitsSettings
from saslsmtp.limits.store import MemoryStore
from saslsmtp.sasl.outcome import Session
from saslsmtp.script import Accept, Backends, Defer, ScriptRunner, load_script

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


def test_no_rate_without_a_limiter(tmp_path):
    """A runner built without a limiter (library use) simply has no ``rate``."""
    path = tmp_path / "auth.py"
    path.write_text(SCRIPT)
    runner = ScriptRunner(load_script(str(path)), Clock(), 10.0, Backends({}))
    assert "rate" not in runner.arguments(Session(), "PLAIN")
