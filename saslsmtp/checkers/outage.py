"""Logging a backend's outages: once when it starts, once when it ends.

A backend that cannot give verdicts (down, hung, answering "try later") fails every login
with a 454; one ``warn`` line per outage tells the operator, without a line per login.
``OutageLog.down(why)`` starts an outage (``warn``; later failures only at ``debug``);
``OutageLog.up()`` ends it (``info``: "backend NAME reachable again after N s").
``watch(d)`` does both from a checker's result: a verdict (accepted or
``UnauthorizedLogin``) means reachable, a ``TemporaryFailure`` (or any unexpected error)
means not.  Only ever used on the reactor thread.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="saslsmtp.backend")

T = TypeVar("T")


class OutageLog:
    """The outage state of one backend (``name``); ``seconds`` is its clock."""

    def __init__(self, name: str, seconds: Callable[[], float]) -> None:
        self.name = name
        self._seconds = seconds
        self.down_since: float | None = None

    def down(self, why: str) -> None:
        """A request found the backend unusable (``why`` must hold no secret)."""
        why = why.rstrip(". ")  # Twisted's reasons end in "."; ours goes on after it
        if self.down_since is None:
            self.down_since = self._seconds()
            log.warn("backend {name} unreachable: {why}; logins that need it get 454 until"
                     " it answers again", name=self.name, why=why)
        else:
            log.debug("backend {name} still unreachable: {why}", name=self.name, why=why)

    def up(self) -> None:
        """The backend gave a verdict."""
        if self.down_since is not None:
            seconds = self._seconds() - self.down_since
            self.down_since = None
            log.info("backend {name} reachable again after {seconds:.1f} s", name=self.name,
                     seconds=seconds)

    def watch(self, d: "Deferred[T]") -> "Deferred[T]":
        """Follow ``d`` (a verdict): up on a result or ``UnauthorizedLogin``, else down."""

        def answered(result: Any) -> Any:
            self.up()
            return result

        def failed(reason: Failure) -> Failure:
            if reason.check(UnauthorizedLogin):
                self.up()
            else:
                self.down(str(reason.value) or type(reason.value).__name__)
            return reason

        return d.addCallbacks(answered, failed)
