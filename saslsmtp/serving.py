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
from typing import Any, Callable, Mapping

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from zope.interface import implementer

from saslsmtp.checkers.chain import BackendChain
from saslsmtp.config import Config, ConfigError
from saslsmtp.events import SessionEvents
from saslsmtp.limits.authcache import CachingChecker
from saslsmtp.replies import REPLIES
from saslsmtp.metrics import Metrics
from saslsmtp.tlscert import ExpiryWatch, served_certificate
from saslsmtp.script import Backends, ScriptRunner
from saslsmtp.service import (SaslSmtpService, SubmissionFactory, Wiring, listener,
                              listening_service, wire)

log = Logger(namespace="saslsmtp")


#: Seconds a session inside AUTH or DATA gets to finish at shutdown (the master kills
#: workers that have not ended 5 s after its own grace, 10 s).
SHUTDOWN_GRACE = 8.0
SWEEP_INTERVAL = 0.1
#: Seconds a closed TLS session may take to answer our close_notify at shutdown.  Twisted
#: waits for the client's before it closes the TCP connection, and a client that neither
#: reads nor hangs up (a mail client keeping its connection) never sends it: the stop
#: waited for the whole grace, and a socket-activated restart kept its queue waiting.
CLOSE_WAIT = 1.0


class MeteredFactory(SubmissionFactory):
    """``SubmissionFactory`` that tells ``metrics`` when a session ends."""

    def __init__(self, wiring: Wiring, clock: Any, metrics: Metrics | None = None) -> None:
        super().__init__(wiring, clock)
        self.metrics = metrics
        self.listener_of: dict[Any, str] = {}  # open session -> its listener's name

    def session_events(self) -> SessionEvents:
        return SessionEvents(self.metrics, self.clock)

    def close_all(self, grace: float = SHUTDOWN_GRACE) -> "defer.Deferred[None]":
        """Shutdown: an idle session gets ``421 4.3.2`` and is closed at once; one inside
        AUTH or DATA (or waiting for its reply) finishes that step first, and is closed
        when it is idle, within ``grace`` seconds; after that every session left is
        closed.  A closed session still open ``CLOSE_WAIT`` seconds later (a TLS client
        that does not answer the close) is aborted.  Fires when all are gone."""
        if not self.connections:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        self._idle.append(done)
        deadline = self.clock.seconds() + grace
        closing: dict[Any, float] = {}  # session -> when it was sent its 421
        aborted: set[Any] = set()

        def sweep() -> None:
            now = self.clock.seconds()
            late = now >= deadline
            for connection in list(self.connections):
                since = closing.get(connection)
                if since is None:
                    if late or not connection.busy:  # idle, or its grace is over
                        closing[connection] = now
                        connection.end(REPLIES["shutting_down"], answer_first=False)
                elif connection not in aborted and (late or now - since >= CLOSE_WAIT):
                    aborted.add(connection)  # its client never answered the TLS close
                    connection.transport.abortConnection()

        loop = task.LoopingCall(sweep)
        loop.clock = self.clock
        loop.start(SWEEP_INTERVAL, now=True)

        def stop_sweeping(result: Any) -> Any:
            if loop.running:
                loop.stop()
            return result
        return done.addTimeout(grace + 2 * SWEEP_INTERVAL + 1.0, self.clock,
                               onTimeoutCancel=lambda *_: None).addBoth(stop_sweeping)

    def opened(self, p: Any, listener: str) -> None:
        """``p`` was built for a connection accepted on ``listener`` (``who`` shows it)."""
        self.listener_of[p] = listener
        if self.metrics is not None:
            self.metrics.connection_opened(listener)

    def forget(self, p: Any) -> None:
        listener = self.listener_of.pop(p, None)
        if listener is not None and self.metrics is not None:
            self.metrics.session_closed(listener)
        super().forget(p)


class ListenerFactory(protocol.Factory):
    """What one listener serves: the shared factory, counting connections by listener."""

    noisy = False

    def __init__(self, factory: MeteredFactory, name: str) -> None:
        self.factory = factory
        self.name = name

    def buildProtocol(self, addr: Any) -> Any:
        p = self.factory.buildProtocol(addr)
        self.factory.opened(p, self.name)
        return p


