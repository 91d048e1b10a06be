"""Building the controls from settings, as the service will."""

import pytest_twisted
from twisted.internet.task import Clock

from saslsmtp.checkers.chain import BackendChain
from saslsmtp.limits.authcache import CachingChecker
from saslsmtp.limits.build import build_controls
from saslsmtp.limits.settings import AuthCacheSettings, LimitsSettings, parse_limits
from saslsmtp.limits.store import MemoryStore
from tests.redis import start_redis


def test_defaults_memory_store_and_no_cache():
    """No tables: a limiter with everything off over memory, and no cache."""
    controls = build_controls(LimitsSettings(), AuthCacheSettings(), Clock())
    assert isinstance(controls.store, MemoryStore) and controls.cache is None
    chain = BackendChain([])
    assert controls.wrap_checker(chain, "x") is chain


def test_cache_on_wraps_the_chain():
    """ttl > 0: the chain is wrapped with the given chain id."""
    controls = build_controls(LimitsSettings(), AuthCacheSettings(ttl=60), Clock())
    wrapped = controls.wrap_checker(BackendChain([]), "users")
    assert isinstance(wrapped, CachingChecker) and wrapped.chain_id == "users"


@pytest_twisted.ensureDeferred
async def test_redis_url_builds_a_redis_store(tmp_path):
    """store = "redis://..." gives a RedisStore, closed by stop()."""
    from twisted.internet import reactor
    from saslsmtp.limits.redisstore import RedisStore
    server = start_redis(tmp_path / "r")
    try:
        settings = parse_limits({"store": server.url, "connections_per_ip": 1}, lambda k, m: None)
        controls = build_controls(settings, AuthCacheSettings(), reactor)
        assert isinstance(controls.store, RedisStore)
        await controls.stop()
        assert controls.store._factory.closing
    finally:
        server.stop()


def test_memory_store_with_several_workers_says_counters_are_per_worker(tmp_path):
    """Wiring a configuration with workers = 2, a limit and the memory store logs that
    each worker counts alone; with one worker it says nothing."""
    from twisted.internet import reactor
    from twisted.logger import formatEvent, globalLogPublisher

    from saslsmtp.service import load, wire
    from tests.support import write_config
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        for workers in (2, 1):
            folder = tmp_path / str(workers)
            folder.mkdir()
            (folder / "users").write_text("alice:{PLAIN}pw\n")
            config = write_config(folder, f'[backends.users]\ntype = "file"\npath = "{folder / "users"}"\n',
                                  extra='[limits]\nauth_failures_per_ip = "5/1m"\n')
            config.write_text(config.read_text().replace("[server]\n", f"[server]\nworkers = {workers}\n"))
            before = len(seen)
            wire(load(str(config)), reactor)
            said = [formatEvent(e) for e in seen[before:] if "per worker" in formatEvent(e)]
            assert len(said) == (1 if workers == 2 else 0), said
    finally:
        globalLogPublisher.removeObserver(seen.append)
