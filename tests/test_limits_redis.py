"""RedisStore against a real redis-server on loopback: exact shared counting, slots that
outlive nobody, fail open with throttled logging while Redis is down, and recovery."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher

from saslsmtp.limits.limiter import Limiter
from saslsmtp.limits.redisstore import RedisStore
from saslsmtp.limits.settings import Rate, parse_limits
from tests.redis import start_redis


@pytest.fixture
def redis(tmp_path):
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()


def reactor():
    from twisted.internet import reactor as r
    return r


async def sleep(seconds):
    await deferLater(reactor(), seconds, lambda: None)


async def until(predicate, what, timeout=10.0):
    """Let the reactor run until ``predicate()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await sleep(0.02)


async def connected(store, timeout=10.0):
    """Wait until the store has a live connection."""
    for _ in range(int(timeout / 0.02)):
        if store.connected:
            return
        await sleep(0.02)
    raise AssertionError("RedisStore did not connect")


async def make_store(url, **kwargs):
    kwargs.setdefault("reconnect_max_delay", 0.2)
    store = RedisStore(url, reactor(), **kwargs)
    await connected(store)
    return store


@pytest.fixture
def warnings():
    seen = []

    def observe(event):
        if "Redis store" in str(event.get("log_format", "")):
            seen.append(event)
    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_gcra_in_redis(redis):
    """Burst of count, then refused; peek counts nothing; keys expire by themselves."""
    store = await make_store(redis.url)
    try:
        rate = Rate(3, 60.0)
        assert (await store.peek("k", rate)).allowed
        got = [(await store.hit("k", rate)).allowed for _ in range(4)]
        assert got == [True, True, True, False]
        denied = await store.peek("k", rate)
        assert not denied.allowed and 19.0 < denied.retry_after <= 20.0 and denied.used == 3
        pttl = int(redis.command("PTTL", "saslsmtp:k").split(b"\r\n")[0][1:])
        assert 59000 < pttl <= 60001
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_two_clients_share_counts_exactly(redis):
    """Two stores (two workers) hammering one key concurrently: exactly `count` pass."""
    a = await make_store(redis.url)
    b = await make_store(redis.url)
    try:
        rate = Rate(60, 3600.0)
        results = await gatherResults([s.hit("shared", rate) for _ in range(50) for s in (a, b)])
        assert sum(r.allowed for r in results) == 60
        assert not (await a.peek("shared", rate)).allowed
        assert not (await b.peek("shared", rate)).allowed
    finally:
        await a.close()
        await b.close()


@pytest_twisted.ensureDeferred
async def test_slots_across_workers_and_release(redis):
    """Concurrency slots are shared; a release frees one; close gives back what is held."""
    a = await make_store(redis.url)
    b = await make_store(redis.url)
    try:
        assert await a.acquire("conn:1", 3, "a1")
        assert await a.acquire("conn:1", 3, "a2")
        assert await b.acquire("conn:1", 3, "b1")
        assert not await b.acquire("conn:1", 3, "b2")
        await a.release("conn:1", "a1")
        assert await b.acquire("conn:1", 3, "b2")
        await a.close()  # a2 goes back
        assert await b.acquire("conn:1", 3, "b3")
        assert not await b.acquire("conn:1", 3, "b4")
    finally:
        await b.close()


@pytest_twisted.ensureDeferred
async def test_heartbeat_keeps_slots_and_a_crashed_worker_leaks_nothing(redis):
    """Held slots survive past slot_ttl thanks to the heartbeat; a worker that dies without
    releasing loses its slots once their ttl passes, and the set key expires."""
    alive = await make_store(redis.url, slot_ttl=0.6)
    crashing = await make_store(redis.url, slot_ttl=0.6)
    other = await make_store(redis.url)
    try:
        assert await alive.acquire("conn:x", 2, "alive")
        assert await crashing.acquire("conn:x", 2, "crash")
        crashing._heartbeat.stop()  # the process dies: no heartbeat, no release
        crashing._factory.closing = True
        await crashing._factory.disconnect()
        assert not await other.acquire("conn:x", 2, "o1")
        await sleep(1.2)
        assert await other.acquire("conn:x", 2, "o1")  # crash's slot expired, alive's did not
        assert not await other.acquire("conn:x", 2, "o2")
        await alive.close()
        await other.release("conn:x", "o1")
        await until(lambda: redis.command("EXISTS", "saslsmtp:conn:x").startswith(b":0"),
                    "the emptied set to go")
    finally:
        await other.close()