@implementer(IOpenSSLContextFactory)
class LiveTLSContext:
    """An old-style context factory that asks the factory's current wiring for its TLS
    context at every connection, so an ``ssl:`` listener serves a reloaded certificate.
    It says so (``IOpenSSLContextFactory``): Twisted warns on the terminal at every start
    about a context factory that does not."""

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
    """Time and count every backend check (of the password chain, or the AUTH script's
    ``backends.verify``) and the script's errors."""
    if metrics is None:
        return wiring
    metered: dict[str, Any] = {name: MeteredChecker(name, checker, metrics)
                               for name, checker in wiring.checkers.items()}
    chain = password_chain(wiring.portal.checkers.get(IUsernamePassword))
    if chain is not None:
        chain.backends = [(name, metered.get(name, checker)) for name, checker in chain.backends]
    if isinstance(wiring.script, ScriptRunner):  # its errors, and its backends.verify calls
        wiring.script.metrics = metrics
        wiring.script.backends = Backends(metered)
    attach_metrics(getattr(wiring, "controls", None), metrics)
    return wiring


def password_chain(checker: Any) -> BackendChain | None:
    """The backend chain the password checker asks, also behind the auth cache, whose
    misses still reach the backends (a hit is no backend request)."""
    if isinstance(checker, CachingChecker):
        checker = checker.inner
    return checker if isinstance(checker, BackendChain) else None


def attach_metrics(controls: Any, metrics: Metrics) -> None:
    """The limits' parts (``saslsmtp.limits.build.AbuseControls``: limiter, store, auth
    cache) count into ``metrics``: each part that has a ``metrics`` attribute (holding
    ``events.NO_METRICS`` until now) gets the process's, and calls
    ``metrics.limit_rejected(name)``, ``metrics.redis_down()``, ``metrics.cache_lookup(hit)``,
    ``metrics.cache_stale_hit()``."""
    if controls is None:
        return
    for part in vars(controls).values():
        if hasattr(part, "metrics"):
            part.metrics = metrics


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
    if wiring.upstream is not None:  # [delivery] smtp/lmtp: QUIT the idle connections
        wiring.upstream.close()


def listening_factory(factory: MeteredFactory, description: str) -> Any:
    """The factory for one listener, without implicit TLS (``listeners.adopt`` and
    ``service.listener`` add that)."""
    return ListenerFactory(factory, description)


def build_service(config: Config, reactor: Any, metrics: Metrics | None = None,
                  passed: Mapping[str, int] | None = None) -> "ReloadableService":
    """The single-process daemon, as ``service.build`` makes it, plus metrics, SIGHUP reload
    and a TLS context that follows reloads.  ``passed``: the socket systemd passed for
    each ``systemd:`` entry (``daemon.activated_sockets``), served as a worker serves
    the master's."""
    from saslsmtp import listeners
    factory = build_factory(config, reactor, metrics)
    top = ReloadableService(factory, config.path, reactor, metrics)
    live = LiveTLSContext(factory) if factory.wiring.tls_context is not None else None
    for description in config.server.listen:
        serves = listening_factory(factory, description)
        if passed and description in passed:
            endpoint, wrapped = listeners.adopt(reactor, passed[description],
                                                listeners.parse(description), serves, live)
        elif description.removeprefix("haproxy:").startswith("systemd:"):
            endpoint, wrapped = listeners.NotPassedEndpoint(description), serves
        else:
            endpoint, wrapped = listener(description, config, reactor, serves, live)
        listening_service(endpoint, wrapped).setServiceParent(top)
    return top


class Reloader:
    """Re-read the configuration and swap the wiring new sessions get.

    An invalid file (or a backend, script or certificate that cannot be loaded) keeps
    the running wiring and logs every problem as ``file:line: key: message``.  The old
    wiring's thread pools and backend connections stop once its last session ended.
    """

    #: Keys a reload cannot change (the sockets and processes exist already).
    RESTART_ONLY = ("server.listen", "server.workers", "server.worker_timeout", "server.user",
                    "server.group", "server.control_socket", "metrics.listen")

    def __init__(self, path: str, factory: SubmissionFactory, reactor: Any,
                 metrics: Metrics | None = None,
                 load_config: Callable[[str], Config] | None = None,
                 make_wiring: Callable[[Config, Any], Wiring] = wire,
                 poll: float = 1.0, clock: Any = None) -> None:
        self.path = path
        self.factory = factory
        self.reactor = reactor
        self.metrics = metrics
        self.load_config = load_config or (lambda path: reload_config(path, reactor))
        self.make_wiring = make_wiring
        self.poll = poll
        self.clock = clock or reactor
        self.retiring: list[tuple[Wiring, set[Any], Any]] = []
        self.running = factory.wiring.config  # what this process bound at start
        #: Called with the new wiring after each reload that was applied.
        self.on_reloaded: list[Callable[[Wiring], None]] = []
        self.warn_restart_only = True  # a worker leaves it to the master, which bound

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
        except Exception as e:  # what no check foresaw: still one line, never a traceback
            log.error("reload refused, keeping the running configuration: {path}: {error}",
                      path=self.path, error=f"{type(e).__name__}: {e}")
            return self._done(False)
        old = self.factory.wiring
        if new.controls is not None and old.controls is not None:
            new.controls.carry_over(old.controls)  # the limits keep their counters
        for key in restart_only_changes(self.running, config) if self.warn_restart_only else ():
            log.warn("reload: {key} changed; it takes effect at the next restart", key=key)
        start_runners(new)
        self.factory.wiring = new
        self._retire(old, set(self.factory.connections))
        log.info("reloaded {path}: new sessions use it", path=self.path)
        for hook in self.on_reloaded:
            hook(new)
        return self._done(True)

    def _done(self, ok: bool) -> bool:
        if self.metrics is not None:
            self.metrics.reloaded(ok)
        return ok

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


