"""The seam between the SMTP wiring and the operations machinery.

``build_factory(config, reactor, metrics)`` makes the one SMTP factory of a process;
``listening_factory(factory, description)`` is what one listener serves (it counts the
connection under that listener's name; ``service.listener`` or ``listeners.adopt`` put
implicit TLS around it when ``ssl:`` asks); ``build_service`` is the whole single-process daemon.  The factory reads
its ``wiring`` (portal, mechanisms, script, TLS context, settings) at every new
connection, so ``Reloader`` swaps the wiring for new sessions while open sessions keep
the objects they were built with.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol, task
from twisted.logger import Logger
from zope.interface import implementer

from saslsmtp.checkers.chain import BackendChain
from saslsmtp.config import Config, ConfigError
from saslsmtp.metrics import Metrics
from saslsmtp.service import (SaslSmtpService, SubmissionFactory, Wiring, listener,
                              listening_service, load, wire)

log = Logger(namespace="saslsmtp")


class MeteredFactory(SubmissionFactory):
    """``SubmissionFactory`` that tells ``metrics`` when a session ends."""

    def __init__(self, wiring: Wiring, clock: Any, metrics: Metrics | None = None) -> None:
        super().__init__(wiring, clock)
        self.metrics = metrics

    def forget(self, p: Any) -> None:
        if p in self.connections and self.metrics is not None:
            self.metrics.session_closed()
        super().forget(p)


class ListenerFactory(protocol.Factory):
    """What one listener serves: the shared factory, counting connections by listener."""

    noisy = False

    def __init__(self, factory: MeteredFactory, name: str) -> None:
        self.factory = factory
        self.name = name

    def buildProtocol(self, addr: Any) -> Any:
        if self.factory.metrics is not None:
            self.factory.metrics.connection_opened(self.name)
        return self.factory.buildProtocol(addr)


class LiveTLSContext:
    """An old-style context factory that asks the factory's current wiring for its TLS
    context at every connection, so an ``ssl:`` listener serves a reloaded certificate."""

    def __init__(self, factory: SubmissionFactory) -> None:
        self.factory = factory

    def getContext(self) -> Any:
        return self.factory.wiring.tls_context.getContext()


@implementer(ICredentialsChecker)
class MeteredChecker:
    """A backend as the password chain sees it, timing each check and counting its
    outcome (``saslsmtp_backend_requests_total``, ``saslsmtp_auth_duration_seconds``)."""

    def __init__(self, name: str, checker: Any, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.checker = checker
        self.metrics = metrics
        self.clock = clock
        self.credentialInterfaces = checker.credentialInterfaces

    def requestAvatarId(self, credentials: Any) -> "defer.Deferred[Any]":
        started = self.clock()

        def accepted(avatar: Any) -> Any:
            self.metrics.backend_finished(self.name, "accept", self.clock() - started)
            return avatar

        def failed(failure: Any) -> Any:
            result = "reject" if failure.check(UnauthorizedLogin) else "tempfail"
            self.metrics.backend_finished(self.name, result, self.clock() - started)
            return failure
        return defer.maybeDeferred(self.checker.requestAvatarId, credentials).addCallbacks(accepted, failed)


def instrument(wiring: Wiring, metrics: Metrics | None) -> Wiring:
    """Time and count every backend of the password chain (a script's own
    ``backends.verify`` calls are not counted here)."""
    chain = wiring.portal.checkers.get(IUsernamePassword)
    if metrics is not None and isinstance(chain, BackendChain):
        chain.backends = [(name, MeteredChecker(name, checker, metrics))
                          for name, checker in chain.backends]
    return wiring


def metered_wire(metrics: Metrics | None) -> Callable[[Config, Any], Wiring]:
    """``wire`` plus ``instrument``: what a process builds at start and at each reload."""
    return lambda config, reactor: instrument(wire(config, reactor), metrics)


def build_factory(config: Config, reactor: Any, metrics: Metrics | None = None) -> MeteredFactory:
    """The SMTP factory of this process (its thread pools not started yet:
    ``start_runners(factory.wiring)``)."""
    return MeteredFactory(metered_wire(metrics)(config, reactor), reactor, metrics)


def start_runners(wiring: Wiring) -> None:
    for runner in wiring.runners:
        runner.start()


def stop_wiring(wiring: Wiring) -> None:
    """Stop a wiring's backends and thread pools (after its last session ended)."""
    for checker in wiring.checkers.values():
        stop = getattr(checker, "stop", None)
        if callable(stop):
            stop()
    for runner in wiring.runners:
        runner.stop()


def listening_factory(factory: MeteredFactory, description: str) -> Any:
    """The factory for one listener, without implicit TLS (``listeners.adopt`` and
    ``service.listener`` add that)."""
    return ListenerFactory(factory, description)


