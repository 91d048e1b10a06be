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
from collections import deque
import time
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed

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


class PoolWaitTooLong(Exception):
    """A login waited longer than ``timeout`` for a free connection (internal)."""


class ConnectionPool:
    """At most ``size`` connections to one server, lent one login at a time (the Twisted
    client's user-bind pool).  Reactor thread only, never blocks.

    ``acquire()`` fires with ``(connection, reused)``: an idle one (most recently used
    first; closed or too-long-idle ones are dropped), else a new one from ``connect()``
    while fewer than ``size`` exist, else the next one given back (first come, first
    served).  A waiter whose turn comes after more than ``max_wait`` seconds fails with
    ``PoolWaitTooLong`` instead (a hung server must not build a queue of ever later 454s).
    ``release`` gives a connection back, ``discard`` closes one that broke (a waiter then
    gets a new one).  ``_idle`` has the same shape as ``IdlePool``'s.
    """

    def __init__(self, size: int, connect: Callable[[], Any], close: Callable[[Any], None],
                 *, clock: Callable[[], float], max_wait: float,
                 max_idle: float = MAX_IDLE_SECONDS) -> None:
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self.size = size
        self._connect = connect
        self._close = close
        self._clock = clock
        self._max_wait = max_wait
        self._max_idle = max_idle
        self._idle: list[_Idle] = []
        self._lent = 0  # lent out or being connected
        self._waiters: deque[tuple[Any, float]] = deque()
        self._closed = False

    def acquire(self) -> Any:
        """A Deferred firing with ``(connection, reused)``; see the class docstring."""
        if self._closed:
            return fail(PoolWaitTooLong("the LDAP backend is shutting down"))
        now = self._clock()
        while self._idle:
            item = self._idle.pop()
            if getattr(item.conn, "closed", False) or now - item.since > self._max_idle:
                self._close(item.conn)
                continue
            self._lent += 1
            return succeed((item.conn, True))
        if self._lent < self.size:
            self._lent += 1
            return self._open()
        d: Any = Deferred()
        self._waiters.append((d, now))
        return d

    def _open(self) -> Any:
        def failed(reason: Any) -> Any:
            self._lent -= 1
            self._wake()
            return reason
        return self._connect().addCallbacks(lambda conn: (conn, False), failed)

    def release(self, conn: Any) -> None:
        """Give ``conn`` back: to the first waiter, or idle (closed if it is unusable)."""
        if getattr(conn, "closed", False) or self._closed:
            self.discard(conn)
            return
        now = self._clock()
        while self._waiters:
            d, since = self._waiters.popleft()
            if now - since > self._max_wait:
                d.errback(PoolWaitTooLong(f"waited {now - since:.1f} s for a free LDAP "
                                          f"connection (timeout {self._max_wait} s)"))
                continue
            d.callback((conn, True))
            return
        self._lent -= 1
        self._idle.append(_Idle(conn, now))

    def discard(self, conn: Any) -> None:
        """Close a lent connection that broke (or is not to be trusted); wake a waiter."""
        self._close(conn)
        self._lent -= 1
        self._wake()

    def _wake(self) -> None:
        """A slot is free: the first waiter (if it has not waited too long) connects."""
        now = self._clock()
        while self._waiters and self._lent < self.size:
            d, since = self._waiters.popleft()
            if now - since > self._max_wait:
                d.errback(PoolWaitTooLong(f"waited {now - since:.1f} s for a free LDAP "
                                          f"connection (timeout {self._max_wait} s)"))
                continue
            self._lent += 1
            self._open().chainDeferred(d)

    def clear(self) -> None:
        """Close every idle connection (one broke: the others are probably stale too)."""
        idle, self._idle = self._idle, []
        for item in idle:
            self._close(item.conn)

    def shut(self) -> None:
        """Close the idle connections, fail the waiters, close any given back later."""
        self._closed = True
        self.clear()
        waiters, self._waiters = self._waiters, deque()
        for d, _since in waiters:
            d.errback(PoolWaitTooLong("the LDAP backend is shutting down"))

    def __len__(self) -> int:
        return len(self._idle)
