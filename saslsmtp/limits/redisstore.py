"""``RedisStore``: the limit counters in Redis, shared by every worker and every host.

Built on txredisapi (Deferred-native, no reactor change, no thread hop; Synapse runs it).
Each operation is one atomic ``EVALSHA`` of a small Lua script that reads the Redis
server's own clock (``TIME``), so no two clients' clocks ever disagree and there is no
read-then-write race:

* rates: GCRA, one self-expiring key per counter (``PX`` = until the window is empty);
* connection slots: a sorted set per client, member = this worker's connection id,
  score = the heartbeat expiry.  Every ``slot_ttl / 3`` seconds the worker re-stamps the
  slots it holds (one script call); a crashed worker's slots expire on their own and the
  set itself expires when nobody refreshes it.  Nothing leaks.

Redis unreachable (down, timeout, not connected yet): every call allows at once (fail
open, as Postfix and Dovecot do), ``unavailable`` counts such calls (``on_error`` is told
too, for metrics), and a warning is logged at most once per ``log_interval`` with the
number of calls since the last one.  The connection is retried forever with backoff, as
Synapse does (txredisapi would stop after an AUTH error), and limits resume by
themselves when Redis is back.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable, Sequence

import txredisapi  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.checkers.tlsclient import StrictClientTLS, load_trust_root
from saslsmtp.events import NO_METRICS
from saslsmtp.limits.redisurl import RedisURL, parse_redis_url
from saslsmtp.limits.settings import Rate
from saslsmtp.limits.store import ALLOW, RateResult
from saslsmtp.repeats import RepeatedWarning

log = Logger()

GCRA_SCRIPT = """
-- KEYS[1]: the counter; ARGV: period_ms, count, cost, store (1 = count it, 0 = peek)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local period = tonumber(ARGV[1])
local iv = period / tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local used = math.ceil((tat - now) / iv - 1e-9)
local new = tat + iv * cost
local allow_at = new - period
if now < allow_at then
  return {0, math.ceil(allow_at - now), used}
end
if ARGV[4] == '1' and cost > 0 then
  redis.call('SET', KEYS[1], string.format('%.3f', new), 'PX', math.ceil(new - now) + 1)
end
return {1, 0, used + cost}
"""

ACQUIRE_SCRIPT = """
-- KEYS[1]: the slot set; ARGV: limit, holder, ttl_ms
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

HEARTBEAT_SCRIPT = """
-- KEYS: slot sets; ARGV[1]: ttl_ms, ARGV[2..]: the holder in each set
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
"""


PEEK_MANY_SCRIPT = """
-- KEYS: counters; ARGV: period_ms, count for each key in turn.  Counts nothing.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
  local period = tonumber(ARGV[2 * i - 1])
  local iv = period / tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local used = math.ceil((tat - now) / iv - 1e-9)
  local allow_at = tat + iv - period
  if now < allow_at then
    out[i] = {0, math.ceil(allow_at - now), used}
  else
    out[i] = {1, 0, used + 1}
  end
end
return out
"""

ADMIT_SCRIPT = """
-- A new connection: KEYS[1] the rate counter, KEYS[2] the slot set; ARGV: holder, then
-- period_ms and count (0: no rate limit), slot limit (0: none), slot ttl_ms.
-- Returns 2 (admitted), 1 (no free slot) or 0 (over the rate): one integer, cheap to parse.
-- First, the releases queued since the last call: KEYS[3..] with their holders ARGV[6..].
for i = 3, #KEYS do redis.call('ZREM', KEYS[i], ARGV[i + 3]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local count = tonumber(ARGV[3])
if count > 0 then
  local period = tonumber(ARGV[2])
  local iv = period / count
  local tat = tonumber(redis.call('GET', KEYS[1]) or now)
  if tat < now then tat = now end
  local new = tat + iv
  if now < new - period then return 0 end
  redis.call('SET', KEYS[1], string.format('%.3f', new), 'PX', math.ceil(new - now) + 1)
end
local limit = tonumber(ARGV[4])
if limit > 0 then
  local ttl = tonumber(ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
    if redis.call('ZCARD', KEYS[2]) >= limit then return 1 end
  end
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 2
"""

