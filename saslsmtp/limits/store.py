"""Counters behind the limits: the ``RateStore`` interface and the in-process ``MemoryStore``.

A store does three things, each atomic:

* ``hit(key, rate)``: GCRA check-and-count.  Counts one event for ``key`` if it is within
  ``rate`` and says so; an event over the limit is not counted (a blocked client does
  not dig itself deeper).  ``cost=0`` would be a pure check; ``peek`` is "would one more
  event pass?" without counting it.
* ``acquire(key, limit, holder)`` / ``release(key, holder)``: concurrency slots (one per
  open connection).
* everything answers through a Deferred, so a networked store (``RedisStore``) fits.

GCRA ("generic cell rate algorithm", as redis-cell and rspamd use) keeps one number per
key, the theoretical arrival time ``tat``: a rolling window with no buckets to reset and
no background process.  Each event pushes ``tat`` by ``period / count``; an event is
allowed while ``tat`` stays within ``period`` of now.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from saslsmtp.limits.settings import Rate


@dataclass(frozen=True)
class RateResult:
    """The answer of one check: ``allowed``; when not, ``retry_after`` seconds until one
    more event would pass.  ``used`` approximates the events inside the window now."""

    allowed: bool
    retry_after: float = 0.0
    used: int = 0


ALLOW = RateResult(True)


class RateStore(Protocol):
    """Where counters live: one process (``MemoryStore``) or shared (``RedisStore``)."""

    def hit(self, key: str, rate: Rate, cost: int = 1) -> "Deferred[RateResult]":
        """Atomically: allowed if ``cost`` more events fit in ``rate``; if so, count them."""
        ...

    def peek(self, key: str, rate: Rate) -> "Deferred[RateResult]":
        """Would one more event pass?  Counts nothing."""
        ...

    def acquire(self, key: str, limit: int, holder: str) -> "Deferred[bool]":
        """Take a slot for ``holder`` if fewer than ``limit`` are held under ``key``."""
        ...

    def release(self, key: str, holder: str) -> "Deferred[None]":
        """Give ``holder``'s slot back (a no-op if it holds none)."""
        ...


def gcra(tat: float | None, now: float, rate: Rate, cost: int) -> tuple[RateResult, float | None]:
    """One GCRA step: (the verdict, the new ``tat`` to store or ``None`` to leave it)."""
    interval = rate.interval
    base = now if tat is None or tat < now else tat
    new_tat = base + interval * cost
    allow_at = new_tat - rate.period
    used = math.ceil(round((base - now) / interval, 9))
    if now < allow_at:
        return RateResult(False, allow_at - now, used), None
    return RateResult(True, 0.0, used + cost), new_tat