@pytest_twisted.ensureDeferred
async def test_fail_open_log_throttle_and_recovery(redis, warnings):
    """Redis stops: every call allows at once, is counted, and one warning per log
    interval is written (not one per call).  Redis returns: limits apply again."""
    clock = Clock()
    errors = []
    store = await make_store(redis.url, clock=clock, timeout=0.5,
                             on_error=lambda: errors.append(1))
    try:
        rate = Rate(2, 3600.0)
        await store.hit("k", rate)
        await store.hit("k", rate)
        assert not (await store.hit("k", rate)).allowed
        redis.stop()
        for _ in range(20):
            if not store.connected:
                break
            await sleep(0.05)
        results = [await store.hit("k", rate) for _ in range(5)]
        assert all(r.allowed for r in results)
        assert await store.acquire("conn:y", 1, "h1") and await store.acquire("conn:y", 1, "h2")
        assert store.unavailable == 7 and len(errors) == 7
        assert len(warnings) == 1 and warnings[0]["log_level"].name == "warn"
        clock.advance(59)
        await store.hit("k", rate)
        assert len(warnings) == 1
        clock.advance(1)
        await store.hit("k", rate)
        assert len(warnings) == 2 and warnings[1]["count"] == 8  # 6 + 1 + this one
        redis.start()
        await connected(store)
        assert (await store.hit("fresh", rate)).allowed
        assert (await store.hit("fresh", rate)).allowed
        assert not (await store.hit("fresh", rate)).allowed  # limits resume
        assert any("answering again" in w["log_format"] for w in warnings)
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_unreachable_from_the_start_allows(tmp_path, warnings):
    """A store whose Redis never answered allows without waiting."""
    from tests.support import free_port
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", reactor(), reconnect_max_delay=0.2)
    try:
        assert (await store.hit("k", Rate(1, 60.0))).allowed
        assert (await store.peek("k", Rate(1, 60.0))).allowed
        assert store.unavailable == 2 and len(warnings) == 1
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_unix_socket_url(redis):
    """unix:///path works like TCP."""
    store = await make_store(f"unix://{redis.directory / 'redis.sock'}")
    try:
        assert [(await store.hit("u", Rate(1, 60.0))).allowed for _ in range(2)] == [True, False]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_limiter_over_redis_two_workers(redis):
    """Two Limiters (two workers) share per-IP concurrency and auth failure counts."""
    settings = parse_limits({"connections_per_ip": 2, "auth_failures_per_user": "2/1h"},
                            lambda k, m: None)
    stores = [await make_store(redis.url), await make_store(redis.url)]
    w1, w2 = (Limiter(settings, s, reactor()) for s in stores)
    try:
        a = await w1.connection_made("192.0.2.1")
        b = await w2.connection_made("192.0.2.1")
        c = await w1.connection_made("192.0.2.1")
        assert a.verdict.allowed and b.verdict.allowed
        assert c.verdict.line() == "421 4.7.0 Too many connections from 192.0.2.1"
        a.release()
        await until(lambda: _zcard(redis, "saslsmtp:conn:192.0.2.1") == 1, "the release")
        assert (await w2.connection_made("192.0.2.1")).verdict.allowed
        g = await w1.auth_gate("203.0.113.1", "alice")
        await w1.auth_verdict(g, False, "alice", b"x")
        g = await w2.auth_gate("203.0.113.2", "alice")
        await w2.auth_verdict(g, False, "alice", b"y")
        assert not (await w1.auth_gate("203.0.113.3", "alice")).verdict.allowed
        assert await w2.rate("ns", "e", 1, 60) and not await w1.rate("ns", "e", 1, 60)
    finally:
        for s in stores:
            await s.close()