RELEASE_SCRIPT = """
-- KEYS: slot sets; ARGV: the holder to remove from each
for i, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[i]) end
return #KEYS
"""

GATE_SCRIPT = """
-- The AUTH gate, with a seat among the attempts in flight.  KEYS[1..n]: failure
-- counters, KEYS[n+1..2n]: their in-flight sets; ARGV: token, n, in-flight ttl_ms, then
-- period_ms and count of each counter.  Returns i, the first counter whose failures
-- alone reach its count (refused, nothing taken), -i when its failures plus attempts in
-- flight do (nothing taken: the caller may look again once some landed), or 0:
-- admitted, and the token is in every in-flight set until LAND_SCRIPT or a release
-- takes it out.  First, the releases queued since the last call: KEYS[2n+1..], with
-- their holders after the counters' arguments (ARGV[2n+4..]).
local n = tonumber(ARGV[2])
for i = 2 * n + 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[i + 3]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
local used = {}
for i = 1, n do
  local period = tonumber(ARGV[2 + 2 * i])
  local count = tonumber(ARGV[3 + 2 * i])
  local iv = period / count
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  if now < tat + iv - period then
    return i
  end
  used[i] = math.ceil((tat - now) / iv - 1e-9)
end
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[n + i], '-inf', now)
  if used[i] + redis.call('ZCARD', KEYS[n + i]) >= tonumber(ARGV[3 + 2 * i]) then
    return -i
  end
end
for i = 1, n do
  redis.call('ZADD', KEYS[n + i], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[n + i], ttl)
end
return 0
"""

LAND_SCRIPT = """
-- A failure judged: KEYS[1..m] the in-flight sets the attempt leaves, KEYS[m+1..] the
-- failure counters it counts in (GCRA, cost 1); ARGV: m, token, then period_ms and count
-- of each counter.  One script, so the attempt is never both gone and uncounted.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local m = tonumber(ARGV[1])
for i = 1, m do redis.call('ZREM', KEYS[i], ARGV[2]) end
for i = m + 1, #KEYS do
  local j = i - m
  local period = tonumber(ARGV[1 + 2 * j])
  local iv = period / tonumber(ARGV[2 + 2 * j])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  local new = tat + iv
  if now >= new - period then
    redis.call('SET', KEYS[i], string.format('%.3f', new), 'PX', math.ceil(new - now) + 1)
  end
end
return 0
"""

RELEASE_BATCH_DELAY = 0.02  # seconds: releases within this are sent as one call


@functools.lru_cache(maxsize=None)
def _script(source: str) -> tuple[bytes, bytes]:
    """A Lua script as sent: (the head of its EVALSHA command, its EVAL head)."""
    text = source.encode()
    sha = hashlib.sha1(text).hexdigest().encode()
    return (b"$7\r\nEVALSHA\r\n$%d\r\n%s\r\n" % (len(sha), sha),
            b"$4\r\nEVAL\r\n$%d\r\n%s\r\n" % (len(text), text))


def _command(head: bytes, keys: Sequence[str], args: Sequence[Any]) -> bytes:
    """EVALSHA/EVAL in Redis's wire format (RESP), an array of bulk strings: ``head``
    (the command and the script), the number of keys, the keys, the arguments.  The
    common all-ASCII case is formatted as text and encoded once."""
    values = [str(len(keys)), *keys, *[a if isinstance(a, str) else str(a) for a in args]]
    body = "".join([f"${len(v)}\r\n{v}\r\n" for v in values])
    if body.isascii():
        data = body.encode()
    else:  # lengths are in bytes
        data = b"".join([b"$%d\r\n%s\r\n" % (len(e), e)
                         for e in (v.encode("utf-8", "surrogatepass") for v in values)])
    return b"*%d\r\n" % (len(values) + 2) + head + data


