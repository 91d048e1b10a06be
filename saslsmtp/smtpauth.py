"""The AUTH command on the wire (RFC 4954): which mechanisms are offered, the command's
checks, the exchange's lines, and the one place an AUTH outcome becomes a reply.

``SmtpAuth`` belongs to one connection.  It runs a ``saslsmtp.auth.AuthExchange`` per
AUTH command and answers each step: ``Reply`` -> 334, ``LoggedIn`` -> 235 (with the
``Accept``'s text), ``Reject`` -> 535 after the failure delay (counted; the last one also
421 and close), ``Defer`` -> 454.  It talks to its connection through ``AuthHost``.
"""

from __future__ import annotations

import base64
from typing import Any, Callable, Mapping, Protocol, assert_never, cast

from twisted.internet import defer, task
from twisted.logger import Logger

from saslsmtp.auth import (AuthExchange, FailurePolicy, LoggedIn, PasswordScript, Resolver,
                           StepResult, no_resolver)
from saslsmtp.limits.session import GATE_REFUSAL
from saslsmtp.lines import OVERLONG
from saslsmtp.replies import REPLIES, SMTPReply, auth_reply, auth_success_reply
from saslsmtp.sasl.codec import DecodeError, decode_response
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.outcome import Defer, Reject, Reply, Session
from saslsmtp.settled import is_deferred

log = Logger(namespace="saslsmtp.smtp")

AUTH_LINE_LIMIT = 12288  # RFC 4954 section 4


class AuthHost(Protocol):
    """What ``SmtpAuth`` needs from its connection."""

    tls: bool
    lost: bool
    events: Any  # saslsmtp.events.SessionEvents

    @property
    def peer_ip(self) -> str: ...

    def send(self, reply: SMTPReply) -> None: ...

    def error(self, reply: SMTPReply) -> None: ...

    def write(self, data: bytes) -> None: ...

    def busy_until(self, d: "defer.Deferred[Any]",
                   then: "Callable[[Any], Any] | None" = None) -> None: ...

    def close(self) -> None: ...

    def session(self, mechanism: str) -> Session: ...

    def authenticated_as(self, avatar: Any) -> None: ...