@pytest_twisted.ensureDeferred
async def test_keeps_reconnecting_after_an_auth_error(redis):
    """A wrong password (Redis reconfigured under us) does not stop the retries: once the
    server accepts the password, the store connects and limits apply (Synapse does the
    same; plain txredisapi would give up)."""
    redis.command("CONFIG", "SET", "requirepass", "old-secret")
    refused = []

    def observe(event):
        if "could not auth" in formatEvent(event):
            refused.append(event)
    globalLogPublisher.addObserver(observe)
    store = RedisStore(f"redis://:new-secret@127.0.0.1:{redis.port}/0", reactor(),
                       reconnect_max_delay=0.2)
    try:
        await until(lambda: len(refused) >= 2, "a retry refused by Redis")
        assert not store.connected
        assert (await store.hit("k", Rate(1, 60.0))).allowed  # fail open meanwhile
        assert redis.command("CONFIG", "SET", "requirepass", "new-secret",
                             password="old-secret").startswith(b"+OK")
        await connected(store)
        assert [(await store.hit("k", Rate(1, 60.0))).allowed for _ in range(2)] == [True, False]
    finally:
        globalLogPublisher.removeObserver(observe)
        await store.close()


@pytest_twisted.ensureDeferred
async def test_database_number_is_used(redis):
    """redis://host:port/3 counts in database 3."""
    store = await make_store(f"redis://127.0.0.1:{redis.port}/3")
    try:
        await store.hit("dbkey", Rate(5, 60.0))
        assert redis.command("EXISTS", "saslsmtp:dbkey").startswith(b":0")
        assert b"keys=1" in redis.command("INFO", "keyspace").split(b"db3:")[1][:20]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_rediss_verifies_the_server(tmp_path):
    """rediss:// speaks TLS to Redis and verifies its certificate (against ca_file);
    a certificate for another name is refused (and the store fails open)."""
    from tests.redis import tls_redis
    from tests.tlsutil import make_ca
    proc, port, ca_file = tls_redis(tmp_path, ["localhost", "127.0.0.1"])
    try:
        store = RedisStore(f"rediss://localhost:{port}/0?ca_file={ca_file}", reactor(),
                           reconnect_max_delay=0.2)
        try:
            await connected(store)
            assert [(await store.hit("t", Rate(1, 60.0))).allowed for _ in range(2)] == \
                [True, False]
        finally:
            await store.close()
        (tmp_path / "other").mkdir()
        other_ca = make_ca(tmp_path / "other")
        store = RedisStore(f"rediss://localhost:{port}/0?ca_file={other_ca.cert_path}",
                           reactor(), reconnect_max_delay=0.2)
        try:
            # Redis logs the client's alert; the store was never connected (an attempt is
            # pooled only after its handshake: tests/test_tls_refusals.py watches each turn)
            await until(lambda: "tlsv1 alert unknown ca" in (tmp_path / "redis.log").read_text(),
                        "the certificate refused")
            assert not store.connected
            assert (await store.hit("t", Rate(1, 60.0))).allowed  # fail open, not verified
        finally:
            await store.close()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest_twisted.ensureDeferred
async def test_admit_and_peek_many_are_one_call_each(redis):
    """``admit`` counts the connection rate and takes a slot in one script; ``peek_many``
    answers several counters in one script, exactly as ``peek`` would; a batch of
    releases frees every slot."""
    a = await make_store(redis.url)
    b = await make_store(redis.url)
    try:
        rate = Rate(3, 60.0)
        got = [await a.admit("connrate:x", rate, "conn:x", 2, f"h{i}") for i in range(4)]
        assert got == [(True, True), (True, True), (True, False), (False, False)]
        assert await b.admit("connrate:y", None, "conn:x", 2, "other") == (True, False)
        await gatherResults([a.release("conn:x", "h0"), a.release("conn:x", "h1")])
        assert await b.admit("connrate:y", None, "conn:x", 2, "other") == (True, True)
        await a.hit("f:1", rate)
        for _ in range(3):
            await a.hit("f:2", rate)
        many = await b.peek_many([("f:1", rate), ("f:2", rate), ("f:3", rate)])
        singles = [await b.peek(k, rate) for k in ("f:1", "f:2", "f:3")]
        assert [(r.allowed, r.used) for r in many] == [(r.allowed, r.used) for r in singles]
        assert [r.allowed for r in many] == [True, False, True]
        problems = []
        settings = parse_limits({"auth_failures_per_ip": "2/1m", "auth_failures_per_user": "5/1m",
                                 "connections_per_ip": 1}, lambda k, m: problems.append(m))
        limiter = Limiter(settings, a, reactor())
        first = await limiter.connection_made("192.0.2.9")
        assert first.verdict.allowed
        assert not (await limiter.connection_made("192.0.2.9")).verdict.allowed
        for i in range(3):
            gate = await limiter.auth_gate("192.0.2.9", f"u{i}")
            if gate.verdict.allowed:
                await limiter.auth_verdict(gate, False, f"u{i}", b"pw")
        assert gate.verdict.line() == "454 4.7.0 Temporary authentication failure"
        first.release()
    finally:
        await a.close()
        await b.close()


