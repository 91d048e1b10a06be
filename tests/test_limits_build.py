"""Building the controls from settings, as the service will."""

import itertools

import pytest_twisted
from twisted.internet.task import Clock

from saslsmtp.checkers.chain import BackendChain
from saslsmtp.limits.authcache import CachingChecker
from saslsmtp.limits.build import LateStore, build_controls
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


def _limits(**table):
    return parse_limits(table, lambda k, m: None)


_GUESSES = itertools.count()


def _failures(controls, address, n):
    """``n`` failed AUTHs (distinct passwords) from ``address`` through ``controls``."""
    for _ in range(n):
        gate = controls.limiter.auth_gate(address, "alice").result
        controls.limiter.auth_verdict(gate, False, "alice", b"guess%d" % next(_GUESSES))


def _allowed(controls, address):
    """Would an AUTH from ``address`` be checked now?  (The attempt is then abandoned.)"""
    gate = controls.limiter.auth_gate(address, "alice").result
    controls.limiter.abandoned(gate)
    return gate.verdict.allowed


def test_carry_over_keeps_stretches_or_drops_the_counters():
    """A reload's controls take the old memory store: an unchanged limit goes on, a
    changed rate keeps the events counted (3 of "3/1m" are 3 of "6/1m"), a limit turned
    off loses its counters (turned on again, it starts empty); the penalties carry too."""
    clock = Clock()
    old = build_controls(_limits(auth_failures_per_ip="3/1m", auth_penalty_max=8),
                         AuthCacheSettings(), clock)
    _failures(old, "192.0.2.1", 3)
    assert not _allowed(old, "192.0.2.1")
    same = build_controls(_limits(auth_failures_per_ip="3/1m", auth_penalty_max=8),
                          AuthCacheSettings(), clock)
    same.carry_over(old)
    assert same.store is old.store and not _allowed(same, "192.0.2.1")
    assert same.limiter.penalty("192.0.2.1") > 0
    wider = build_controls(_limits(auth_failures_per_ip="6/1m"), AuthCacheSettings(), clock)
    wider.carry_over(same)
    for _ in range(3):
        assert _allowed(wider, "192.0.2.1")
        _failures(wider, "192.0.2.1", 1)
    assert not _allowed(wider, "192.0.2.1")
    off = build_controls(_limits(), AuthCacheSettings(), clock)
    off.carry_over(wider)
    again = build_controls(_limits(auth_failures_per_ip="6/1m"), AuthCacheSettings(), clock)
    again.carry_over(off)
    assert _allowed(again, "192.0.2.1")


class SessionCalls:
    """Records the calls a session makes of a shared store."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def admit_then(self, rate_key, rate, slot_key, limit, holder, then):
        self.calls.append("admit")
        then(1)

    def reserve_then(self, flights, rates, token, ttl, then):
        self.calls.append("reserve")
        then(-1)

    def release_soon(self, key, holder):
        self.calls.append("release")

    def unreserve(self, flights, token):
        self.calls.append("unreserve")


def test_a_late_store_calls_its_store_directly_and_allows_before_start_and_after_stop():
    """Once built, a session's calls go straight to the store's own methods (no hop for
    every session); before ``start`` and after ``stop`` every call allows (fail open)."""
    inner = SessionCalls()
    late = LateStore(lambda: inner)  # type: ignore[arg-type,return-value]
    codes: list[int] = []
    late.admit_then("r", None, "s", 1, "h", codes.append)
    late.reserve_then(("ip:x",), (), "t", 1.0, codes.append)
    assert codes == [2, 0] and inner.calls == []
    late.start()
    assert late.admit_then == inner.admit_then  # bound to the store itself
    late.admit_then("r", None, "s", 1, "h", codes.append)
    late.reserve_then(("ip:x",), (), "t", 1.0, codes.append)
    late.release_soon("s", "h")
    late.unreserve(["flight:ip:x"], "t")
    assert codes == [2, 0, 1, -1]
    assert inner.calls == ["admit", "reserve", "release", "unreserve"]
    late.stop()
    late.admit_then("r", None, "s", 1, "h", codes.append)
    late.reserve_then(("ip:x",), (), "t", 1.0, codes.append)
    late.release_soon("s", "h")
    late.unreserve(["flight:ip:x"], "t")
    assert codes == [2, 0, 1, -1, 2, 0] and len(inner.calls) == 4