class SmtpAuth:
    """AUTH for one connection: the current exchange, the failure count, the login."""

    def __init__(self, host: AuthHost, *, portal: Any, mechanisms: Mapping[str, MechanismSpec],
                 offered: tuple[str, ...], require_tls: bool, clock: Any,
                 failures: FailurePolicy, max_steps: int = 16,
                 resolver: Resolver = no_resolver, script: PasswordScript | None = None,
                 blocking: Any = None, limits: Any = None) -> None:
        missing = [name for name in offered if name not in mechanisms]
        if missing:  # announcing nothing for them would hide a typo or a forgotten spec
            raise ValueError(
                f"mechanisms to offer without a MechanismSpec: {', '.join(missing)} (names are"
                f" upper case; served: {', '.join(mechanisms) or 'none'}; pass"
                " EngineSettings(mechanisms=embed.submission_auth(...).names))")
        self.host = host
        self.limits = limits  # saslsmtp.limits.session.ConnectionLimits, or None
        self.portal = portal
        self.mechanisms = mechanisms
        self.offered = offered
        self.require_tls = require_tls
        self.clock = clock
        self.failures = failures
        self.max_steps = max_steps
        self.resolver = resolver
        self.script = script
        self.blocking = blocking
        self.exchange: AuthExchange | None = None
        self.login: LoggedIn | None = None

    def offered_mechanisms(self) -> list[str]:
        """Mechanisms announced now: configured ones, minus those TLS policy hides."""
        return [name for name in self.offered
                if name in self.mechanisms and self._allowed(self.mechanisms[name])]

    def _allowed(self, spec: MechanismSpec) -> bool:
        if self.host.tls:
            return True
        if spec.needs_tls:
            return False
        return not (spec.plaintext and self.require_tls)

    def command(self, arg: bytes) -> None:
        """``AUTH mechanism [initial-response]`` (order checks are the protocol's)."""
        parts = arg.split()
        if not parts or len(parts) > 2:
            return self.host.error(REPLIES["auth_no_mechanism"])
        try:
            name = parts[0].decode("ascii").upper()
        except UnicodeDecodeError:
            return self.host.error(REPLIES["auth_unknown_mech"])
        spec = self.mechanisms.get(name) if name in self.offered else None
        if spec is None:
            return self.host.error(REPLIES["auth_unknown_mech"])
        if not self._allowed(spec):
            return self.host.error(REPLIES["auth_encryption_required"])
        initial: bytes | None = None
        if len(parts) == 2:
            if not spec.client_first:
                return self.host.error(REPLIES["auth_unexpected_ir"])
            try:
                initial = decode_response(parts[1], initial=True)
            except DecodeError:  # a broken exchange, as bad base64 on a later line
                self.host.events.auth_finished(spec.name, "aborted", client=self.host.peer_ip)
                return self.host.error(REPLIES["auth_bad_base64"])
        exchange = self.start_exchange(spec)
        if exchange is not None:
            self._answer_step(exchange.start(initial))

    def start_exchange(self, spec: MechanismSpec) -> AuthExchange | None:
        """A new exchange, with the one ``Session`` it gets (before any credentials)."""
        try:
            self.exchange = AuthExchange(
                spec, self.host.session(spec.name), portal=self.portal, resolver=self.resolver,
                script=self.script, blocking=self.blocking, max_steps=self.max_steps,
                guard=self.limits.attempt(self.host.peer_ip, spec.name)
                if self.limits is not None else None)
        except Exception:
            log.failure("could not start mechanism {mechanism}", mechanism=spec.name)
            self.host.events.auth_finished(spec.name, "tempfail", client=self.host.peer_ip)
            self.host.send(REPLIES["auth_tempfail"])
        return self.exchange

    def line(self, line: bytes) -> None:
        """A client line while an exchange is open: ``*`` aborts, else base64."""
        if line is OVERLONG or len(line) > AUTH_LINE_LIMIT:
            self._drop()
            return self.host.error(REPLIES["auth_line_too_long"])
        if line == b"*":
            self._drop()
            return self.host.send(REPLIES["auth_aborted"])
        try:
            response = decode_response(line)
        except DecodeError:
            self._drop()
            return self.host.error(REPLIES["auth_bad_base64"])
        assert self.exchange is not None
        self._answer_step(self.exchange.receive(response))

    def _answer_step(self, step: "StepResult | defer.Deferred[StepResult]") -> None:
        """Answer a step now if it has finished, else be busy until it does."""
        if is_deferred(step):
            return self.host.busy_until(step, self.answer)
        try:
            later = self.answer(cast("StepResult", step))
        except Exception:
            later = defer.fail()  # the protocol's internal-error reply, as for a late step
        if later is not None:
            self.host.busy_until(later)

    def _drop(self) -> None:
        """The client ended the exchange without a verdict."""
        if self.exchange is not None:
            self.exchange.cancel()
        self._finish("aborted")

    def answer(self, result: StepResult) -> "defer.Deferred[None] | None":
        """Answer one step: the single place an AUTH outcome becomes a reply."""
        if self.host.lost:
            if isinstance(result, LoggedIn):
                result.logout()
            return None
        match result:
            case Reply():
                self.host.write(b"334 " + base64.b64encode(result.payload_bytes()) + b"\r\n")
                return None
            case LoggedIn():
                self._finish("success", result.username)
                self._logged_in(result)
                return None
            case Reject():
                self._finish("failure")
                return self._rejected(result)
            case Defer():
                # a refusal by the failure limits (no credentials checked) is "limited"
                self._finish("limited" if result is GATE_REFUSAL else "tempfail")
                self.host.send(auth_reply(result))
                if result.disconnect:
                    self.host.close()
                return None
            case _:
                assert_never(result)

    def _finish(self, result: str, user: str | None = None) -> None:
        """The exchange ended with ``result`` (a ``saslsmtp.metrics.AUTH_RESULTS`` name)."""
        if self.exchange is not None:
            self.host.events.auth_finished(self.exchange.spec.name, result, user, self.host.peer_ip)
        self.exchange = None

    def _logged_in(self, login: LoggedIn) -> None:
        self.login = login
        self.host.authenticated_as(login.avatar)
        self.failures.succeeded()
        # the success line ("auth succeeded: client= mechanism= user=") is written by the
        # AUTH guard the moment the verdict is known, beside the fail2ban failure line
        self.host.send(auth_success_reply(login.text))

    def _rejected(self, reject: Reject) -> "defer.Deferred[None] | None":
        """A permanent failure: counted, answered after the failure delay."""
        last = self.failures.failed()
        # The connection's own count (max_failures); the cross-connection limits and the
        # fail2ban line ("auth failed: client=...") are the AUTH guard's.
        log.info("AUTH failed ip={ip} ({n} of max_failures={max} on this connection)",
                 ip=self.host.peer_ip,
                 n=self.failures.failures, max=self.failures.limit)

        def answer(_: Any = None) -> None:
            self.host.send(auth_reply(reject))
            if last:
                self.host.send(REPLIES["auth_too_many_failures"])
            if last or reject.disconnect:
                self.host.close()

        if self.failures.delay > 0:
            return task.deferLater(self.clock, self.failures.delay, answer)
        answer()
        return None

    def end(self) -> bool:
        """Forget the exchange (a late login is logged out) and log out (the connection
        is lost).  ``True`` when its step must run to its end all the same (a credential
        check under the limits, whose verdict counts): the caller must not cancel it."""
        keep = False
        if self.exchange is not None:
            keep = self.exchange.cancel()
            self._finish("aborted")
        self.logout()
        return keep

    def logout(self) -> None:
        login, self.login = self.login, None
        if login is not None:
            try:
                login.logout()
            except Exception:
                log.failure("realm logout failed")
