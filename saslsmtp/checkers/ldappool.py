"""Idle LDAP connections to one server, kept so the next login re-binds instead of connecting.

A new connection per login costs a TCP handshake (and a TLS one with ``ldaps://`` or
StartTLS), a bind, an unbind and a close, on both sides: about twice the client CPU of a
bind on an open connection, and most of the directory's.  LDAPv3 lets a client bind again
on a connection it already used (RFC 4511 section 4.2.1: a new bind first abandons the
connection's authentication, and a failed one leaves it anonymous), which is what Dovecot's
``auth_bind = yes`` does on the connections it keeps open.

``IdlePool`` only stores and hands out connections; what they are bound as is the
caller's business (``Directory`` keeps user-bind and service-account connections in
separate pools, so a search never runs on a connection a user bound, or failed to bind).
It holds at most ``size`` idle connections (a surplus one is closed when given back),
hands out the most recently used first, and closes, instead of handing out, one that is
closed or has been idle longer than ``max_idle`` seconds: servers and firewalls drop idle
connections (slapd ``idletimeout``, Active Directory's ``MaxConnIdleTime``, NAT tables), and
a connection dropped without a word would otherwise cost a whole ``timeout`` to notice.
Thread-safe; it never blocks on I/O while holding its lock.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

MAX_IDLE_SECONDS = 60.0


@dataclass(frozen=True)
class _Idle:
    conn: Any
    since: float


class IdlePool:
    """At most ``size`` idle connections to one server; ``take``/``give``/``clear``."""

    def __init__(self, size: int, close: Callable[[Any], None], *,
                 clock: Callable[[], float] = time.monotonic,
                 max_idle: float = MAX_IDLE_SECONDS) -> None:
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self.size = size
        self._close = close
        self._clock = clock
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: list[_Idle] = []
        self._closed = False

    def take(self) -> Any | None:
        """The most recently given-back usable connection, or ``None`` (open a new one)."""
        now = self._clock()
        found = None
        with self._lock:
            stale = self._expire(now)
            while self._idle:
                item = self._idle.pop()
                if getattr(item.conn, "closed", False):
                    stale.append(item)
                    continue
                found = item.conn
                break
        for item in stale:
            self._close(item.conn)
        return found

    def give(self, conn: Any) -> None:
        """Keep ``conn`` for the next ``take`` (close it if the pool is full or shut)."""
        now = self._clock()
        with self._lock:
            stale = self._expire(now)
            keep = not self._closed and len(self._idle) < self.size \
                and not getattr(conn, "closed", False)
            if keep:
                self._idle.append(_Idle(conn, now))
        for item in stale:
            self._close(item.conn)
        if not keep:
            self._close(conn)

    def clear(self) -> None:
        """Close every idle connection (one broke: the others are probably stale too)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for item in idle:
            self._close(item.conn)

    def shut(self) -> None:
        """Close the idle connections and every one given back from now on (shutdown)."""
        with self._lock:
            self._closed = True
        self.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._idle)

    def _expire(self, now: float) -> list[_Idle]:
        """Remove (under the lock) and return the connections idle too long."""
        fresh = [i for i in self._idle if now - i.since <= self._max_idle]
        if len(fresh) == len(self._idle):
            return []
        stale = [i for i in self._idle if now - i.since > self._max_idle]
        self._idle = fresh
        return stale
