"""A thread pool for expensive work (password hashing, PBKDF2) that is fair across clients.

One address hammering AUTH with bcrypt'd users must not make everyone else wait behind
its queue.  ``FairScheduler`` keeps a queue per client key and serves them round robin;
one key never runs on more than ``max(1, share * workers)`` workers at once; the number
of waiting jobs is bounded (in total and per key), and beyond the bound ``run`` fails at
once with ``PoolBusy``, a ``TemporaryFailure``, which the SMTP engine answers with
``454 4.7.0``: better than a reply the client gives up waiting for.

The client key.  ``run(f, *args, **kwargs)`` is ``BlockingRunner.run``, so every current
caller keeps working; it reads the key from the context variable ``CLIENT_KEY``, which
the protocol sets around the call that may reach the pool::

    with client_key_set(limits_settings.client_key(peer_ip)):
        d = portal.login(credentials, None, IMessageDelivery)

Twisted's ``inlineCallbacks``/``ensureDeferred`` copy the context, so backends reached
after a ``yield`` still see it.  Callers that know the key use ``run_for(key, f, ...)``.
Work without a key shares the key ``""``.

Jobs go to the real ``ThreadPool`` only when a worker is free, so the thread pool's own
(unfair, unbounded) queue stays empty.  Scheduling runs on the reactor thread.
"""

from __future__ import annotations

import contextvars
import os
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from saslsmtp.errors import TemporaryFailure

T = TypeVar("T")

CLIENT_KEY: contextvars.ContextVar[str] = contextvars.ContextVar("saslsmtp_client_key",
                                                                 default="")


class client_key_set:  # noqa: N801 (used like the function it was: ``with client_key_set(k)``)
    """Run the block with ``CLIENT_KEY`` set to ``key`` (restored afterwards).  A class,
    not a ``@contextmanager`` generator: it is entered at every login, and a generator
    costs a frame and three more calls each time."""

    __slots__ = ("_key", "_token")

    def __init__(self, key: str) -> None:
        self._key = key

    def __enter__(self) -> None:
        self._token = CLIENT_KEY.set(self._key)

    def __exit__(self, *exc_info: object) -> None:
        CLIENT_KEY.reset(self._token)


class PoolBusy(TemporaryFailure):
    """The expensive-work queue is full (for everyone, or for this client): 454 at once."""


def default_workers() -> int:
    """One thread per CPU but one: the reactor keeps a core for itself."""
    return max(1, (os.cpu_count() or 2) - 1)


def cpu_share(threads: int) -> float:
    """The share of ``threads`` one client key may use: half the pool, but never more
    threads than CPUs but one, so hashing for one address cannot take every core from
    the others (on 2 CPUs with 4 threads: 1 thread per address)."""
    return min(0.5, default_workers() / max(1, threads))


@dataclass
class _Job:
    f: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    key: str
    result: Deferred[Any] = field(default_factory=Deferred)


class FairScheduler:
    """Round robin over per-key queues in front of ``start``, which runs one job and
    returns a Deferred (a thread pool in production, a fake in tests)."""

    def __init__(self, start: Callable[..., "Deferred[Any]"], workers: int, *,
                 share: float = 0.5, max_queued: int | None = None,
                 max_queued_per_key: int | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._start = start
        self.workers = workers
        self.per_key_workers = max(1, int(workers * share))
        self.max_queued = max_queued if max_queued is not None else 32 * workers
        self.max_queued_per_key = (max_queued_per_key if max_queued_per_key is not None
                                   else max(1, self.max_queued // 4))
        self._queues: OrderedDict[str, deque[_Job]] = OrderedDict()
        self._running: dict[str, int] = {}
        self.running = 0
        self.queued = 0
        self.busy_refusals = 0

    def run_for(self, key: str, f: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        """Queue ``f(*args, **kwargs)`` under ``key``; ``PoolBusy`` at once when full."""
        queue = self._queues.get(key)
        if self.queued >= self.max_queued or (
                queue is not None and len(queue) >= self.max_queued_per_key):
            self.busy_refusals += 1
            return fail(PoolBusy("expensive-work queue full"))
        job = _Job(f, args, kwargs, key)
        job.result = Deferred(lambda d: self._cancel(job))
        self._queues.setdefault(key, deque()).append(job)
        self.queued += 1
        self._dispatch()
        return job.result

    def run(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        """``BlockingRunner.run``: the key comes from ``CLIENT_KEY``."""
        return self.run_for(CLIENT_KEY.get(), f, *args, **kwargs)

    def _cancel(self, job: _Job) -> None:
        queue = self._queues.get(job.key)
        if queue is not None and job in queue:  # still waiting: it never runs
            queue.remove(job)
            self.queued -= 1
            if not queue:
                del self._queues[job.key]
        # running: the thread finishes, its result is dropped (the Deferred is cancelled)

    def _next(self) -> _Job | None:
        for key in list(self._queues):
            if self._running.get(key, 0) >= self.per_key_workers:
                continue
            queue = self._queues[key]
            job = queue.popleft()
            if queue:
                self._queues.move_to_end(key)  # round robin: this key goes last
            else:
                del self._queues[key]
            self.queued -= 1
            return job
        return None

    def _dispatch(self) -> None:
        while self.running < self.workers:
            job = self._next()
            if job is None:
                return
            self.running += 1
            self._running[job.key] = self._running.get(job.key, 0) + 1
            try:
                d = self._start(job.f, *job.args, **job.kwargs)
            except Exception:
                d = fail()
            d.addBoth(self._finished, job)

    def _finished(self, outcome: Any, job: _Job) -> None:
        self.running -= 1
        left = self._running[job.key] - 1
        if left:
            self._running[job.key] = left
        else:
            del self._running[job.key]
        if not job.result.called:
            if isinstance(outcome, Failure):
                job.result.errback(outcome)
            else:
                job.result.callback(outcome)
        self._dispatch()

    def fail_waiting(self) -> None:
        """Fail every job that has not started (the service is stopping)."""
        queues, self._queues = self._queues, OrderedDict()
        self.queued = 0
        for queue in queues.values():
            for job in queue:
                job.result.errback(PoolBusy("stopping"))


class FairThreadPoolRunner(FairScheduler):
    """``ThreadPoolRunner``'s API (``run``, ``start``, ``stop``, ``pool``) with fairness;
    ``max_threads`` defaults to one per CPU but one."""

    def __init__(self, reactor: IReactorFromThreads, name: str, max_threads: int | None = None,
                 *, share: float = 0.5, max_queued: int | None = None,
                 max_queued_per_key: int | None = None) -> None:
        workers = max_threads or default_workers()
        self._reactor = reactor
        # every thread starts with the pool: one started on demand would start on the
        # reactor thread, inside run(), waiting there for the GIL (see service.make_runner)
        self.pool = ThreadPool(workers, workers, name)
        super().__init__(self._in_thread, workers, share=share, max_queued=max_queued,
                         max_queued_per_key=max_queued_per_key)

    def _in_thread(self, f: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        self.start()
        return deferToThreadPool(self._reactor, self.pool, f, *args, **kwargs)

    def start(self) -> None:
        if not self.pool.started:
            self.pool.start()

    def stop(self) -> None:
        self.fail_waiting()
        if self.pool.started:
            self.pool.stop()


__all__ = ["CLIENT_KEY", "FairScheduler", "FairThreadPoolRunner", "PoolBusy",
           "client_key_set", "default_workers"]