class MemoryStore:
    """Counters in this process's memory, for one worker (``store = "memory"``).

    ``clock`` is injected (the reactor, or a ``Clock`` in tests).  Memory is bounded:
    at most ``max_keys`` rate keys (least recently used dropped first, which errs on the
    side of allowing) and every entry disappears once its window has passed.
    """

    def __init__(self, clock: IReactorTime, max_keys: int = 100000) -> None:
        self._clock = clock
        self.max_keys = max_keys
        self._tats: OrderedDict[str, float] = OrderedDict()
        self._slots: dict[str, set[object]] = {}  # holders: strings or numbers

    def __len__(self) -> int:
        return len(self._tats)

    def _expire(self, now: float, budget: int = 8) -> None:
        """Drop a few expired entries from the least recently used end (amortised)."""
        while budget and self._tats:
            key, tat = next(iter(self._tats.items()))
            if tat > now:
                return
            del self._tats[key]
            budget -= 1

    def _check(self, key: str, rate: Rate, cost: int, store: bool) -> RateResult:
        now = self._clock.seconds()
        self._expire(now)
        tat = self._tats.get(key)
        if tat is not None and tat <= now:
            del self._tats[key]
            tat = None
        result, new_tat = gcra(tat, now, rate, cost)
        if store and new_tat is not None and cost:
            self._tats[key] = new_tat
            self._tats.move_to_end(key)
            while len(self._tats) > self.max_keys:
                self._tats.popitem(last=False)
        return result

    def hit(self, key: str, rate: Rate, cost: int = 1) -> "Deferred[RateResult]":
        return succeed(self._check(key, rate, cost, True))

    def peek(self, key: str, rate: Rate) -> "Deferred[RateResult]":
        return succeed(self._check(key, rate, 1, False))

    def acquire(self, key: str, limit: int, holder: str) -> "Deferred[bool]":
        return succeed(self.acquire_now(key, limit, holder))

    # The same answers without a Deferred: the limiter uses them when the store has them,
    # so a session over the memory store costs no callback hops.

    def hit_now(self, key: str, rate: Rate, cost: int = 1) -> RateResult:
        return self._check(key, rate, cost, True)

    def peek_now(self, key: str, rate: Rate) -> RateResult:
        return self._check(key, rate, 1, False)

    def acquire_now(self, key: str, limit: int, holder: str) -> bool:
        held = self._slots.setdefault(key, set())
        if holder in held:
            return True
        if len(held) >= limit:
            return False
        held.add(holder)
        return True

    def release(self, key: str, holder: str) -> "Deferred[None]":
        self.release_now(key, holder)
        return succeed(None)

    def release_now(self, key: str, holder: object) -> None:
        held = self._slots.get(key)
        if held is not None:
            held.discard(holder)
            if not held:
                del self._slots[key]

    # The limiter's per-event calls, each one step with one read of the clock (a session
    # over the memory store pays for no more than it needs).

    def admit_now(self, rate_key: str, rate: Rate | None, slot_key: str, limit: int | None,
                  holder: object) -> int:
        """A new connection: count it against ``rate`` and take a slot of ``limit``
        (``None``: no such limit).  2 admitted, 1 no free slot (counted all the same, as
        ``RedisStore.admit``), 0 over the rate (nothing counted, no slot taken)."""
        if rate is not None:
            now = self._clock.seconds()
            tats = self._tats
            self._expire(now)
            tat = tats.get(rate_key)
            # gcra() for one event, without building its RateResult: the event fits when
            # the new theoretical arrival time is at most one period ahead of now.
            new_tat = (now if tat is None or tat <= now else tat) + rate.period / rate.count
            if new_tat - rate.period > now:
                return 0
            tats[rate_key] = new_tat
            tats.move_to_end(rate_key)
            if len(tats) > self.max_keys:
                tats.popitem(last=False)
        if limit is not None:
            held = self._slots.get(slot_key)
            if held is None:
                self._slots[slot_key] = {holder}
            elif len(held) >= limit and holder not in held:
                return 1
            else:
                held.add(holder)
        return 2

    def peek_used(self, key: str, rate: Rate, now: float) -> int | None:
        """``peek`` at time ``now`` in short: ``None`` when one more event would not pass,
        else the events inside the window with that one (``RateResult.used``)."""
        tat = self._tats.get(key)
        if tat is None or tat <= now:
            return 1
        result = gcra(tat, now, rate, 1)[0]
        return result.used if result.allowed else None

    def rescale(self, prefix: str, factor: float) -> int:
        """Stretch every counter under ``prefix`` by ``factor`` (the new rate's interval
        over the old one), so each keeps the number of events it counted; returns how
        many counters were stretched.  A reload that changes a limit's rate calls it."""
        now = self._clock.seconds()
        stretched = 0
        for key, tat in self._tats.items():
            if key.startswith(prefix) and tat > now:
                self._tats[key] = now + (tat - now) * factor
                stretched += 1
        return stretched

    def held(self, key: str) -> int:
        """Slots held under ``key`` (tests, metrics)."""
        return len(self._slots.get(key, ()))