def _bulks(values: Sequence[Any]) -> bytes:
    """``values`` as RESP bulk strings, one after another (for the parts of a command
    that are the same on every call: encoded once)."""
    return b"".join(b"$%d\r\n%s\r\n" % (len(e), e)
                    for e in (str(v).encode("utf-8", "surrogatepass") for v in values))


def _frame(values: Sequence[str]) -> bytes:
    """The per-call strings of a command (keys, a holder) as RESP bulk strings."""
    body = "".join([f"${len(v)}\r\n{v}\r\n" for v in values])
    if body.isascii():
        return body.encode()
    return _bulks(values)  # lengths are in bytes


class _Answer(tuple):
    """A place in txredisapi's reply queue without a Deferred: the queue hands each
    reply, in order, to its waiter's ``callback`` (a ``ConnectionError`` when the
    connection is lost), which is all a Deferred would do there.  A tuple (made in C, no
    ``__init__`` to run for every call): (store, then, default, script, items, rest,
    again), see ``RedisStore._call_then``."""

    __slots__ = ()

    def callback(self, value: Any) -> None:
        self[0]._answered(self, value)


def _zero(_: object) -> int:
    return 0


class StoreUnavailable(Exception):
    """Redis could not answer now; the caller allows."""


class _AlwaysReconnect(txredisapi.RedisFactory):
    """Retries forever: txredisapi gives up after an AUTH or SELECT error, which a
    restarting or reconfigured Redis can produce; only ``close`` stops it (Synapse pins
    the same)."""

    closing = False

    def stopTrying(self) -> Deferred[Any]:
        if self.closing:
            return super().stopTrying()
        return succeed(None)


@implementer(IHandshakeListener)
class _TLSRedisProtocol(txredisapi.RedisProtocol):
    """txredisapi's protocol for ``rediss://``: ready (AUTH, SELECT, then in the pool, so
    ``connected``) only once the TLS handshake has completed.  txredisapi would pool it
    as soon as the TCP connection is made, and a certificate that then fails
    verification would make the store look connected for a moment at every attempt."""

    def connectionMade(self) -> None:
        """Nothing yet: ``handshakeCompleted`` does txredisapi's ``connectionMade``."""

    def handshakeCompleted(self) -> None:
        super().connectionMade()


def _endpoint(url: RedisURL, reactor: Any, timeout: float) -> Any:
    """Where to connect; ``rediss://`` verifies the chain against ``ca_file`` (one or
    more PEM CAs, or the system store) and the host against the subjectAltName, failing
    the handshake with the reason (``StrictClientTLS``)."""
    if url.path:
        return UNIXClientEndpoint(reactor, url.path, timeout=timeout)
    host = url.host or "localhost"
    endpoint: Any = HostnameEndpoint(reactor, host, url.port, timeout=timeout)
    if url.tls:
        return wrapClientTLS(StrictClientTLS(host, load_trust_root(url.ca_file)), endpoint)
    return endpoint


