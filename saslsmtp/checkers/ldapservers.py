"""Which LDAP server a login tries first, and its walk over them when one fails.

Both LDAP clients (ldap3 in threads, ``ldap.Directory``; Twisted on the reactor,
``ldaptwisted.TwistedDirectory``) fail over the same way: the servers in configured order,
those that failed in the last ``DOWN_SECONDS`` last; a server that did not answer usefully
is marked down and the login goes on to the next one; when none answered, the login fails
(454) with what each one said.  Kept here once so the two clients cannot drift apart.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from saslsmtp.errors import TemporaryFailure

if TYPE_CHECKING:
    from saslsmtp.checkers.ldap import Endpoint

DOWN_SECONDS = 30.0

_NO_LOCK = nullcontext()


class Servers:
    """The configured servers and which of them failed recently.

    ``lock`` guards the record where threads share it (the ldap3 client); the Twisted
    client, on the reactor alone, goes without.  While no server is down (the usual case)
    ``ordered`` and ``mark(up=True)`` neither read the clock nor take the lock."""

    def __init__(self, endpoints: Sequence[Endpoint], clock: Callable[[], float],
                 lock: AbstractContextManager[Any] | None = None) -> None:
        self.endpoints = tuple(endpoints)
        self._clock = clock
        self._lock = _NO_LOCK if lock is None else lock
        self._down_until: dict[Endpoint, float] = {}

    def ordered(self) -> Sequence[Endpoint]:
        """Endpoints in configured order; those that failed recently go last."""
        if not self._down_until:
            return self.endpoints
        now = self._clock()
        with self._lock:
            down = {e for e, until in self._down_until.items() if until > now}
        return [e for e in self.endpoints if e not in down] + \
               [e for e in self.endpoints if e in down]

    def mark(self, endpoint: Endpoint, up: bool) -> None:
        """Record that ``endpoint`` answered (``up``) or failed (tried last for a while)."""
        if up:
            if self._down_until:
                with self._lock:
                    self._down_until.pop(endpoint, None)
        else:
            with self._lock:
                self._down_until[endpoint] = self._clock() + DOWN_SECONDS

    def any_up(self, besides: Endpoint) -> bool:
        """Whether a server other than ``besides`` is not marked down."""
        now = self._clock()
        with self._lock:
            return any(self._down_until.get(e, 0.0) <= now
                       for e in self.endpoints if e != besides)

    def walk(self) -> "Failover":
        """One login's pass over the servers, best first."""
        return Failover(self)


class Failover:
    """Iterate for the servers in order; ``failed`` marks one down and keeps what it said
    for ``exhausted``, the 454 raised once every server has failed."""

    __slots__ = ("_servers", "_errors")

    def __init__(self, servers: Servers) -> None:
        self._servers = servers
        self._errors: list[str] = []

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self._servers.ordered())

    def failed(self, endpoint: Endpoint, error: object) -> None:
        """``endpoint`` did not answer usefully: the login goes on to the next one."""
        self._servers.mark(endpoint, up=False)
        self._errors.append(f"{endpoint}: {error}")

    def exhausted(self) -> TemporaryFailure:
        """The failure to raise when no server answered."""
        return TemporaryFailure("no LDAP server answered: " + "; ".join(self._errors))
