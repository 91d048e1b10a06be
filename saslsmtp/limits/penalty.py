"""The AUTH penalty per client address, and the memory of failures already counted.

As Dovecot's auth penalty: an address with recent failures waits 2, 4, 8, ... seconds (up
to ``auth_penalty_max``) before *every* verdict, successes included, so the timing of an
answer tells nothing; a success clears the penalty of its own address.  A failure that
repeats the same username and password from the same address (a client retrying a saved
wrong password) is not counted again, even after a success from that address: per address we keep an HMAC of recent failed
(username, password) pairs under a key random to this process, never the password.
``Limiter`` owns one ``AuthPenalties`` and decides what is counted in the store.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

PENALTY_FIRST = 2.0  # seconds after the first failure, doubling (Dovecot's auth penalty)
PENALTY_FORGET = 3600.0  # a penalty is forgotten an hour after the last failure
REMEMBERED_FAILURES = 8  # distinct failed (user, password) HMACs kept per address
MAX_TRACKED_ADDRESSES = 100000


@dataclass(slots=True)
class _Penalty:
    count: int
    last: float
    failed: dict[bytes, float] = field(default_factory=dict)  # oldest first


class AuthPenalties:
    """Failure counts and failed-credential HMACs per client key (at most
    ``MAX_TRACKED_ADDRESSES``, the least recently failed forgotten first)."""

    def __init__(self, clock: IReactorTime, secret: bytes | None = None) -> None:
        self.clock = clock
        self._secret = secret if secret is not None else os.urandom(32)
        self.records: OrderedDict[str, _Penalty] = OrderedDict()

    def delay(self, key: str, cap: float) -> float:
        """Seconds the next verdict for ``key`` waits (0 without recent failures)."""
        if cap <= 0:
            return 0.0
        p = self.records.get(key)
        if p is None or p.count == 0 or self.clock.seconds() - p.last > PENALTY_FORGET:
            return 0.0
        return min(cap, PENALTY_FIRST * 2 ** (p.count - 1))

    def forgive(self, key: str) -> None:
        """A success: ``key`` has no penalty any more.  The failed pairs stay remembered:
        a phone retrying a saved wrong password behind the same address as a laptop that
        logs in must not count afresh after each of the laptop's logins."""
        p = self.records.get(key)
        if p is None:
            return
        if p.failed:
            p.count = 0
        else:
            del self.records[key]

    def fingerprint(self, username: str, password: bytes | str) -> bytes:
        """The HMAC kept instead of a failed (username, password) pair."""
        if isinstance(password, str):
            password = password.encode("utf-8", "surrogatepass")
        user = username.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, len(user).to_bytes(4, "big") + user + password,
                        hashlib.sha256).digest()

    def _forget_old(self, now: float, budget: int = 8) -> None:
        """Drop a few records whose last failure is over ``PENALTY_FORGET`` old (they are
        in order of last failure), so memory follows the failures of the last hour, not
        every address that ever failed."""
        while budget and self.records:
            key, oldest = next(iter(self.records.items()))
            if now - oldest.last <= PENALTY_FORGET:
                return
            del self.records[key]
            budget -= 1

    def record_failure(self, key: str, username: str, password: bytes | str | None,
                       repeat_window: float) -> bool:
        """Update the penalty; return False if this exact failure was already counted
        (the same pair failed from ``key`` within ``repeat_window`` seconds)."""
        now = self.clock.seconds()
        self._forget_old(now)
        p = self.records.get(key)
        if p is not None and now - p.last > PENALTY_FORGET:
            p = None
        if p is None:
            p = self.records[key] = _Penalty(0, now)
            while len(self.records) > MAX_TRACKED_ADDRESSES:
                self.records.popitem(last=False)
        self.records.move_to_end(key)
        if password is not None:
            mark = self.fingerprint(username, password)
            for old, seen in list(p.failed.items()):
                if now - seen > repeat_window:
                    del p.failed[old]
            if mark in p.failed:
                return False
            p.failed[mark] = now
            while len(p.failed) > REMEMBERED_FAILURES:
                del p.failed[next(iter(p.failed))]
        p.count += 1
        p.last = now
        return True