def reload_config(path: str, reactor: Any) -> Config:
    """The file a SIGHUP asks for, checked as a start and ``--check`` check it
    (``preflight.checked_config``: the same problems in the same words); its warnings
    are logged."""
    from saslsmtp.preflight import checked_config
    config, warnings = checked_config(path, reactor)
    for warning in warnings:
        log.warn("reload: {warning}", warning=warning)
    return config


def restart_only_changes(running: Config, new: Config) -> list[str]:
    """The keys ``new`` changes that only a restart applies, compared with ``running``:
    the configuration the process started with, whose sockets and processes exist."""
    changed = []
    if running.server.listen != new.server.listen:
        changed.append("server.listen")
    for key in ("workers", "worker_timeout", "user", "group"):
        if getattr(running.ops, key) != getattr(new.ops, key):
            changed.append(f"server.{key}")
    from saslsmtp.control import control_setting
    before, after = control_setting(running), control_setting(new)
    if (before and before[0]) != (after and after[0]):
        changed.append(after[1] if after else before[1] if before else "server.control_socket")
    if running.ops.metrics != new.ops.metrics:
        changed.append("metrics.listen")
    return changed


def served(wiring: Wiring) -> tuple[str, Any] | None:
    """The certificate file ``wiring`` serves and its leaf certificate, or ``None``."""
    if wiring.tls_context is None or wiring.config.tls is None:
        return None
    certificate = served_certificate(wiring.tls_context)
    return None if certificate is None else (wiring.config.tls.certificate, certificate)


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
        self.metrics = metrics  # the reloader's may be taken away (a worker's reload counts)
        self.reloader.on_reloaded.append(self.publish_certificate)
        self.expiry_watch = ExpiryWatch(lambda: served(self.factory.wiring), reactor)
        self.watch_certificate = True  # a worker other than the first leaves it to that one
        self._restore_sighup: Callable[[], None] | None = None
        self.control_suffix = ""  # a worker's control socket: <path>.<slot>

    def publish_certificate(self, wiring: Wiring) -> None:
        """``saslsmtp_tls_certificate_expiry_timestamp_seconds`` for what ``wiring`` serves."""
        if self.metrics is None:
            return
        current = served(wiring)
        if current is None:
            self.metrics.tls_certificate(None, None)
        else:
            path, certificate = current
            self.metrics.tls_certificate(path, certificate.not_valid_after_utc.timestamp())

    def startService(self) -> None:
        from saslsmtp.control import CONTROL_NAME, control_service
        control = control_service(self.reactor, self.factory, self.reloader, self.control_suffix)
        if control is not None and self.namedServices.get(CONTROL_NAME) is None:
            control.setName(CONTROL_NAME)
            control.setServiceParent(self)
        super().startService()
        self._restore_sighup = install_sighup(self.reactor, self.sighup)
        self.publish_certificate(self.factory.wiring)
        if self.watch_certificate:
            self.expiry_watch.start()

    def sighup(self) -> None:
        """A renamed log file is reopened (as the master does), then the reload."""
        from saslsmtp.logs import reopen_if_moved
        reopen_if_moved()
        self.reloader.reload()

    def stopService(self) -> Any:
        if self._restore_sighup is not None:
            self._restore_sighup()
            self._restore_sighup = None
        self.reloader.stop()
        self.expiry_watch.stop()
        self.wiring = self.factory.wiring
        return super().stopService()
