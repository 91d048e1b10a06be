"""The daemon as a Twisted service: wiring a ``Config`` into checkers, portal, mechanisms,
the resolver and listeners, and the service's life cycle.

``build(config, reactor)`` turns a parsed ``Config`` into a service that is not yet
started: thread pools, backend checkers, the portal, the mechanisms and one listener per
endpoint.  Nothing else in the package reads the configuration file.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from twisted.application import internet, service
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import Portal
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger

from saslsmtp.auth import PasswordScript, Resolver, no_resolver
from saslsmtp.checkers.chain import BackendChain, TrustedIdentityChecker
from saslsmtp.checkers.file import salt_key_source
from saslsmtp.checkers.registry import BackendDeps, build_checker
from saslsmtp.checkers.secrets import ISecretSource, ITokenValidator
from saslsmtp.config import (Config, ConfigError, ConfigProblem, DeliveryConfig, file_key_line,
                             load_config)
from saslsmtp.delivery import Maildir, MaildirRealm, maildir_problem
from saslsmtp.events import SessionEvents
from saslsmtp.limits.build import AbuseControls, service_controls
from saslsmtp.limits.fairpool import FairThreadPoolRunner, cpu_share
from saslsmtp.listeners import start_or_exit
from saslsmtp.mechanisms import BUILTIN_NAMES, builtin_mechanisms
from saslsmtp.nodelay import no_delay
from saslsmtp.pollloop import lean_dispatch
from saslsmtp.protocol import EngineSettings, SubmissionESMTP
from saslsmtp.replies import REPLIES
from saslsmtp.resolver import secret_resolver as secret_resolver  # its old home, re-exported
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.script import Backends, ScriptPasswordChecker, ScriptRunner, load_script
from saslsmtp.threads import ThreadPoolRunner

log = Logger(namespace="saslsmtp")


def load(path: str) -> Config:
    """Parse the configuration; mechanisms must be built in or served by the script."""
    return load_config(path, known_mechanisms=BUILTIN_NAMES)


def _to_stderr(warning: str) -> None:
    print(warning, file=sys.stderr)


def check_users_files(config: Config, warn: Callable[[str], None] = _to_stderr) -> None:
    """``--check`` reads every users file too: each unusable line is a problem (the
    daemon would log and skip it); ``warn`` gets what works but may surprise."""
    from saslsmtp.checkers.file import load_warnings, parse_users
    from saslsmtp.preflight import builtin_served
    builtins = builtin_served(config)  # what the script serves, it checks itself
    problems = []
    for backend in config.backends.values():
        if backend.type != "file":
            continue
        try:
            data = Path(backend.options.path).read_bytes()
        except OSError as e:
            problems.append(ConfigProblem(backend.options.path, "", None, f"cannot read: {e.strerror}"))
            continue
        parsed = parse_users(data, backend.options.default_scheme)
        problems += [ConfigProblem(backend.options.path, f"backends.{backend.name}", line, message)
                     for line, message in parsed.problems]
        for warning in load_warnings(parsed, builtins):
            warn(f"{backend.options.path}: warning: {warning}")
        if config.submission.sender_policy == "login":
            bare = sorted(name for name in parsed.users if "@" not in name)
            if bare:
                shown = ", ".join(bare[:3]) + (f" and {len(bare) - 3} more" if len(bare) > 3 else "")
                warn(f"{backend.options.path}: warning: sender_policy = \"login\" lets a login"
                     f" send only as itself, and {len(bare)} of {len(parsed.users)} users"
                     f" ({shown}) are no address: every MAIL of theirs gets 553"
                     " (use sender_policy = \"map\" for them)")
    sender_map = config.submission.sender_map
    if config.submission.sender_policy == "map" and sender_map:  # and the sender map
        from saslsmtp.senders import check_sender_map
        problems += [ConfigProblem(sender_map, "submission.sender_map", line, message)
                     for line, message in check_sender_map(sender_map)]
    if problems:
        raise ConfigError(problems)


@dataclass
class Wiring:
    """Everything ``build`` made, for tests and for embedding."""

    config: Config
    portal: Portal
    settings: EngineSettings
    mechanisms: dict[str, MechanismSpec]
    checkers: dict[str, ICredentialsChecker]
    runners: list[Any] = field(default_factory=list)
    tls_context: Any = None
    resolver: Resolver | None = None
    blocking: Any = None
    script: PasswordScript | None = None  # decides PLAIN/LOGIN when an AUTH script is set
    sender_check: Any = None  # MAIL FROM: [submission] policy and the script's sender()
    upstream: Any = None  # the UpstreamClient for [delivery] type = "smtp"/"lmtp"
    controls: AbuseControls | None = None  # [limits] and [auth.cache] (saslsmtp.limits)


def wire(config: Config, reactor: Any) -> Wiring:
    """Build checkers, portal, mechanisms and TLS context (no listening)."""
    runners: list[Any] = []

    def make_runner(name: str, max_threads: int) -> ThreadPoolRunner:
        # Every thread starts with the service: a pool that grows on demand starts its
        # threads on the reactor thread, inside run(), and Thread.start waits until the new
        # thread gets the GIL, about 1 ms each while a burst of ldap3 threads holds it.
        runner = ThreadPoolRunner(reactor, name, max_threads, min_threads=max_threads)
        runners.append(runner)
        return runner

    # Hashing is fair across clients: one address cannot hold every thread.
    hash_runner = FairThreadPoolRunner(reactor, "saslsmtp-hash", config.auth.hash_threads,
                                       share=cpu_share(config.auth.hash_threads))
    runners.append(hash_runner)
    controls, late_store = service_controls(config.section("limits"),
                                            config.section("auth.cache"), reactor)
    if late_store is not None:
        runners.append(late_store)  # a Redis store connects when the service starts
    elif config.ops.worker_count(None) > 1 and _any_limit(config.section("limits")):
        log.info("limits: store = \"memory\" with {n} workers: counters are per worker"
                 " (use a redis:// store to share them)", n=config.ops.worker_count(None))
    checkers = build_checkers(config, BackendDeps(reactor, hash_runner, make_runner))
    realm, upstream = delivery_realm(config, reactor, make_runner)
    builtins = builtin_mechanisms(config.auth.mechanisms, salt_key_source(
        checkers[name] for name in config.auth.backends))  # SCRAM salts: one key everywhere
    mechanisms = {name: spec for name, spec in builtins.items() if name in config.auth.mechanisms}
    password_checker: ICredentialsChecker = controls.wrap_checker(BackendChain(
        [(name, checkers[name]) for name in config.auth.backends]),
        chain_id=",".join(config.auth.backends))
    runner = None
    if config.auth.script is not None:
        script = load_script(config.auth.script, config.path)
        runner = ScriptRunner(script, reactor, config.auth.script_timeout, Backends(checkers),
                              rate=controls.limiter.rate)
        password_checker = ScriptPasswordChecker(runner)
        mechanisms.update(scripted_mechanisms(config, builtins, script, runner))
    sources = [checkers[name] for name in config.auth.backends
               if ISecretSource.providedBy(checkers[name])]
    validators = [checker for checker in checkers.values() if ITokenValidator.providedBy(checker)]
    check_servable(config, mechanisms, builtins, runner is not None, sources, validators)
    return Wiring(config, Portal(realm, [password_checker, TrustedIdentityChecker()]),
                  engine_settings(config), mechanisms, checkers, runners, tls_context(config),
                  secret_resolver(sources, validators), blocking=hash_runner, script=runner,
                  sender_check=sender_check(config, runner), upstream=upstream,
                  controls=controls)


def delivery_realm(config: Config, reactor: Any, make_runner: Any) -> tuple[Any, Any]:
    """The realm for ``[delivery]`` (Maildir, or the upstream client's relay realm) and
    the ``UpstreamClient`` (``None`` for Maildir)."""
    from saslsmtp.relay.client import UpstreamClient
    from saslsmtp.relay.delivery import RelayRealm
    from saslsmtp.relay.options import UpstreamDelivery
    delivery = config.delivery
    if not isinstance(delivery, UpstreamDelivery):
        maildir_refused(config, delivery.path)
        return MaildirRealm(Maildir(delivery.path, config.server.hostname),
                            make_runner("saslsmtp-delivery", 4)), None
    upstream = UpstreamClient.from_options(delivery, reactor=reactor, helo=config.server.hostname)
    return RelayRealm(upstream), upstream


def maildir_refused(config: Config, path: str) -> None:
    """``ConfigError`` when the start's ``prepare_delivery`` would fail: ``--check`` and a
    SIGHUP reload refuse the Maildir too, at its line, instead of passing it."""
    why = maildir_problem(path)
    if why is None:
        return
    raise ConfigError([problem_at(config, "delivery.path", why)])


def problem_at(config: Config, key: str, message: str) -> ConfigProblem:
    """A problem the wiring finds, at the line of ``key`` (or of its table) in the file,
    as the parser's own problems are."""
    return ConfigProblem(config.path, key, file_key_line(config.path, key), message)


def sender_check(config: Config, runner: ScriptRunner | None) -> Any:
    """What MAIL FROM asks (``None`` when every sender is allowed and no script asks)."""
    from saslsmtp.sendercheck import SenderCheck
    from saslsmtp.senders import SenderPolicy
    submission = config.submission
    scripted = runner if runner is not None and runner.script.sender is not None else None
    if submission.sender_policy == "any" and submission.allow_null_sender and scripted is None:
        return None
    policy = SenderPolicy.from_options(submission, log=lambda text: log.warn("{text}", text=text))
    return SenderCheck(policy, scripted)


def _any_limit(limits: Any) -> bool:
    return any(getattr(limits, name) is not None for name in (
        "connections_per_ip", "connection_rate_per_ip", "auth_failures_per_ip",
        "auth_failures_per_user", "messages_per_user", "recipients_per_user"))


def build_checkers(config: Config, deps: BackendDeps) -> dict[str, ICredentialsChecker]:
    """One checker per ``[backends.NAME]``; a backend refusing its options is a config error."""
    checkers: dict[str, ICredentialsChecker] = {}
    for name, backend in config.backends.items():
        try:
            checkers[name] = build_checker(backend, deps)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError([problem_at(config, f"backends.{name}", str(e))]) from None
    return checkers


def scripted_mechanisms(config: Config, builtins: dict[str, MechanismSpec], script: Any,
                        runner: ScriptRunner) -> dict[str, MechanismSpec]:
    """The configured mechanisms the script serves: every non-built-in one, and a built-in
    only when the script's ``MECHANISMS`` names it."""
    specs: dict[str, MechanismSpec] = {}
    declared = script.mechanisms
    for name in config.auth.mechanisms:
        if name in builtins and (declared is None or name not in declared):
            continue
        if declared is not None and name not in declared:
            raise ConfigError([problem_at(
                config, "auth.mechanisms",
                f"{name} is not built in and {config.auth.script} does not serve it"
                f" (its MECHANISMS: {', '.join(sorted(declared)) or 'none'})")])
        specs[name] = script.spec(name, runner, builtins.get(name))
    return specs


def engine_settings(config: Config) -> EngineSettings:
    """What ``SubmissionESMTP`` needs from the configuration."""
    return EngineSettings(
        hostname=config.server.hostname,
        mechanisms=config.auth.mechanisms,
        require_tls=config.auth.require_tls,
        failure_delay=config.auth.failure_delay,
        max_failures=config.auth.max_failures,
        max_steps=config.auth.script_max_steps,
        max_message_size=config.server.max_message_size,
        max_recipients=config.server.max_recipients,
        idle_timeout=config.server.idle_timeout,
        junk_command_limit=config.server.junk_command_limit,
        max_unauthenticated_time=config.server.max_unauthenticated_time,
        tls_handshake_timeout=config.server.tls_handshake_timeout,
    )


def check_servable(config: Config, mechanisms: dict[str, MechanismSpec],
                   builtins: dict[str, MechanismSpec], scripted: bool, sources: list[Any],
                   validators: list[Any]) -> None:
    """Refuse to start when an announced built-in mechanism could never succeed: what it
    needs is what its ``MechanismSpec`` declares."""
    problems = []
    for name, spec in mechanisms.items():
        if spec is not builtins.get(name):
            continue  # served by the script
        kinds = spec.secret_kinds
        if kinds and not any(set(kinds) & set(s.secret_kinds()) for s in sources):
            problems.append(f"{name} needs a stored secret ({' or '.join(kinds)}) and no backend"
                            f" in auth.backends can supply one (only type = \"file\" can)")
        if spec.token_validator and not validators:
            problems.append(f"{name} needs a backend of type = \"oauth2\"")
        if spec.client_certificate and (config.tls is None or config.tls.client_ca is None):
            problems.append(f"{name} needs [tls] client_ca to verify client certificates")
        if spec.password and not scripted and not config.auth.backends:
            problems.append(f"{name} needs auth.backends or an auth.script")
    if problems:
        raise ConfigError([problem_at(config, "auth.mechanisms", p) for p in problems])


def tls_context(config: Config) -> Any:
    """Server TLS options from ``[tls]`` (``tlscontext.server_options``), or ``None``."""
    if config.tls is None:
        return None
    from saslsmtp.tlscontext import server_options
    return server_options(config.tls)


class SubmissionFactory(protocol.ServerFactory):
    """Builds one ``SubmissionESMTP`` per connection and keeps track of them."""

    def __init__(self, wiring: Wiring, clock: Any) -> None:
        self.wiring = wiring
        self.clock = clock
        self.connections: set[SubmissionESMTP] = set()
        self._idle: list[defer.Deferred[None]] = []

    def forget(self, connection: SubmissionESMTP) -> None:
        self.connections.discard(connection)
        if not self.connections:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def close_all(self, grace: float = 5.0) -> "defer.Deferred[None]":
        """Send 421 4.3.2 to every session, close it, and fire when all are gone
        (or after ``grace`` seconds)."""
        if not self.connections:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle.append(d)
        for connection in list(self.connections):
            connection.end(REPLIES["shutting_down"], answer_first=False)
        return d.addTimeout(grace, self.clock, onTimeoutCancel=lambda *_: None)

    def session_events(self) -> SessionEvents:
        """What a new session reports to (``serving.MeteredFactory`` adds metrics)."""
        return SessionEvents(None, self.clock)

    def buildProtocol(self, addr: Any) -> SubmissionESMTP:
        wiring = self.wiring
        tls = wiring.config.tls
        connection = _TrackedSubmission(
            portal=wiring.portal, settings=wiring.settings, mechanisms=wiring.mechanisms,
            clock=self.clock, tls_context=wiring.tls_context,
            resolver=wiring.resolver or no_resolver, script=wiring.script,
            blocking=wiring.blocking, client_identity=tls.client_identity if tls else "cn",
            events=self.session_events(),
            sender_check=wiring.sender_check,
            limiter=wiring.controls.limiter if wiring.controls is not None else None)
        connection.factory = self
        return connection


class _TrackedSubmission(SubmissionESMTP):
    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        no_delay(self.transport)
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        super().connectionLost(reason)
        self.factory.forget(self)


class SaslSmtpService(service.MultiService):
    """Listeners plus the thread pools; on stop, idle sessions get 421 4.3.2."""

    def __init__(self, wiring: Wiring, factory: SubmissionFactory) -> None:
        super().__init__()
        self.wiring = wiring
        self.factory = factory

    def privilegedStartService(self) -> None:
        start_or_exit(super().privilegedStartService)

    def startService(self) -> None:
        prepare_delivery(self.wiring.config)
        for runner in self.wiring.runners:
            runner.start()
        try:
            super().startService()
        except BaseException:  # a listener or the control socket refused the start: the
            for runner in self.wiring.runners:  # pools' threads must not keep the process
                runner.stop()
            raise
        # What exists now lives as long as the process: kept out of the cyclic GC's full
        # collections, which would walk all of it every few thousand sessions (more often
        # while sessions wait on a shared limits store, which ages their objects).
        gc.collect()
        gc.freeze()
        lean_dispatch(self.factory.clock)  # the daemon's reactor: no log context per event
        log.info("saslsmtp ready: mechanisms {mechs}", mechs=" ".join(self.wiring.settings.mechanisms))

    def stopService(self) -> "defer.Deferred[None]":
        d = defer.maybeDeferred(super().stopService)

        def stop_backends(_: Any) -> None:
            for checker in self.wiring.checkers.values():
                stop = getattr(checker, "stop", None)
                if callable(stop):
                    stop()
            for runner in self.wiring.runners:
                runner.stop()
            if self.wiring.upstream is not None:
                self.wiring.upstream.close()
        d.addCallback(lambda _: self.factory.close_all())
        return d.addCallback(stop_backends)


def prepare_delivery(config: Config, now: float | None = None) -> None:
    """At start, as the user that serves: make the Maildir and clear stale ``tmp/`` files.
    A Maildir that cannot be made stops the start with one line (``SystemExit``)."""
    if not isinstance(config.delivery, DeliveryConfig):
        return
    from saslsmtp.delivery import prepare_maildir
    try:
        removed = prepare_maildir(config.delivery.path, now)
    except OSError as e:
        raise SystemExit(f"saslsmtp: {config.path}: delivery.path: cannot use"
                         f" {e.filename or config.delivery.path}: {e.strerror}") from None
    if removed:
        log.info("maildir {path}: removed {count} stale files from tmp/ (older than 36 hours)",
                 path=config.delivery.path, count=removed)


def listening_service(endpoint: Any, factory: Any) -> internet.StreamServerEndpointService:
    """A listener whose bind failure is raised by ``privilegedStartService`` (so the start
    stops, before "ready"), not logged and forgotten as Twisted's default does."""
    server = internet.StreamServerEndpointService(endpoint, factory)
    server._raiseSynchronously = True
    return server


def listener(description: str, config: Config, reactor: Any, factory: Any,
             tls: Any = None) -> tuple[Any, Any]:
    """(endpoint, factory) for one ``server.listen`` entry.

    ``ssl:PORT[:interface=...]`` without key options is implicit TLS with the ``[tls]``
    context (so ``client_ca`` and the TLS floor apply): a TCP endpoint whose factory is
    wrapped in TLS.  Anything else is a Twisted endpoint string as written.
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from saslsmtp.descriptors import AcceptLogEndpoint
    from saslsmtp.proxyheader import metered, proxy_endpoint
    from saslsmtp.proxytrust import configured
    from saslsmtp.sendnow import send_now_reactor
    prefix = "haproxy:" if description.startswith("haproxy:") else ""
    inner = description[len(prefix):]
    listening = send_now_reactor(reactor)
    trusted, metrics = configured(factory), metered(factory)  # before TLS wraps it
    if inner.startswith("ssl:") and "privateKey=" not in inner and tls is not None:
        endpoint = endpoints.serverFromString(listening, "tcp:" + inner[len("ssl:"):])
        factory = TLSMemoryBIOFactory(tls, False, factory)
    else:
        endpoint = endpoints.serverFromString(listening, inner)
    if prefix:
        endpoint = proxy_endpoint(endpoint, reactor, trusted=trusted, name=description,
                                  metrics=metrics)
    return AcceptLogEndpoint(endpoint, reactor), factory


def build(config: Config, reactor: Any,
          passed: Mapping[str, int] | None = None) -> SaslSmtpService:
    """The whole daemon as a service (not started), e.g. for a ``.tac`` file.

    A ``systemd:`` listener serves the socket systemd passed for it, as the daemon does
    (Twisted's own ``systemd:`` parser knows neither ``name=`` with ``port=`` nor the
    sockets the daemon takes from the environment): ``passed`` maps each such entry to
    its descriptor; by default they are taken from this process's environment
    (``daemon.activated_sockets``: sockets that do not fit stop the start in one line,
    and an entry systemd passed nothing for stops it where it would listen)."""
    from saslsmtp import listeners
    wiring = wire(config, reactor)
    factory = SubmissionFactory(wiring, reactor)
    top = SaslSmtpService(wiring, factory)
    activated = [d for d in config.server.listen
                 if d.removeprefix("haproxy:").startswith("systemd:")]
    if passed is None and activated:
        from saslsmtp.daemon import activated_sockets
        passed = activated_sockets(config)
    for description in config.server.listen:
        if passed and description in passed:
            endpoint, wrapped = listeners.adopt(reactor, passed[description],
                                                listeners.parse(description), factory,
                                                wiring.tls_context)
        elif description in activated:
            endpoint, wrapped = listeners.NotPassedEndpoint(description), factory
        else:
            endpoint, wrapped = listener(description, config, reactor, factory,
                                         wiring.tls_context)
        listening_service(endpoint, wrapped).setServiceParent(top)
    return top
