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
from saslsmtp.options import finite_number

__all__ = ["ALLOWED", "IN_FLIGHT_TTL", "MAX_TRACKED_ADDRESSES", "PENALTY_FIRST",
           "PENALTY_FORGET", "REMEMBERED_FAILURES", "Admission", "AuthGate", "Limiter",
           "Verdict", "user_key"]

log = Logger(namespace="saslsmtp.limits.limiter")

IN_FLIGHT_TTL = 60.0  # an admitted attempt never judged (client left mid-exchange) lapses
# An attempt that finds the failures counted so far under the limit, but not enough room
# left beside the attempts still in flight, waits for those to land (a failure counts,
# a success frees its seat) rather than being refused: only counted failures refuse.
IN_FLIGHT_RETRY = 0.025  # seconds between looks (about a batch of Redis releases)
IN_FLIGHT_WAIT = 10.0  # then it is refused after all (454), as over its limit


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
        # The failure limits on, in the order of the gate's checks (and of ``flights``).
        self._gate_limits: tuple[tuple[str, Rate], ...] = tuple(
            (name, rate) for name in ("auth_failures_per_ip", "auth_failures_per_user")
            if (rate := getattr(settings, name)) is not None)
        self._gate_rates = tuple(rate for _, rate in self._gate_limits)

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
        """Count a new connection from ``address`` and take a concurrency slot.  Cancelling
        the Deferred (the connection went away) gives a slot taken meanwhile back."""
        answer = self.seat(address)
        if not isinstance(answer, Deferred):
            return succeed(answer)
        out: Deferred[Admission] = Deferred()

        def deliver(admission: Admission) -> None:
            if out.called:  # cancelled meanwhile: give the slot back at once
                admission.release()
            else:
                out.callback(admission)
        answer.addCallback(deliver)
        return out

    def seat(self, address: str) -> "Admission | Deferred[Admission]":
        """``connection_made``'s ``Admission``, itself when the store answered at once."""
        d: Deferred[Admission] = Deferred()
        answer = self.seat_then(address, d.callback)
        return d if answer is None else answer

    def seat_then(self, address: str, then: Callable[[Admission], object]) -> "Admission | None":
        """``connection_made`` as the session asks it: the ``Admission`` itself when the
        store answers at once (memory, no limit, a trusted client); else ``None``, and
        ``then(admission)`` once the store answered (a shared store, maybe before this
        returns).  Never fails; the caller releases an admission that comes too late."""
        s = self.settings
        key, trusted = s.classify(address)
        if trusted or (s.connections_per_ip is None and s.connection_rate_per_ip is None):
            return Admission(ALLOWED)
        store: Any = self.store
        if hasattr(store, "admit_now"):  # the memory store: answered here and now
            return self._admit_now(store, key)
        admit = getattr(store, "admit_then", None)
        if admit is not None:  # one store call for both (Redis)
            self._admit_at_once(admit, key, then)
        else:
            self._admit_stepwise(key).addCallback(then)
        return None

    def _admit_stepwise(self, key: str) -> "Deferred[Admission]":
        """Over any ``RateStore``: the rate, then a slot."""
        s = self.settings
        refused = self._deny_connection

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
        return d.addCallback(rate_checked)

    def _admit_now(self, store: Any, key: str) -> Admission:
        """``seat`` over a store that answers synchronously (memory): one store call."""
        s = self.settings
        holder = next(self._holders)  # unique in this process, which is all it needs
        slot = "conn:" + key
        try:
            code = store.admit_now("connrate:" + key, s.connection_rate_per_ip, slot,
                                   s.connections_per_ip, holder)
        except Exception:
            log.failure("limits: connection check failed; allowing")
            return Admission(ALLOWED)
        if code == 2:
            if s.connections_per_ip is None:
                return Admission(ALLOWED)
            return Admission(ALLOWED, functools.partial(store.release_now, slot, holder))
        return Admission(self._deny_connection(
            "connection_rate_per_ip" if code == 0 else "connections_per_ip", key))

    def _admit_at_once(self, admit: Callable[..., Any], key: str,
                       then: Callable[[Admission], object]) -> None:
        """``seat_then`` over a shared store (Redis): one call, answered 2 (admitted), 1
        (no free slot) or 0 (over the rate); the store answers 2 when it cannot answer."""
        s = self.settings
        limit = s.connections_per_ip
        holder = f"{self._holder_prefix}:{next(self._holders)}"
        slot = "conn:" + key
        store: Any = self.store

        def decided(code: int) -> None:
            if code != 2:
                then(Admission(self._deny_connection(
                    "connection_rate_per_ip" if code == 0 else "connections_per_ip", key)))
            elif limit is None:
                then(Admission(ALLOWED))
            else:
                then(Admission(ALLOWED, functools.partial(store.release_soon, slot, holder)))
        admit("connrate:" + key, s.connection_rate_per_ip, slot, limit, holder, decided)

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
        gate = self.gate(address, username)
        return gate if isinstance(gate, Deferred) else succeed(gate)

    def gate(self, address: str, username: str) -> "AuthGate | Deferred[AuthGate]":
        """``auth_gate``'s ``AuthGate``, itself when the store answered at once."""
        d: Deferred[AuthGate] = Deferred()
        gate = self.gate_then(address, username, d.callback)
        return d if gate is None else gate

    def gate_then(self, address: str, username: str, then: Callable[[AuthGate], object],
                  until: float | None = None) -> "AuthGate | None":
        """``auth_gate`` as the session asks it: the ``AuthGate`` itself when the store
        answers at once (memory, no failure limit, a trusted client); else ``None``, and
        ``then(gate)`` once the store answered (maybe before this returns), or once the
        attempts in flight left room (``until``: when waiting for that ends)."""
        s = self.settings
        key, trusted = s.classify(address)
        if trusted:
            return AuthGate(ALLOWED, address, username, trusted=True, key=key)
        cap = s.auth_penalty_max
        delay = self.penalties.delay(key, cap) if cap > 0 else 0.0
        limits = self._gate_limits
        if not limits:
            return AuthGate(ALLOWED, address, username, delay, key=key)
        per_ip, per_user = s.auth_failures_per_ip, s.auth_failures_per_user
        flights = (("ip:" + key, "user:" + user_key(username)) if per_ip and per_user
                   else ("ip:" + key,) if per_ip else ("user:" + user_key(username),))
        store: Any = self.store
        if until is None:
            until = self.clock.seconds() + IN_FLIGHT_WAIT
        peek_used = getattr(store, "peek_used", None)
        if peek_used is not None:  # the memory store: answered here and now
            gate = self._gate_now(peek_used, flights, address, username, key, delay, until)
            if gate is None:
                self._look_again(address, username, then, until)
            return gate
        reserve = getattr(store, "reserve_then", None)
        if reserve is not None:  # shared store: check and seat in flight in one call
            self._shared_gate(reserve, flights, address, username, key, delay, then, until)
        else:
            self._gate_stepwise(flights, address, username, key, delay).addCallback(then)
        return None

    def _refuse_gate(self, limit: str, address: str, username: str, key: str,
                     delay: float) -> AuthGate:
        log.info("limits: {limit} reached for {client}; AUTH refused unchecked",
                 limit=limit, client=key)
        return AuthGate(self._deny(limit, 454, "4.7.0", "Temporary authentication failure"),
                        address, username, delay, key=key)

    def _gate_now(self, peek_used: Callable[[str, Rate, float], "int | None"],
                  flights: tuple[str, ...], address: str, username: str, key: str,
                  delay: float, until: float) -> AuthGate | None:
        """The gate over the memory store: failures counted plus attempts in flight;
        ``None`` when only the attempts in flight are in the way (look again later)."""
        now = self.clock.seconds()
        crowded = None
        for (limit, rate), flight in zip(self._gate_limits, flights):
            try:
                used = peek_used("authfail:" + flight, rate, now)
            except Exception:
                log.failure("limits: auth failure check failed; allowing")
                used = 0
            if used is None:
                return self._refuse_gate(limit, address, username, key, delay)
            if crowded is None and used + self._flying(flight, now) > rate.count:
                crowded = limit
        if crowded is not None:
            return self._refuse_gate(crowded, address, username, key, delay) if now >= until \
                else None
        return self._seat_in_flight(flights, address, username, key, delay, now)

    def _look_again(self, address: str, username: str, then: Callable[[AuthGate], object],
                    until: float) -> None:
        """The gate once more in ``IN_FLIGHT_RETRY`` seconds: the attempts in flight may
        have landed by then (a success frees its seat, a failure counts)."""
        def again() -> None:
            gate = self.gate_then(address, username, then, until)
            if gate is not None:
                then(gate)
        self.clock.callLater(IN_FLIGHT_RETRY, again)

    def _seat_in_flight(self, flights: tuple[str, ...], address: str, username: str,
                        key: str, delay: float, now: float) -> AuthGate:
        token = next(self._tokens)
        in_flight = self._in_flight
        for flight in flights:
            seats = in_flight.get(flight)
            if seats is None:
                in_flight[flight] = {token: now}
            else:
                seats[token] = now
        return AuthGate(ALLOWED, address, username, delay, token=token, key=key,
                        flights=flights)

    def _gate_stepwise(self, flights: tuple[str, ...], address: str, username: str,
                       key: str, delay: float) -> "Deferred[AuthGate]":
        """The gate over any ``RateStore``: a peek per counter."""
        limits = self._gate_limits

        def decide(results: list[RateResult]) -> AuthGate:
            now = self.clock.seconds()
            for (limit, rate), result, flight in zip(limits, results, flights):
                if not result.allowed or result.used + self._flying(flight, now) > rate.count:
                    return self._refuse_gate(limit, address, username, key, delay)
            return self._seat_in_flight(flights, address, username, key, delay, now)
        checks = [self._safe(self.store.peek("authfail:" + flight, rate), "auth failure check")
                  for (_, rate), flight in zip(limits, flights)]
        return gatherResults(checks).addCallback(decide)

    def _shared_gate(self, reserve: Callable[..., Any], flights: tuple[str, ...],
                     address: str, username: str, key: str, delay: float,
                     then: Callable[[AuthGate], object], until: float) -> None:
        """The gate over a shared store (Redis): the check and the attempt's seat among
        those in flight are one atomic call, so N processes together let no more
        attempts through than one would (the seat is left by ``auth_verdict``)."""
        token = next(self._tokens)
        limits = self._gate_limits

        def decided(refused: int) -> None:
            if refused < 0 and self.clock.seconds() < until:  # only attempts in flight
                self._look_again(address, username, then, until)
            elif refused:
                then(self._refuse_gate(limits[abs(refused) - 1][0], address, username, key,
                                       delay))
            else:
                then(AuthGate(ALLOWED, address, username, delay, token=token, key=key,
                              flights=flights))
        reserve(flights, self._gate_rates, self._flight_member(token), IN_FLIGHT_TTL, decided)

    def _flight_member(self, token: int) -> str:
        """An attempt's name in the shared in-flight sets (unique across processes)."""
        return f"{self._holder_prefix}:a{token}"

    def _flying(self, key: str, now: float) -> int:
        flights = self._in_flight.get(key)
        if not flights:
            return 0
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
            unreserve(["flight:" + k for k in gate.flights], self._flight_member(gate.token))
            return
        in_flight = self._in_flight
        for key in gate.flights:
            flights = in_flight.get(key)
            if flights is not None:
                flights.pop(gate.token, None)
                if not flights:
                    del in_flight[key]

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
        waiting = self.verdict(gate, success, username, password)
        return succeed(None) if waiting is None else waiting

    def verdict(self, gate: AuthGate, success: bool | None, username: str | None = None,
                password: bytes | str | None = None) -> "Deferred[None] | None":
        """``auth_verdict`` as the session asks it: ``None`` when there is nothing to wait
        for (no penalty, nothing counted over the network), else the Deferred."""
        pending: list[Deferred[Any]] = []
        if success is False and not gate.trusted and self._remembers_failures():
            key = gate.key or self.settings.client_key(gate.address)
            user = gate.username if username is None else username
            pending = self._count_failure(gate, key, user, password)
        else:
            if success and not gate.trusted:
                self.penalties.forgive(gate.key or self.settings.client_key(gate.address))
            self._landed(gate)
        if gate.delay <= 0:
            if not pending:
                return None
            wait = None
        else:
            wait = deferLater(self.clock, gate.delay, lambda: None)
            pending.append(wait)
        # Cancelling the result (the client left) cancels only the wait, never the counts.
        done: Deferred[None] = Deferred(lambda _: wait.cancel() if wait is not None else None)

        def finished(_: object) -> None:
            if not done.called:
                done.callback(None)
        gatherResults(pending, consumeErrors=True).addBoth(finished)
        return done

    def _count_failure(self, gate: AuthGate, key: str, user: str,
                       password: bytes | str | None) -> "list[Deferred[Any]]":
        """A wrong password: counted for the address and the user (unless this very pair
        failed from this address recently), and the attempt leaves the flight."""
        s = self.settings
        if not self.penalties.record_failure(key, user, password, self._repeat_window()):
            self._landed(gate)
            return []
        counters: list[tuple[str, Rate]] = []
        if s.auth_failures_per_ip is not None:
            counters.append(("authfail:ip:" + key, s.auth_failures_per_ip))
        if s.auth_failures_per_user is not None:
            counters.append(("authfail:user:" + user_key(user), s.auth_failures_per_user))
        land = getattr(self.store, "land", None)
        if land is not None and gate.token:  # leave the flight and count: one call
            return [land(["flight:" + k for k in gate.flights],
                         self._flight_member(gate.token), counters)]
        self._landed(gate)
        return [self._safe(self.store.hit(k, rate), "auth failure count")
                for k, rate in counters]

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
        if not finite_number(interval) or interval <= 0:
            raise ValueError("rate(): interval must be a positive number of seconds")
        key = "script:" + _raw_key(str(namespace)) + ":" + _raw_key(str(entry))
        d = self._safe(self.store.hit(key, Rate(count, float(interval))), "script rate()")
        return d.addCallback(lambda r: r.allowed)