def _failure_limiter(store, spec="3/1m"):
    settings = parse_limits({"auth_failures_per_user": spec}, lambda k, m: None)
    return Limiter(settings, store, reactor())


@pytest_twisted.ensureDeferred
async def test_concurrent_guesses_across_workers_stop_exactly_at_the_limit(redis):
    """Ten guesses for one user at once through two workers (two stores, two limiters):
    exactly the limit (3) are let through, because the gate's check and the attempt's
    seat among those in flight are one script; the other seven wait for room, and once
    the three failures fill the counter they are refused."""
    a, b = await make_store(redis.url), await make_store(redis.url)
    try:
        workers = [_failure_limiter(a), _failure_limiter(b)]
        gates = [workers[i % 2].auth_gate(f"192.0.2.{i}", "Carol") for i in range(10)]
        await until(lambda: sum(d.called for d in gates) == 3, "three let through")
        await sleep(0.2)
        assert sum(d.called for d in gates) == 3  # the others wait: no room, no refusal
        admitted = [(i, await d) for i, d in enumerate(gates) if d.called]
        assert all(g.verdict.allowed for _, g in admitted)
        for i, g in admitted:
            await workers[i % 2].auth_verdict(g, False, "carol", f"guess{i}".encode())
        refused = await gatherResults([d for d in gates if not d.called])
        assert {g.verdict.line() for g in refused} == {"454 4.7.0 Temporary authentication failure"}
        assert _zcard(redis, "saslsmtp:flight:user:u:carol") == 0
    finally:
        await a.close()
        await b.close()


@pytest_twisted.ensureDeferred
async def test_a_burst_of_right_passwords_is_never_refused(redis):
    """More logins of one user at once than its failure limit, all right: none is
    refused (nothing failed).  Those beyond the limit wait until a success gives its
    seat back; one after the other, each finds the seat of the one before free (it goes
    to Redis ahead of the next call, not with the next batch)."""
    a, b = await make_store(redis.url), await make_store(redis.url)
    try:
        workers = [_failure_limiter(a), _failure_limiter(b)]
        gates = [workers[i % 2].auth_gate(f"192.0.2.{i}", "dora") for i in range(8)]
        landed: set[int] = set()
        while len(landed) < len(gates):
            await until(lambda: any(d.called and i not in landed for i, d in enumerate(gates)),
                        "a login let through")
            for i, d in enumerate(gates):
                if d.called and i not in landed:
                    gate = await d
                    assert gate.verdict.allowed
                    await workers[i % 2].auth_verdict(gate, True, "dora", b"right")
                    landed.add(i)
        for i in range(10):  # one after the other, through one worker
            gate = await workers[0].auth_gate(f"198.51.100.{i}", "dora")
            assert gate.verdict.allowed, i
            await workers[0].auth_verdict(gate, True, "dora", b"right")
    finally:
        await a.close()
        await b.close()


