"""Running blocking work (password hashing, ldap3) off the reactor thread.

``ThreadPoolRunner`` wraps a bounded ``ThreadPool``; ``SynchronousRunner`` runs inline
and is only for tests that want no threads.  Checkers take a runner in their
constructor, never the global reactor.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class BlockingRunner(Protocol):
    """Runs a blocking callable somewhere that is not the reactor thread."""

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        ...


class ThreadPoolRunner:
    """A bounded, named thread pool; ``start()``/``stop()`` follow the service."""

    def __init__(self, reactor: IReactorFromThreads, name: str, max_threads: int = 8,
                 min_threads: int = 0) -> None:
        self._reactor = reactor
        self.pool = ThreadPool(min_threads, max_threads, name)

    def start(self) -> None:
        if not self.pool.started:
            self.pool.start()

    def stop(self) -> None:
        if self.pool.started:
            self.pool.stop()

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        self.start()
        return deferToThreadPool(self._reactor, self.pool, f, *args, **kwargs)


class SynchronousRunner:
    """Runs the callable at once, on the calling thread (tests only)."""

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        return maybeDeferred(f, *args, **kwargs)