def build_service(config: Config, reactor: Any, metrics: Metrics | None = None) -> "ReloadableService":
    """The single-process daemon, as ``service.build`` makes it, plus metrics, SIGHUP reload
    and a TLS context that follows reloads."""
    factory = build_factory(config, reactor, metrics)
    top = ReloadableService(factory, config.path, reactor, metrics)
    live = LiveTLSContext(factory) if factory.wiring.tls_context is not None else None
    for description in config.server.listen:
        endpoint, wrapped = listener(description, config, reactor,
                                     listening_factory(factory, description), live)
        listening_service(endpoint, wrapped).setServiceParent(top)
    return top


class Reloader:
    """Re-read the configuration and swap the wiring new sessions get.

    An invalid file (or a backend, script or certificate that cannot be loaded) keeps
    the running wiring and logs every problem as ``file:line: key: message``.  The old
    wiring's thread pools and backend connections stop once its last session ended.
    """

    #: Keys a reload cannot change (the sockets and processes exist already).
    RESTART_ONLY = ("server.listen", "server.workers", "server.user", "server.group",
                    "metrics.listen")

    def __init__(self, path: str, factory: SubmissionFactory, reactor: Any,
                 metrics: Metrics | None = None,
                 load_config: Callable[[str], Config] = load,
                 make_wiring: Callable[[Config, Any], Wiring] = wire,
                 poll: float = 1.0, clock: Any = None) -> None:
        self.path = path
        self.factory = factory
        self.reactor = reactor
        self.metrics = metrics
        self.load_config = load_config
        self.make_wiring = make_wiring
        self.poll = poll
        self.clock = clock or reactor
        self.retiring: list[tuple[Wiring, set[Any], Any]] = []

    def reload(self) -> bool:
        """Returns whether the new configuration is now used for new sessions."""
        try:
            config = self.load_config(self.path)
            new = self.make_wiring(config, self.reactor)
        except ConfigError as e:
            for problem in e.problems:
                log.error("reload refused, keeping the running configuration: {problem}",
                          problem=str(problem))
            return self._done(False)
        except Exception as e:  # a certificate or key that does not load, and the like
            log.error("reload refused, keeping the running configuration: {path}: {error}",
                      path=self.path, error=f"{type(e).__name__}: {e}")
            return self._done(False)
        old = self.factory.wiring
        for key in self._restart_only_changes(old.config, config):
            log.warn("reload: {key} changed; it takes effect at the next restart", key=key)
        start_runners(new)
        self.factory.wiring = new
        self._retire(old, set(self.factory.connections))
        log.info("reloaded {path}: new sessions use it", path=self.path)
        return self._done(True)

    def _done(self, ok: bool) -> bool:
        if self.metrics is not None:
            self.metrics.reloaded(ok)
        return ok

    @staticmethod
    def _restart_only_changes(old: Config, new: Config) -> list[str]:
        changed = []
        if old.server.listen != new.server.listen:
            changed.append("server.listen")
        for key in ("workers", "user", "group"):
            if getattr(old.ops, key) != getattr(new.ops, key):
                changed.append(f"server.{key}")
        if old.ops.metrics != new.ops.metrics:
            changed.append("metrics.listen")
        return changed

    def _retire(self, wiring: Wiring, sessions: set[Any]) -> None:
        def check() -> None:
            if not sessions & self.factory.connections:
                loop.stop()
                stop_wiring(wiring)
                self.retiring[:] = [r for r in self.retiring if r[0] is not wiring]

        loop = task.LoopingCall(check)
        loop.clock = self.clock
        self.retiring.append((wiring, sessions, loop))
        loop.start(self.poll, now=True)

    def stop(self) -> None:
        """At shutdown: stop every wiring still waiting for its sessions."""
        for wiring, _, loop in list(self.retiring):
            if loop.running:
                loop.stop()
            stop_wiring(wiring)
        self.retiring.clear()


def install_sighup(reactor: Any, handler: Callable[[], Any]) -> Callable[[], None]:
    """Run ``handler`` on the reactor at each SIGHUP (twistd's default would kill the
    process).  Returns a function restoring the previous disposition."""
    import signal
    previous = signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(handler))

    def restore() -> None:
        signal.signal(signal.SIGHUP, previous)
    return restore


class ReloadableService(SaslSmtpService):
    """``SaslSmtpService`` whose SIGHUP reloads the configuration (``Reloader``) and whose
    shutdown stops whatever wiring is current by then."""

    def __init__(self, factory: MeteredFactory, path: str, reactor: Any,
                 metrics: Metrics | None = None) -> None:
        super().__init__(factory.wiring, factory)
        self.config = factory.wiring.config  # as started (a reload cannot change server.user)
        self.reactor = reactor
        self.reloader = Reloader(path, factory, reactor, metrics, make_wiring=metered_wire(metrics))
        self._restore_sighup: Callable[[], None] | None = None

    def startService(self) -> None:
        super().startService()
        self._restore_sighup = install_sighup(self.reactor, self.reloader.reload)

    def stopService(self) -> Any:
        if self._restore_sighup is not None:
            self._restore_sighup()
            self._restore_sighup = None
        self.reloader.stop()
        self.wiring = self.factory.wiring
        return super().stopService()