@pytest_twisted.ensureDeferred
async def test_a_client_reconnecting_at_once_finds_its_slot_free(redis):
    """``connections_per_ip = 2``: one connection at a time, opened again as soon as the
    last one closed, is never refused (the slot goes back ahead of the next admission)."""
    from saslsmtp.limits.session import ConnectionLimits
    store = await make_store(redis.url)
    try:
        settings = parse_limits({"connections_per_ip": 2, "connection_rate_per_ip": "100/1m"},
                                lambda k, m: None)
        limiter = Limiter(settings, store, reactor())
        for i in range(6):
            session = ConnectionLimits(limiter)
            verdict = await _maybe(session.admit("192.0.2.8"))
            assert verdict.allowed, i
            session.release()
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_scripts_flushed_in_redis_are_sent_again(redis):
    """Redis forgets its scripts (restart, SCRIPT FLUSH): the next calls still answer
    (EVALSHA's NOSCRIPT is answered by sending the script once)."""
    store = await make_store(redis.url)
    try:
        rate = Rate(2, 60.0)
        assert (await store.hit("s", rate)).allowed
        redis.command("SCRIPT", "FLUSH")
        assert (await store.hit("s", rate)).allowed
        assert not (await store.hit("s", rate)).allowed
        assert store.unavailable == 0
    finally:
        await store.close()


