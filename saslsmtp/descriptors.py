"""File descriptors: a useful limit at startup, and accept failures that cannot flood the log.

Every SMTP session holds a descriptor.  The usual soft limit (1024 or 2048) is far below
what the hard limit allows, and a few thousand idle connections from one address would
exhaust it; ``raise_descriptor_limit`` lifts the soft limit to the hard one at startup.

When the process is out of descriptors anyway, Twisted's listening port
(``twisted.internet.tcp.Port.doRead``) keeps one descriptor in reserve: it frees it, accepts
the waiting connections, closes them at once (so the kernel queue does not fill and
clients are not left hanging) and re-reserves it, logging three lines per attempt.  Other
accept errors (ENFILE, ENOBUFS, ENOMEM) leave the socket readable, so the reactor calls
``doRead`` again at once: a busy loop with a log line each time.  ``AcceptFailureLog``
replaces the port's logger: the first failure is logged, further ones are counted and
reported at most once per ``interval`` (``repeats.PacedWarning``); after one of the other
errors the port stops accepting for ``pause`` seconds.  As soon as descriptors are free the next ``accept``
succeeds: nothing else is throttled.
"""

from __future__ import annotations

import resource
from typing import Any, Callable

from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from zope.interface import implementer

from saslsmtp.repeats import PacedWarning

log = Logger(namespace="saslsmtp.listen")

#: How Twisted's port words the events of one refused connection (``log_format`` prefixes).
RECOVERY = ("EMFILE encountered", "Re-reserving EMFILE")  # around each refusal: dropped
REFUSED_EMFILE = "EMFILE recovery"  # one refused connection, per client
ACCEPT_ERROR = "Could not accept new connection"  # ENFILE, ENOBUFS, ENOMEM, or EMFILE


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; log and return (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1048576)
    if soft == resource.RLIM_INFINITY or soft >= target:
        log.info("open file descriptor limit: {soft}", soft=soft)
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warn("open file descriptor limit stays {soft}: cannot raise it to {target}: {error}",
                 soft=soft, target=target, error=str(e))
        return soft, soft
    log.info("raised the open file descriptor limit from {soft} to {target}", soft=soft,
             target=target)
    return soft, target


@implementer(ILogObserver)
class AcceptFailureLog:
    """The log observer of one listening port: accept failures are summarised (see the
    module docstring); every other event goes on to ``forward``."""

    def __init__(self, port: Any, clock: Any, interval: float = 60.0, pause: float = 0.1,
                 forward: Callable[[dict], None] = globalLogPublisher) -> None:
        self.port = port
        self.clock = clock
        self.interval = interval
        self.pause = pause
        self.forward = forward
        self._failures: PacedWarning[str] = PacedWarning(clock, self._first, self._more, interval)
        self._resume: Any = None

    def __call__(self, event: dict) -> None:
        text = str(event.get("log_format") or "")
        if text.startswith(RECOVERY):
            return
        if text.startswith(REFUSED_EMFILE):
            self._failed("EMFILE")
        elif text.startswith(ACCEPT_ERROR):
            self._failed(str(event.get("acceptError", "?")))
            self._pause_accepting()
        else:
            self.forward(event)

    def _failed(self, error: str) -> None:
        self._failures.occurred(error)

    def _first(self, error: str) -> None:
        log.error("listener {listener}: cannot accept a connection ({error}: out of file"
                  " descriptors or memory); refusing clients until some are free",
                  listener=self._name(), error=error)

    def _more(self, count: int, error: str) -> None:
        log.error("listener {listener}: refused {count} more connections in {seconds:.0f} s"
                  " ({error})", listener=self._name(), count=count, seconds=self.interval,
                  error=error)

    def _pause_accepting(self) -> None:
        """The socket stays readable after these errors: do not spin on it."""
        if self._resume is not None or not getattr(self.port, "connected", False):
            return
        self.port.stopReading()
        self._resume = self.clock.callLater(self.pause, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if getattr(self.port, "connected", False) and not getattr(self.port, "disconnecting", False):
            self.port.startReading()

    def _name(self) -> str:
        try:
            host = self.port.getHost()
        except Exception:
            return "?"
        return f"{getattr(host, 'host', host)}:{getattr(host, 'port', '')}".rstrip(":")

    def stop(self) -> None:
        self._failures.stop()
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None


def summarise_accept_failures(port: Any, clock: Any, interval: float = 60.0) -> Any:
    """Give a listening port (``twisted.internet.tcp.Port`` or a subclass: TCP, UNIX,
    adopted) an ``AcceptFailureLog``; other ports are returned unchanged."""
    logger = getattr(port, "_logger", None)
    if isinstance(logger, Logger) and hasattr(port, "doRead"):
        observer: Any = AcceptFailureLog(port, clock, interval)  # an ILogObserver
        port._logger = Logger(namespace=logger.namespace, observer=observer)
    return port


@implementer(IStreamServerEndpoint)
class AcceptLogEndpoint:
    """``endpoint``, whose listening port summarises its accept failures."""

    def __init__(self, endpoint: Any, clock: Any, interval: float = 60.0) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.interval = interval

    def listen(self, factory: Any) -> Any:
        return self.endpoint.listen(factory).addCallback(
            summarise_accept_failures, self.clock, self.interval)