class RedisStore:
    """A ``RateStore`` in Redis (``store = "redis://..."``); call ``close()`` on shutdown."""

    def __init__(self, url: str | RedisURL, reactor: Any, *, clock: IReactorTime | None = None,
                 timeout: float = 1.0, log_interval: float = 60.0, slot_ttl: float = 60.0,
                 key_prefix: str = "saslsmtp:", reconnect_max_delay: float = 10.0,
                 on_error: Callable[[], object] | None = None) -> None:
        self.url = parse_redis_url(url) if isinstance(url, str) else url
        self._reactor = reactor
        self._clock: IReactorTime = clock or reactor
        self.timeout = timeout
        self._warnings = RepeatedWarning(self._clock.seconds, log_interval)
        self.slot_ttl_ms = int(slot_ttl * 1000)
        self.prefix = key_prefix
        self.on_error = on_error
        self.unavailable = 0  # calls answered "allow" because Redis could not answer
        self.metrics: Any = NO_METRICS  # set by the service: redis_down()
        self._down = False
        self._held: dict[tuple[str, str], None] = {}
        # The encoded arguments that depend on the limits only, for the last limits seen
        # (compared by identity: the limiter passes the same objects every time).
        self._admit_tail: tuple[Any, Any, bytes, int] = (None, -1, b"", 0)
        self._gate_tail: tuple[Any, Any, bytes, int] = (None, -1, b"", 0)
        self._releases: list[tuple[str, str]] = []
        self._released: list[Deferred[None]] = []
        self._release_call: Any = None
        self._waiting = 0  # calls sent on the lean path, not answered yet
        self._progress = 0.0  # when the last answer came (or the first call of a busy spell)
        self._watch: Any = None
        factory = _AlwaysReconnect(self.url.describe(), self.url.db or None, 1, isLazy=True,
                                   password=self.url.password, username=self.url.username,
                                   replyTimeout=timeout)
        factory.deferred.addErrback(lambda f: None)  # lazy: errors are seen per call
        if self.url.tls:
            factory.protocol = _TLSRedisProtocol
        factory.maxDelay = reconnect_max_delay
        factory.initialDelay = min(factory.initialDelay, reconnect_max_delay)
        self._factory = factory
        self._redis = factory.handler
        factory.startConnecting(_endpoint(self.url, reactor, max(timeout, 1.0)))
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = reactor
        self._heartbeat.start(slot_ttl / 3, now=False)

    # ---- plumbing ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._factory.size > 0

    def _connection(self) -> Any:
        """The live txredisapi connection, or ``None``."""
        pool = self._factory.pool
        if pool and pool[0].connected:
            return pool[0]
        return None

    def _run(self, script: str, keys: list[str], args: list[Any]) -> "Deferred[Any] | None":
        """EVALSHA ``script`` (EVAL when Redis does not know it yet): ``None`` when not
        connected.  Nothing is counted as unavailable (releases, heartbeats)."""
        conn = self._connection()
        if conn is None:
            return None
        return self._send(conn, _command(_script(script)[0], keys, args)).addErrback(
            self._unknown_script, script, keys, args)

    def _unknown_script(self, f: Failure, script: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA of a script Redis does not know (it restarted or flushed its
        scripts): send it once with its text."""
        if f.check(txredisapi.ResponseError) and str(f.value).startswith("NOSCRIPT"):
            conn = self._connection()
            if conn is not None:
                return self._send(conn, _command(_script(script)[1], keys, args))
        return f

    def _written(self, conn: Any, command: bytes) -> None:
        conn.transport.write(command)
        if not self._waiting:
            self._progress = self._reactor.seconds()
        self._waiting += 1
        if self._watch is None:
            self._watch = self._reactor.callLater(self.timeout, self._check_stuck)

    def _call_then(self, script: str, keys: tuple[str, ...], first: str, tail: bytes,
                   tail_items: int, then: Callable[[Any], object], default: Any) -> None:
        """``_call`` without a Deferred, for the calls of every session (``ADMIT_SCRIPT``,
        ``GATE_SCRIPT``): ``keys``, then ``first`` and ``tail`` (``tail_items`` encoded
        arguments) as its arguments; ``then(reply)`` once Redis answers, ``then(default)``
        when it cannot (counted and logged as unavailable).  ``then`` may run before this
        returns (not connected).

        The releases queued since the last call go first, so that a slot or seat given
        back counts as free: inside this call's script (its extra keys, with their
        holders after ``tail``), one command and one reply fewer than a release batch of
        their own; on their own ahead of it when someone waits for their answer."""
        pool = self._factory.pool  # (``_connection``, inline: every session comes here twice)
        conn: Any = pool[0] if pool and pool[0].connected else None
        lean = conn is not None and not conn.replyQueue.pending
        gone: tuple[str, ...] = ()
        holders = b""
        if self._releases:
            if lean and not self._released:
                # (the batch's timer stays: finding nothing queued costs less than
                # cancelling and arming one for every session)
                pairs, self._releases = self._releases, []
                gone, held = zip(*pairs)
                holders = _frame(held)
            else:
                self._flush_now()
        count = len(keys) + len(gone)
        rest = _frame((str(count), *keys, *gone, first)) + tail + holders
        items = 4 + count + tail_items + len(gone)
        if not lean:
            self._call(script, items, rest).addCallbacks(then, lambda f: then(default))
            return
        # (``_written``, inline)
        conn.transport.write(b"*%d\r\n%s%s" % (items, _script(script)[0], rest))
        if not self._waiting:
            self._progress = self._reactor.seconds()
        self._waiting += 1
        if self._watch is None:
            self._watch = self._reactor.callLater(self.timeout, self._check_stuck)
        conn.replyQueue.waiting.append(_Answer((self, then, default, script, items, rest, False)))

    def _answered(self, answer: "_Answer", value: Any) -> None:
        """A reply (or the connection's loss) for a ``_call_then``."""
        self._waiting -= 1
        self._progress = self._reactor.seconds()
        _, then, default, script, items, rest, again = answer
        if isinstance(value, Exception):
            if isinstance(value, txredisapi.ResponseError) and not again \
                    and str(value).startswith("NOSCRIPT"):
                conn = self._connection()
                if conn is not None:  # Redis forgot the script: send it once with its text
                    self._written(conn, b"*%d\r\n%s%s" % (items, _script(script)[1], rest))
                    conn.replyQueue.waiting.append(
                        _Answer((self, then, default, script, items, rest, True)))
                    return
            self._unavailable(Failure(value))
            value = default
        elif self._down:
            self._down = False
            log.info("limits: Redis store {url} is answering again; limits apply",
                     url=self.url.describe())
        try:
            then(value)
        except Exception:  # never into txredisapi's parser
            log.failure("limits: handling a Redis reply")

    def _send(self, conn: Any, command: bytes) -> "Deferred[Any]":
        """The lean path: the command is encoded here and written to txredisapi's
        connection, whose parser answers in order through its reply queue; no pool
        lookup, no per-call timer (``_watch`` bounds every call at once).  The transport
        sends all of a reactor tick's commands in one write."""
        self._written(conn, command)
        return conn.replyQueue.get().addCallback(self._reply)

    def _reply(self, value: Any) -> Any:
        self._waiting -= 1
        self._progress = self._reactor.seconds()
        if isinstance(value, Exception):  # an error reply, or the connection was lost
            raise value
        if self._down:
            self._down = False
            log.info("limits: Redis store {url} is answering again; limits apply",
                     url=self.url.describe())
        return value

    def _check_stuck(self) -> None:
        """No answer for ``timeout`` while calls wait: Redis is stuck or gone silent.
        Drop the connection: every waiting call fails (and allows), and it reconnects."""
        self._watch = None
        if not self._waiting:
            return
        idle = self._reactor.seconds() - self._progress
        if idle >= self.timeout:
            for conn in list(self._factory.pool):
                conn.transport.abortConnection()
            idle = 0.0
            self._progress = self._reactor.seconds()
        self._watch = self._reactor.callLater(max(self.timeout - idle, 0.01), self._check_stuck)

    def _eval(self, script: str, keys: list[str], args: list[Any]) -> "Deferred[Any]":
        """``_run``, bounded by ``timeout``; fails with ``StoreUnavailable`` when Redis
        cannot answer (and counts it as such)."""
        conn = self._connection()
        if conn is None:
            return fail(self._unavailable(Failure(StoreUnavailable("not connected"))))
        d = self._send(conn, _command(_script(script)[0], keys, args))
        return d.addErrback(self._failed, script, keys, args)

    def _call(self, script: str, items: int, rest: bytes) -> "Deferred[Any]":
        """``_eval`` of a command already encoded: ``rest`` is everything after the
        script's name or hash (``items`` strings in all, the command and script too)."""
        conn = self._connection()
        if conn is None:
            return fail(self._unavailable(Failure(StoreUnavailable("not connected"))))
        d = self._send(conn, b"*%d\r\n%s%s" % (items, _script(script)[0], rest))
        return d.addErrback(self._call_failed, script, items, rest)

    def _call_failed(self, f: Failure, script: str, items: int, rest: bytes) -> Any:
        if f.check(txredisapi.ResponseError) and str(f.value).startswith("NOSCRIPT"):
            conn = self._connection()
            if conn is not None:
                again = self._send(conn, b"*%d\r\n%s%s" % (items, _script(script)[1], rest))
                return again.addErrback(self._unavailable)
        return self._unavailable(f)

    def _failed(self, f: Failure, script: str, keys: list[str], args: list[Any]) -> Any:
        if f.check(txredisapi.ResponseError) and str(f.value).startswith("NOSCRIPT"):
            conn = self._connection()
            if conn is not None:
                again = self._send(conn, _command(_script(script)[1], keys, args))
                return again.addErrback(self._unavailable)
        return self._unavailable(f)

    def _unavailable(self, f: Failure) -> Failure:
        self.unavailable += 1
        self.metrics.redis_down()
        self._down = True
        if self.on_error is not None:
            try:
                self.on_error()
            except Exception:
                log.failure("limits: on_error callback failed")
        left_out = self._warnings.due()
        if left_out is not None:
            log.warn("limits: Redis store {url} unavailable ({why}); allowing (fail open);"
                     " {count} calls since the last report", url=self.url.describe(),
                     why=f.getErrorMessage() or type(f.value).__name__, count=left_out + 1)
        return Failure(StoreUnavailable(str(f.value)))

    # ---- RateStore -----------------------------------------------------------------

    def _gcra(self, key: str, rate: Rate, cost: int, store: bool) -> "Deferred[RateResult]":
        d = self._eval(GCRA_SCRIPT, [self.prefix + key],
                       [int(rate.period * 1000), rate.count, cost, 1 if store else 0])

        def parse(reply: list[int]) -> RateResult:
            return RateResult(bool(reply[0]), reply[1] / 1000.0, int(reply[2]))
        return d.addCallbacks(parse, lambda f: ALLOW)

    def hit(self, key: str, rate: Rate, cost: int = 1) -> "Deferred[RateResult]":
        return self._gcra(key, rate, cost, True)

    def peek(self, key: str, rate: Rate) -> "Deferred[RateResult]":
        return self._gcra(key, rate, 1, False)

    def acquire(self, key: str, limit: int, holder: str) -> "Deferred[bool]":
        full = self.prefix + key
        d = self._eval(ACQUIRE_SCRIPT, [full], [limit, holder, self.slot_ttl_ms])

        def acquired(reply: int) -> bool:
            if reply:
                self._held[(full, holder)] = None
            return bool(reply)

        def open_(f: Failure) -> bool:
            self._held[(full, holder)] = None  # stamped by the next heartbeat once Redis is back
            return True
        return d.addCallbacks(acquired, open_)

    def release(self, key: str, holder: str) -> "Deferred[None]":
        """Give a slot back; releases within ``RELEASE_BATCH_DELAY`` go as one call."""
        full = self.prefix + key
        self._held.pop((full, holder), None)
        if not self.connected:
            return succeed(None)  # the slot expires with its heartbeat
        self._queue_release(full, holder)
        done: Deferred[None] = Deferred()
        self._released.append(done)
        return done

    def _queue_release(self, full: str, holder: str) -> None:
        self._releases.append((full, holder))
        if self._release_call is None:
            self._release_call = self._reactor.callLater(RELEASE_BATCH_DELAY, self._flush)

    def _flush_now(self) -> None:
        """The queued releases now, ahead of a call (same connection: Redis runs them
        first): a client that reconnects, or logs in again, at once finds its slot and
        its seat free, not held for the rest of the batch's delay."""
        if self._release_call is not None and self._release_call.active():
            self._release_call.cancel()
        self._flush()

    def _flush(self) -> None:
        """Send the queued releases; their Deferreds fire when Redis answered (or not)."""
        self._release_call = None
        pairs, self._releases = self._releases, []
        waiting, self._released = self._released, []
        d: Deferred[Any] | None = None
        if pairs:
            d = self._run(RELEASE_SCRIPT, [k for k, _ in pairs], [h for _, h in pairs])

        def fire(_: object) -> None:
            for w in waiting:
                w.callback(None)
        if d is None:
            fire(None)
        else:
            d.addBoth(fire)

    def peek_many(self, items: list[tuple[str, Rate]]) -> "Deferred[list[RateResult]]":
        """``peek`` of several counters in one call (the AUTH gate's address and user)."""
        args: list[Any] = []
        for _, rate in items:
            args += [int(rate.period * 1000), rate.count]
        d = self._eval(PEEK_MANY_SCRIPT, [self.prefix + k for k, _ in items], args)

        def parse(reply: list[list[int]]) -> list[RateResult]:
            return [RateResult(bool(r[0]), r[1] / 1000.0, int(r[2])) for r in reply]
        return d.addCallbacks(parse, lambda f: [ALLOW] * len(items))

    def admit(self, rate_key: str, rate: Rate | None, slot_key: str, limit: int | None,
              holder: str) -> "Deferred[tuple[bool, bool]]":
        """A new connection in one call: count it against ``rate`` and take a slot of
        ``limit``: (rate allowed, slot taken); both ``True`` when Redis cannot answer."""
        d: Deferred[tuple[bool, bool]] = Deferred()
        self.admit_then(rate_key, rate, slot_key, limit, holder,
                        lambda code: d.callback((code != 0, code == 2)))
        return d

    def admit_then(self, rate_key: str, rate: Rate | None, slot_key: str, limit: int | None,
                   holder: str, then: Callable[[int], object]) -> None:
        """A new connection in one call, as the limiter asks it: ``then(code)`` with 2
        (admitted), 1 (no free slot) or 0 (over the rate); 2 when Redis cannot answer
        (fail open).  The arguments after the holder depend on the limits only, so they
        are encoded once."""
        cached = self._admit_tail
        if cached[0] is not rate or cached[1] != limit:
            cached = self._admit_tail = (rate, limit, _bulks([
                int(rate.period * 1000) if rate else 0, rate.count if rate else 0,
                limit or 0, self.slot_ttl_ms]), 4)
        full = self.prefix + slot_key

        def answered(reply: int | None) -> None:
            if reply is None or reply == 2:
                if limit:  # held (if Redis could not answer: stamped by the next heartbeat)
                    self._held[(full, holder)] = None
                then(2)
            else:
                then(reply)
        self._call_then(ADMIT_SCRIPT, (self.prefix + rate_key, full), holder, cached[2],
                        cached[3], answered, None)

    def reserve(self, counters: list[tuple[str, Rate]], flights: list[str], token: str,
                ttl: float) -> "Deferred[int]":
        """The AUTH gate in one call: 0 when no counter's failures plus attempts in
        flight reach its count, and then ``token`` is in every set of ``flights`` (one
        per counter) for at most ``ttl`` seconds; else the 1-based index of the first
        counter that refused, negative when only the attempts in flight were in the way.
        0 (and nothing taken) when Redis cannot answer."""
        args: list[Any] = [token, len(counters), int(ttl * 1000)]
        for _, rate in counters:
            args += [int(rate.period * 1000), rate.count]
        d = self._eval(GATE_SCRIPT, [self.prefix + k for k, _ in counters]
                       + [self.prefix + f for f in flights], args)
        return d.addCallbacks(int, lambda f: 0)

    def reserve_then(self, flights: tuple[str, ...], rates: tuple[Rate, ...], token: str,
                     ttl: float, then: Callable[[int], object]) -> None:
        """``reserve`` as the limiter asks it: ``then(code)`` (0 when Redis cannot
        answer).  The counters are ``authfail:`` + each of ``flights`` (``ip:...``,
        ``user:...``), their in-flight sets ``flight:`` + it; the arguments after
        ``token`` depend on the limits only (encoded once)."""
        cached = self._gate_tail
        if cached[0] is not rates or cached[1] != ttl:
            values: list[Any] = [len(rates), int(ttl * 1000)]
            for rate in rates:
                values += [int(rate.period * 1000), rate.count]
            cached = self._gate_tail = (rates, ttl, _bulks(values), len(values))
        # (``map`` of a str method: no Python frame per key, as a comprehension has)
        keys = (*map((self.prefix + "authfail:").__add__, flights),
                *map((self.prefix + "flight:").__add__, flights))
        self._call_then(GATE_SCRIPT, keys, token, cached[2], cached[3], then, 0)

    def land(self, flights: list[str], token: str,
             counters: list[tuple[str, Rate]]) -> "Deferred[None]":
        """A failure judged: ``token`` leaves ``flights`` and one failure is counted in
        each of ``counters``, in one atomic call."""
        args: list[Any] = [len(flights), token]
        for _, rate in counters:
            args += [int(rate.period * 1000), rate.count]
        d = self._eval(LAND_SCRIPT, [self.prefix + f for f in flights]
                       + [self.prefix + k for k, _ in counters], args)
        return d.addCallbacks(lambda _: None, lambda f: None)

    def release_soon(self, key: str, holder: str) -> None:
        """``release`` with no answer to wait for: the slot goes inside the next
        admission or gate call, or with the batch after ``RELEASE_BATCH_DELAY``."""
        full = self.prefix + key
        self._held.pop((full, holder), None)
        if self._factory.size > 0:  # (``connected`` and ``_queue_release``, inline)
            self._releases.append((full, holder))
            if self._release_call is None:
                self._release_call = self._reactor.callLater(RELEASE_BATCH_DELAY, self._flush)

    def unreserve(self, flights: list[str], token: str) -> None:
        """The attempt ended with nothing to count (a success, an abort): ``token``
        leaves ``flights`` as ``release_soon`` gives a slot back."""
        if self._factory.size > 0:
            prefix, releases = self.prefix, self._releases
            for flight in flights:
                releases.append((prefix + flight, token))
            if self._release_call is None:
                self._release_call = self._reactor.callLater(RELEASE_BATCH_DELAY, self._flush)

    # ---- heartbeat and shutdown ------------------------------------------------------

    def _beat(self) -> "Deferred[Any] | None":
        if not self._held:
            if not self.connected:
                return None
            d = self._redis.ping()
            d.addTimeout(self.timeout, self._reactor)
            return d.addErrback(lambda f: None)
        pairs = list(self._held)
        d = self._eval(HEARTBEAT_SCRIPT, [k for k, _ in pairs],
                       [self.slot_ttl_ms, *[h for _, h in pairs]])
        return d.addErrback(lambda f: None)

    def close(self) -> "Deferred[Any]":
        """Stop the heartbeat, give back held slots, close the connection."""
        if self._heartbeat.running:
            self._heartbeat.stop()
        if self._release_call is not None and self._release_call.active():
            self._release_call.cancel()
            self._release_call = None
        self._flush()
        self._factory.closing = True
        held, self._held = list(self._held), {}
        d: Deferred[Any] = succeed(None)
        if held and self.connected:
            grouped: dict[str, list[str]] = {}
            for key, holder in held:
                grouped.setdefault(key, []).append(holder)
            calls = [self._redis.zrem(key, *holders) for key, holders in grouped.items()]
            d = gatherResults(calls, consumeErrors=True)
            d.addTimeout(self.timeout, self._reactor)
            d.addErrback(lambda f: None)
        def disconnect(_: object) -> Any:
            if self._watch is not None and self._watch.active():
                self._watch.cancel()
            self._watch = None
            return self._factory.disconnect()
        return d.addCallback(disconnect)