@pytest.mark.alone
@pytest_twisted.ensureDeferred
async def test_a_stalled_redis_fails_open_within_the_timeout(redis):
    """Redis stops answering (SIGSTOP) with the connection open: a call waits at most
    about ``timeout``, then allows; the store reconnects once Redis answers again."""
    import os
    import signal
    import time
    store = await make_store(redis.url, timeout=0.5)
    try:
        rate = Rate(1, 60.0)
        assert (await store.hit("stall", rate)).allowed
        os.kill(redis.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = await gatherResults([store.hit("stall", rate) for _ in range(3)])
            waited = time.monotonic() - started
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
        assert [r.allowed for r in results] == [True] * 3
        assert 0.4 < waited < 2.0, waited
        assert store.unavailable == 3
        await connected(store)
        assert not (await store.hit("stall", rate)).allowed  # counting again
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_keys_beyond_ascii_are_sent_as_utf8(redis):
    """A counter named with non-ASCII text (a username like "böb") is counted under its
    UTF-8 name, exactly."""
    store = await make_store(redis.url)
    try:
        rate = Rate(2, 60.0)
        got = [(await store.hit("authfail:user:u:böb", rate)).allowed for _ in range(3)]
        assert got == [True, True, False]
        assert redis.command("EXISTS", "saslsmtp:authfail:user:u:böb").startswith(b":1")
    finally:
        await store.close()


def _zcard(redis, key):
    return int(redis.command("ZCARD", key).split(b"\r\n")[0][1:])


@pytest_twisted.ensureDeferred
async def test_slots_released_without_waiting_are_released_exactly(redis):
    """The session's calls: a seat taken through ``ConnectionLimits`` is given back with
    the next batch of releases (no answer waited for), exactly once; a connection that
    goes away while Redis has not answered yet gives back the seat that still comes;
    and the AUTH gate's seat in flight leaves with a success."""
    from twisted.internet.defer import Deferred

    from saslsmtp.limits.session import ConnectionLimits
    store = await make_store(redis.url)
    try:
        settings = parse_limits({"connections_per_ip": 2, "connection_rate_per_ip": "100/1m",
                                 "auth_failures_per_user": "5/1m"}, lambda k, m: None)
        limiter = Limiter(settings, store, reactor())
        sessions = [ConnectionLimits(limiter) for _ in range(3)]
        answers = [s.admit("192.0.2.7") for s in sessions]
        assert all(isinstance(a, Deferred) for a in answers)
        verdicts = [await a for a in answers]
        assert [v.allowed for v in verdicts] == [True, True, False]
        assert _zcard(redis, "saslsmtp:conn:192.0.2.7") == 2
        attempt = sessions[0].attempt("192.0.2.7", "PLAIN")
        assert await attempt.admit("dave", "pw") is None
        assert _zcard(redis, "saslsmtp:flight:user:u:dave") == 1
        assert attempt.judged(True, "dave") is None  # nothing to wait for
        for s in sessions:
            s.release()
            s.release()
        gone = ConnectionLimits(limiter)
        pending = gone.admit("192.0.2.7")
        gone.release()  # before Redis answered
        assert pending.called
        await until(lambda: _zcard(redis, "saslsmtp:conn:192.0.2.7") == 0
                    and _zcard(redis, "saslsmtp:flight:user:u:dave") == 0, "every seat back")
        assert store._held == {}
        assert store.unavailable == 0
    finally:
        await store.close()


def _script_calls(redis):
    """How many EVALSHA and EVAL commands Redis has run."""
    stats = redis.command("INFO", "commandstats").decode()
    return sum(int(line.split("calls=")[1].split(",")[0]) for line in stats.splitlines()
               if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")))


@pytest_twisted.ensureDeferred
async def test_seats_given_back_go_inside_the_next_call(redis):
    """A connection's slot and a successful attempt's seat, given back without waiting,
    travel inside the next admission's or AUTH gate's script: one command, and they
    count as free in it (``connections_per_ip = 1`` admits the next connection)."""
    from saslsmtp.limits.session import ConnectionLimits
    store = await make_store(redis.url)
    try:
        settings = parse_limits({"connections_per_ip": 1, "auth_failures_per_user": "5/1m"},
                                lambda k, m: None)
        limiter = Limiter(settings, store, reactor())
        first = ConnectionLimits(limiter)
        assert (await _maybe(first.admit("192.0.2.6"))).allowed
        attempt = first.attempt("192.0.2.6", "PLAIN")
        assert await _maybe(attempt.admit("frank", "pw")) is None
        assert attempt.judged(True, "frank") is None
        first.release()
        before = _script_calls(redis)
        second = ConnectionLimits(limiter)
        assert (await _maybe(second.admit("192.0.2.6"))).allowed
        assert _script_calls(redis) - before == 1
        assert _zcard(redis, "saslsmtp:conn:192.0.2.6") == 1
        assert _zcard(redis, "saslsmtp:flight:user:u:frank") == 0
        again = second.attempt("192.0.2.6", "PLAIN")
        assert await _maybe(again.admit("frank", "pw")) is None
        assert again.judged(True, "frank") is None
        before = _script_calls(redis)
        third = second.attempt("192.0.2.6", "PLAIN")
        assert await _maybe(third.admit("frank", "pw")) is None
        assert _script_calls(redis) - before == 1
        assert _zcard(redis, "saslsmtp:flight:user:u:frank") == 1  # the third's seat only
        third.judged(True, "frank")
        second.release()
        await until(lambda: _zcard(redis, "saslsmtp:conn:192.0.2.6") == 0
                    and _zcard(redis, "saslsmtp:flight:user:u:frank") == 0, "the last batch")
        assert store.unavailable == 0
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_session_calls_resend_flushed_scripts_and_fail_open(redis):
    """The session's calls without Deferreds answer EVALSHA's NOSCRIPT by sending the
    script once, and allow (counted as unavailable) when Redis is gone."""
    from saslsmtp.limits.session import ConnectionLimits
    store = await make_store(redis.url)
    try:
        settings = parse_limits({"connections_per_ip": 1, "auth_failures_per_ip": "5/1m"},
                                lambda k, m: None)
        limiter = Limiter(settings, store, reactor())
        redis.command("SCRIPT", "FLUSH")
        first = ConnectionLimits(limiter)
        assert (await first.admit("192.0.2.8")).allowed
        assert not (await ConnectionLimits(limiter).admit("192.0.2.8")).allowed
        redis.command("SCRIPT", "FLUSH")
        assert await first.attempt("192.0.2.8", "PLAIN").admit("erin", "pw") is None
        assert store.unavailable == 0
        redis.stop()
        for _ in range(40):
            if not store.connected:
                break
            await sleep(0.05)
        assert (await _maybe(ConnectionLimits(limiter).admit("192.0.2.8"))).allowed
        assert await _maybe(first.attempt("192.0.2.8", "PLAIN").admit("erin", "pw")) is None
        assert store.unavailable == 2
        first.release()
    finally:
        await store.close()


async def _maybe(value):
    from twisted.internet.defer import Deferred
    return (await value) if isinstance(value, Deferred) else value


# ---- the store's password never reaches --check, a reload or the log ----------------------

STORE_SECRET = "Redis-Store-Secret-5"


@pytest.mark.parametrize("store, reason", [
    (f"redis://:{STORE_SECRET}@127.0.0.1:notaport/0",
     "'redis://:***@127.0.0.1:notaport/0': the port is not a number from 1 to 65535"),
    (f"redis://app:{STORE_SECRET}@127.0.0.1:6379/x",
     "'redis://app:***@127.0.0.1:6379/x': the path must be a database number (/0)"),
    (f"redis://:{STORE_SECRET}@/0", "'redis://:***@/0': no host"),
    (f"redis://:{STORE_SECRET}@127.0.0.1/0?ca_file=ca.pem",
     "'redis://:***@127.0.0.1/0?ca_file=***': the only query parameter is ca_file, for rediss://"),
])
def test_check_masks_the_store_password(tmp_path, store, reason):
    """``twistd saslsmtp --check`` (the start and a reload print the same words) names what
    is wrong with a store URL and shows the URL with its password masked: the password
    of the store is not printed."""
    import os
    import subprocess
    from tests.support import ROOT, alice_config, twistd_command
    config, _ = alice_config(tmp_path)
    config.write_text(config.read_text() + f'\n[limits]\nstore = "{store}"\n')
    out = subprocess.run(twistd_command(config, "--check"), capture_output=True, text=True,
                         timeout=30, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 1
    assert f"limits.store: {reason}" in out.stderr
    assert STORE_SECRET not in out.stdout + out.stderr


@pytest_twisted.ensureDeferred
async def test_a_refused_password_is_not_logged(redis):
    """Redis refusing the store's password (WRONGPASS) is logged, the password is not."""
    from tests.conftest import event_text
    redis.command("CONFIG", "SET", "requirepass", "the-right-one")
    events = []
    globalLogPublisher.addObserver(events.append)
    store = RedisStore(f"redis://:{STORE_SECRET}@127.0.0.1:{redis.port}/0", reactor(),
                       reconnect_max_delay=0.2)
    try:
        await until(lambda: any("could not auth" in formatEvent(e) for e in events),
                    "Redis refusing the password")
        assert (await store.hit("k", Rate(1, 60.0))).allowed  # fail open, warned
    finally:
        globalLogPublisher.removeObserver(events.append)
        await store.close()
    texts = [event_text(e) for e in events]
    assert any("Redis store redis://127.0.0.1:" in t for t in texts)
    assert not [t for t in texts if STORE_SECRET in t]


@pytest_twisted.ensureDeferred
async def test_the_redis_client_library_does_not_flood_our_log_during_an_outage(redis):
    """Redis held (SIGSTOP) then stopped: txredisapi says ``Discarding dead connection.``
    (an info line through ``twisted.python.log``) at each lost connection it meets, over
    and over beside our own once-a-minute warning.  What the daemon writes (its text and
    JSON observers, ``log_level = "info"``) keeps our warning and drops that line (the
    reconnect attempts' ``Scheduling retry`` lines stay: tests/test_limits_traffic.py)."""
    import io
    import json
    import os
    import signal

    from saslsmtp.logs import make_observer
    raw, text, lines = [], io.StringIO(), io.StringIO()
    observers = [raw.append, make_observer(text, "text", "info"), make_observer(lines, "json", "info")]
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    # a beat every 0.1 s: the heartbeat's PING goes through txredisapi's own pool lookup
    store = await make_store(redis.url, timeout=0.3, slot_ttl=0.3)
    held = True
    os.kill(redis.process.pid, signal.SIGSTOP)
    try:
        rate = Rate(1000, 60.0)

        def library(words):
            return [e for e in raw if words in formatEvent(e)]
        deadline = time.monotonic() + 15
        while not library("Discarding dead connection"):
            assert time.monotonic() < deadline, "txredisapi never met a dead connection"
            await store.hit("k", rate)
            await sleep(0.1)
        os.kill(redis.process.pid, signal.SIGCONT)
        held = False
        redis.stop()
        for _ in range(10):
            await store.hit("k", rate)
            await sleep(0.1)
    finally:
        if held:
            os.kill(redis.process.pid, signal.SIGCONT)
        await store.close()
        for observer in observers:
            globalLogPublisher.removeObserver(observer)
    written = text.getvalue()
    messages = [json.loads(line)["message"] for line in lines.getvalue().splitlines()]
    for out in (written, "\n".join(messages)):
        assert "limits: Redis store redis://127.0.0.1:" in out and " unavailable (" in out, out
        assert "Discarding dead connection" not in out, out
