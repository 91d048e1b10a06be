"""``Limiter``: the one object the SMTP protocol asks about abuse limits.

Every call answers through a Deferred and never fails: a store error allows (fail open,
as Postfix's anvil and Dovecot do) and is logged by the store.  Trusted networks are
never limited nor counted.  The calls, in session order:

================================  =============================================  ==========
when                              call                                           over limit
================================  =============================================  ==========
connection made                   ``admission = await connection_made(ip)``      ``421 4.7.0``
connection lost                   ``admission.release()`` (or cancel the pending Deferred)
AUTH, before checking credentials ``gate = await auth_gate(ip, username)``       ``454 4.7.0``
AUTH verdict known                ``await auth_verdict(gate, ok, username, pw)``
MAIL FROM                         ``await mail_allowed(user)``                   ``452 4.7.1``
message accepted (after DATA)     ``await message_accepted(user)``
RCPT TO                           ``await recipient_allowed(user)``              ``452 4.7.1``
AUTH script ``rate()``            ``await rate(namespace, entry, count, secs)``  ``False``
================================  =============================================  ==========

``ok`` is True for a 235, False for a 535 (wrong credentials), None when nothing was
judged (the gate's 454, a backend's 454, an abort).  Failures are counted when
``auth_verdict`` is called, i.e. the moment the credentials are
found wrong, before any delay, so a client that hangs up early is counted all the same.
A failure that repeats the same username and password from the same address (a client
retrying a saved wrong password) is not counted again: the limiter keeps, per address, an
HMAC of recent failed (username, password) pairs under a key random to this process,
never the password.  A success resets nothing shared: the per-user failure counter keeps
what other addresses did.

The penalty (``auth_penalty_max`` > 0, as Dovecot's auth penalty): an address with recent
failures waits 2, 4, 8, ... seconds (up to the cap) before *every* verdict, successes
included, so the timing of an answer tells nothing; ``auth_verdict`` fires after it.
A success clears the penalty of its own address.  The penalty and the failed-credential
HMACs are kept by ``penalty.AuthPenalties``; the answers are the values in ``verdicts``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import uuid
from collections import Counter
from typing import Any, Callable

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from saslsmtp.events import NO_METRICS
from saslsmtp.limits.penalty import (MAX_TRACKED_ADDRESSES, PENALTY_FIRST, PENALTY_FORGET,
                                     REMEMBERED_FAILURES, AuthPenalties)
from saslsmtp.limits.settings import LimitsSettings, Rate
from saslsmtp.limits.store import ALLOW, RateResult, RateStore
from saslsmtp.limits.verdicts import ALLOWED, Admission, AuthGate, Verdict

__all__ = ["ALLOWED", "IN_FLIGHT_TTL", "MAX_TRACKED_ADDRESSES", "PENALTY_FIRST",
           "PENALTY_FORGET", "REMEMBERED_FAILURES", "Admission", "AuthGate", "Limiter",
           "Verdict", "user_key"]

log = Logger(namespace="saslsmtp.limits.limiter")

IN_FLIGHT_TTL = 60.0  # an admitted attempt never judged (client left mid-exchange) lapses


@functools.lru_cache(maxsize=4096)  # a session asks for the same name several times
def user_key(username: str) -> str:
    """A store key part for a username: case-folded (so case variants share one counter),
    hashed when long or containing anything but printable non-space characters."""
    folded = username.casefold()
    if len(folded) <= 128 and folded.isprintable() and not any(c.isspace() for c in folded):
        return "u:" + folded
    return "h:" + hashlib.sha256(folded.encode("utf-8", "surrogatepass")).hexdigest()


def _raw_key(text: str) -> str:
    """A store key part for an arbitrary string, kept exact (no case folding)."""
    if len(text) <= 128 and text.isprintable() and ":" not in text and " " not in text:
        return "r:" + text
    return "h:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Limiter:
    """Abuse limits over a ``RateStore``; see the module docstring for the call order."""

    def __init__(self, settings: LimitsSettings, store: RateStore, clock: IReactorTime, *,
                 holder_prefix: str | None = None, secret: bytes | None = None) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.rejects: Counter[str] = Counter()  # limit name -> verdicts that said no
        self._holder_prefix = holder_prefix or f"{uuid.uuid4().hex[:12]}:{os.getpid()}"
        self._holders = itertools.count(1)
        self.penalties = AuthPenalties(clock, secret)
        self.metrics: Any = NO_METRICS  # set by the service: limit_rejected(name)
        # Attempts admitted by the gate whose verdict is not known yet, per counter key:
        # they count against the limit, so guesses run in parallel (or a client that
        # hangs up before its verdict) get no more through than guesses one at a time.
        self._in_flight: dict[str, dict[int, float]] = {}
        self._tokens = itertools.count(1)

    def carry_over(self, old: "Limiter") -> None:
        """A reload built this limiter to replace ``old``: keep what ``old`` knows of the
        clients (the penalties and failed-credential HMACs, the attempts in flight), so
        an operator's reload never hands an attacker a fresh budget."""
        self.penalties = old.penalties
        self._in_flight = old._in_flight
        self._tokens = old._tokens
        self._holder_prefix = old._holder_prefix
        self._holders = old._holders

    # ---- helpers -------------------------------------------------------------------

    def _safe(self, d: "Deferred[RateResult]", what: str) -> "Deferred[RateResult]":
        def failed(f: Failure) -> RateResult:
            log.failure("limits: {what} failed; allowing", f, what=what)
            return ALLOW
        return d.addErrback(failed)

    def _deny(self, limit: str, code: int, enhanced: str, text: str) -> Verdict:
        self.rejects[limit] += 1
        self.metrics.limit_rejected(limit)
        return Verdict(False, code, enhanced, text, limit)

    # ---- connections ---------------------------------------------------------------

    @property
    def counts_connections(self) -> bool:
        """Whether a connection limit is set (otherwise admission always allows)."""
        s = self.settings
        return s.connections_per_ip is not None or s.connection_rate_per_ip is not None

    def connection_made(self, address: str) -> "Deferred[Admission]":
        """Count a new connection from ``address`` and take a concurrency slot."""
        s = self.settings
        if s.is_trusted(address) or (s.connections_per_ip is None
                                     and s.connection_rate_per_ip is None):
            return succeed(Admission(ALLOWED))
        key = s.client_key(address)
        refused = self._deny_connection
        admit = getattr(self.store, "admit", None)
        if admit is not None:  # one store call for both (Redis)
            return self._admit_at_once(admit, key)
        if hasattr(self.store, "acquire_now"):  # the memory store: answered here and now
            return succeed(self._admit_now(key))

        def rate_checked(result: RateResult) -> "Deferred[Admission] | Admission":
            if not result.allowed:
                return Admission(refused("connection_rate_per_ip", key))
            if s.connections_per_ip is None:
                return Admission(ALLOWED)
            holder = f"{self._holder_prefix}:{next(self._holders)}"
            slot = "conn:" + key
            d = self.store.acquire(slot, s.connections_per_ip, holder)

            def acquired(ok: bool) -> Admission:
                if not ok:
                    return Admission(refused("connections_per_ip", key))
                return Admission(ALLOWED, lambda: self.store.release(slot, holder)
                                 .addErrback(lambda f: None))

            def failed(f: Failure) -> Admission:
                log.failure("limits: concurrency check failed; allowing", f)
                return Admission(ALLOWED)
            return d.addCallbacks(acquired, failed)

        d: Deferred[Any]
        if s.connection_rate_per_ip is None:
            d = succeed(ALLOW)
        else:
            d = self._safe(self.store.hit("connrate:" + key, s.connection_rate_per_ip),
                           "connection rate check")
        d.addCallback(rate_checked)
        # Cancelled (the connection went away while the store answered): a slot taken
        # after all is given back at once, so nothing leaks.
        out: Deferred[Admission] = Deferred()

        def deliver(admission: Any) -> None:
            if out.called:
                admission.release()
            else:
                out.callback(admission)
        d.addCallback(deliver)
        return out

    def _admit_now(self, key: str) -> Admission:
        """``connection_made`` over a store that answers synchronously (memory)."""
        s = self.settings
        store: Any = self.store
        try:
            if s.connection_rate_per_ip is not None and \
                    not store.hit_now("connrate:" + key, s.connection_rate_per_ip).allowed:
                return Admission(self._deny_connection("connection_rate_per_ip", key))
            if s.connections_per_ip is None:
                return Admission(ALLOWED)
            holder = f"{self._holder_prefix}:{next(self._holders)}"
            slot = "conn:" + key
            if not store.acquire_now(slot, s.connections_per_ip, holder):
                return Admission(self._deny_connection("connections_per_ip", key))
        except Exception:
            log.failure("limits: connection check failed; allowing")
            return Admission(ALLOWED)
        return Admission(ALLOWED, lambda: self.store.release(slot, holder)
                         .addErrback(lambda f: None))

    def _admit_at_once(self, admit: Callable[..., Any], key: str) -> "Deferred[Admission]":
        s = self.settings
        holder = f"{self._holder_prefix}:{next(self._holders)}"
        slot = "conn:" + key
        d = admit("connrate:" + key, s.connection_rate_per_ip, slot, s.connections_per_ip,
                  holder)

        def decided(answer: tuple[bool, bool]) -> Admission:
            rate_ok, seated = answer
            if not rate_ok:
                return Admission(self._deny_connection("connection_rate_per_ip", key))
            if not seated:
                return Admission(self._deny_connection("connections_per_ip", key))
            if s.connections_per_ip is None:
                return Admission(ALLOWED)
            return Admission(ALLOWED, lambda: self.store.release(slot, holder)
                             .addErrback(lambda f: None))

        def failed(f: Failure) -> Admission:
            log.failure("limits: connection check failed; allowing", f)
            return Admission(ALLOWED)
        d.addCallbacks(decided, failed)
        out: Deferred[Admission] = Deferred()

        def deliver(admission: Admission) -> None:
            if out.called:  # cancelled meanwhile: give the slot back at once
                admission.release()
            else:
                out.callback(admission)
        d.addCallback(deliver)
        return out

    def _deny_connection(self, limit: str, key: str) -> Verdict:
        log.info("limits: {limit} reached for {client}", limit=limit, client=key)
        return self._deny(limit, 421, "4.7.0", f"Too many connections from {key}")

    # ---- AUTH ----------------------------------------------------------------------

    def penalty(self, address: str) -> float:
        """Seconds the next verdict for ``address`` waits (0 without recent failures)."""
        if self.settings.auth_penalty_max <= 0:
            return 0.0
        return self.penalties.delay(self.settings.client_key(address),
                                    self.settings.auth_penalty_max)

    def auth_gate(self, address: str, username: str) -> "Deferred[AuthGate]":
        """Before checking credentials: is ``address`` or ``username`` over its failure
        limit?  If so the verdict is ``454 4.7.0`` and the credentials must not be checked."""
        s = self.settings
        if s.is_trusted(address):
            return succeed(AuthGate(ALLOWED, address, username, trusted=True))
        delay = self.penalty(address)
        limits = [name for name in ("auth_failures_per_ip", "auth_failures_per_user")
                  if getattr(s, name) is not None]
        if not limits:
            return succeed(AuthGate(ALLOWED, address, username, delay))
        keys = self._flight_keys(address, username)

        def decide(results: list[RateResult]) -> AuthGate:
            for limit, result, key in zip(limits, results, keys):
                rate = getattr(s, limit)
                if not result.allowed or result.used + self._flying(key) > rate.count:
                    log.info("limits: {limit} reached for {client}; AUTH refused unchecked",
                             limit=limit, client=s.client_key(address))
                    return AuthGate(self._deny(limit, 454, "4.7.0",
                                               "Temporary authentication failure"),
                                    address, username, delay)
            token = next(self._tokens)
            now = self.clock.seconds()
            for key in keys:
                self._in_flight.setdefault(key, {})[token] = now
            return AuthGate(ALLOWED, address, username, delay, token=token)
        counters = [(key, getattr(s, limit))
                    for limit, key in zip(limits, self._gate_keys(address, username))]
        reserve = getattr(self.store, "reserve", None)
        if reserve is not None:  # shared store: check and seat in flight in one call
            return self._shared_gate(reserve, counters, keys, limits, address, username, delay)
        peek_many = getattr(self.store, "peek_many", None)
        if peek_many is not None and len(counters) > 1:  # one store call for both (Redis)
            return self._safe_many(peek_many(counters), len(counters)).addCallback(decide)
        peek_now = getattr(self.store, "peek_now", None)
        if peek_now is not None:  # the memory store: answered here and now
            try:
                return succeed(decide([peek_now(key, rate) for key, rate in counters]))
            except Exception:
                log.failure("limits: auth failure check failed; allowing")
                return succeed(decide([ALLOW] * len(counters)))
        checks = [self._safe(self.store.peek(key, rate), "auth failure check")
                  for key, rate in counters]
        return gatherResults(checks).addCallback(decide)

    def _shared_gate(self, reserve: Callable[..., Any], counters: list[tuple[str, Rate]],
                     keys: list[str], limits: list[str], address: str, username: str,
                     delay: float) -> "Deferred[AuthGate]":
        """The gate over a shared store (Redis): the check and the attempt's seat among
        those in flight are one atomic call, so N processes together let no more
        attempts through than one would (the seat is left by ``auth_verdict``)."""
        token = next(self._tokens)

        def decided(refused: int) -> AuthGate:
            if refused:
                limit = limits[refused - 1]
                log.info("limits: {limit} reached for {client}; AUTH refused unchecked",
                         limit=limit, client=self.settings.client_key(address))
                return AuthGate(self._deny(limit, 454, "4.7.0",
                                           "Temporary authentication failure"),
                                address, username, delay)
            return AuthGate(ALLOWED, address, username, delay, token=token)
        d = reserve(counters, ["flight:" + k for k in keys], self._flight_member(token),
                    IN_FLIGHT_TTL)

        def failed(f: Failure) -> int:
            log.failure("limits: auth failure check failed; allowing", f)
            return 0
        return d.addErrback(failed).addCallback(decided)

    def _flight_member(self, token: int) -> str:
        """An attempt's name in the shared in-flight sets (unique across processes)."""
        return f"{self._holder_prefix}:a{token}"

    def _gate_keys(self, address: str, username: str) -> list[str]:
        """The store counters ``auth_gate`` peeks at, in order (``authfail:`` + the
        attempt's in-flight key)."""
        return ["authfail:" + key for key in self._flight_keys(address, username)]

    def _safe_many(self, d: "Deferred[list[RateResult]]", n: int) -> "Deferred[list[RateResult]]":
        def failed(f: Failure) -> list[RateResult]:
            log.failure("limits: auth failure check failed; allowing", f)
            return [ALLOW] * n
        return d.addErrback(failed)

    def _flight_keys(self, address: str, username: str) -> list[str]:
        """The in-flight counters of an attempt, in the order of ``auth_gate``'s checks."""
        s = self.settings
        keys = []
        if s.auth_failures_per_ip is not None:
            keys.append("ip:" + s.client_key(address))
        if s.auth_failures_per_user is not None:
            keys.append("user:" + user_key(username))
        return keys

    def _flying(self, key: str) -> int:
        flights = self._in_flight.get(key)
        if not flights:
            return 0
        now = self.clock.seconds()
        for token, since in list(flights.items()):
            if now - since > IN_FLIGHT_TTL:
                del flights[token]
        if not flights:
            del self._in_flight[key]
        return len(flights)

    def abandoned(self, gate: AuthGate) -> None:
        """The attempt ended without a verdict (the client aborted or left): it stops
        counting as in flight at once."""
        self._landed(gate)

    def _landed(self, gate: AuthGate) -> None:
        """The attempt's verdict is known: it no longer counts as in flight."""
        if not gate.token:
            return
        unreserve = getattr(self.store, "unreserve", None)
        if unreserve is not None:
            unreserve(["flight:" + k for k in self._flight_keys(gate.address, gate.username)],
                      self._flight_member(gate.token))
            return
        for key in self._flight_keys(gate.address, gate.username):
            flights = self._in_flight.get(key)
            if flights is not None:
                flights.pop(gate.token, None)
                if not flights:
                    del self._in_flight[key]

    def _remembers_failures(self) -> bool:
        """Failures are remembered per address only when something uses them (the penalty,
        a failure limit): otherwise every client address that ever failed would cost a
        record."""
        s = self.settings
        return (s.auth_penalty_max > 0 or s.auth_failures_per_ip is not None
                or s.auth_failures_per_user is not None)

    def _repeat_window(self) -> float:
        s = self.settings
        periods = [r.period for r in (s.auth_failures_per_ip, s.auth_failures_per_user) if r]
        return max(periods, default=PENALTY_FORGET)

    def auth_verdict(self, gate: AuthGate, success: bool | None, username: str | None = None,
                     password: bytes | str | None = None) -> "Deferred[None]":
        """The verdict of the attempt ``gate`` admitted (or refused) is known.

        ``success``: ``True`` (235), ``False`` (wrong credentials: 535), or ``None`` when
        no credentials were judged (the gate refused: 454; the backends failed
        temporarily: 454; the client aborted): nothing is counted, only the wait applies.
        A failure is counted now for the address and for ``username`` (default: the gate's), unless
        the same username and password already failed from this address recently.
        ``password`` is used only for that HMAC; ``None`` (mechanisms that never show it)
        counts every failure.  The Deferred fires after the gate's penalty delay; the
        protocol sends the verdict then (and ``failure_delay`` on top for a 535).
        """
        s = self.settings
        pending: list[Deferred[Any]] = []
        land = getattr(self.store, "land", None)
        counted = False
        if not gate.trusted:
            key = s.client_key(gate.address)
            user = gate.username if username is None else username
            if success:
                self.penalties.forgive(key)
            elif success is False and self._remembers_failures() and \
                    self.penalties.record_failure(key, user, password, self._repeat_window()):
                counted = True
                counters: list[tuple[str, Rate]] = []
                if s.auth_failures_per_ip is not None:
                    counters.append(("authfail:ip:" + key, s.auth_failures_per_ip))
                if s.auth_failures_per_user is not None:
                    counters.append(("authfail:user:" + user_key(user),
                                     s.auth_failures_per_user))
                if land is not None and gate.token:  # leave the flight and count: one call
                    flights = ["flight:" + k
                               for k in self._flight_keys(gate.address, gate.username)]
                    pending.append(land(flights, self._flight_member(gate.token), counters))
                else:
                    pending += [self._safe(self.store.hit(k, rate), "auth failure count")
                                for k, rate in counters]
        if not (counted and land is not None and gate.token):
            self._landed(gate)
        wait = deferLater(self.clock, gate.delay, lambda: None) if gate.delay > 0 else None
        if wait is not None:
            pending.append(wait)
        if not pending:
            return succeed(None)
        # Cancelling the result (the client left) cancels only the wait, never the counts.
        done: Deferred[None] = Deferred(lambda _: wait.cancel() if wait is not None else None)

        def finished(_: object) -> None:
            if not done.called:
                done.callback(None)
        gatherResults(pending, consumeErrors=True).addBoth(finished)
        return done

    # ---- messages ------------------------------------------------------------------

    def mail_allowed(self, user: str) -> "Deferred[Verdict]":
        """At MAIL FROM: may ``user`` (the authenticated login) send one more message?"""
        rate = self.settings.messages_per_user
        if rate is None:
            return succeed(ALLOWED)
        d = self._safe(self.store.peek("msg:" + user_key(user), rate), "message limit check")
        return d.addCallback(lambda r: ALLOWED if r.allowed else self._deny(
            "messages_per_user", 452, "4.7.1", "Too many messages, try again later"))

    def message_accepted(self, user: str) -> "Deferred[None]":
        """After a message was accepted (250 to the final dot): count it for ``user``."""
        rate = self.settings.messages_per_user
        if rate is None:
            return succeed(None)
        return self._safe(self.store.hit("msg:" + user_key(user), rate),
                          "message count").addCallback(lambda _: None)

    def recipient_allowed(self, user: str) -> "Deferred[Verdict]":
        """At RCPT TO: count one recipient for ``user`` if within the limit."""
        rate = self.settings.recipients_per_user
        if rate is None:
            return succeed(ALLOWED)
        d = self._safe(self.store.hit("rcpt:" + user_key(user), rate), "recipient limit check")
        return d.addCallback(lambda r: ALLOWED if r.allowed else self._deny(
            "recipients_per_user", 452, "4.7.1", "Too many recipients, try again later"))

    # ---- scripts -------------------------------------------------------------------

    def rate(self, namespace: str, entry: str, count: int, interval: float) -> "Deferred[bool]":
        """Halon's ``rate()``: count one hit for ``entry`` in ``namespace``; ``True`` while
        it stays within ``count`` hits per ``interval`` seconds (same store as the limits)."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError("rate(): count must be a positive integer")
        if not interval > 0:
            raise ValueError("rate(): interval must be a positive number of seconds")
        key = "script:" + _raw_key(str(namespace)) + ":" + _raw_key(str(entry))
        d = self._safe(self.store.hit(key, Rate(count, float(interval))), "script rate()")
        return d.addCallback(lambda r: r.allowed)
