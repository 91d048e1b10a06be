"""The limiter as one connection sees it: one call per protocol event.

The protocol and the AUTH engine stay small: they call ``ConnectionLimits`` (one per
connection) and ``AuthAttempt`` (one per AUTH exchange) at each event and act on the
answer; what is counted where, and the fail2ban line, live here.

==============================  ================================================
event                           call
==============================  ================================================
connection made (address known) ``limits.admit_then(ip, then)`` -> ``Verdict``
                                (421), or ``None`` and ``then(verdict)`` later (a
                                shared store)
connection lost                 ``limits.release()``
AUTH exchange starts            ``attempt = limits.attempt(ip, mechanism)``
username known (Verify, Lookup) ``refusal = attempt.admit(user, password)`` (maybe a
                                Deferred)
verdict known                   ``attempt.judged(ok, username)`` (counts now;
                                ``None``, or a Deferred that fires after the penalty)
MAIL / RCPT / message stored    ``mail_allowed`` / ``recipient_allowed`` /
                                ``message_accepted``
==============================  ================================================
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred, succeed

from saslsmtp.limits import faillog
from saslsmtp.limits.limiter import ALLOWED, Admission, AuthGate, Limiter, Verdict
from saslsmtp.sasl.outcome import Defer

#: What the gate's refusal becomes: the reply text of ``Limiter.auth_gate``'s 454.
GATE_REFUSAL = Defer("Temporary authentication failure")


class AuthAttempt:
    """One AUTH exchange: admitted once its username is known, judged once its verdict is."""

    def __init__(self, limiter: Limiter, address: str, mechanism: str) -> None:
        self.limiter = limiter
        self.address = address
        self.mechanism = mechanism
        self.gate: AuthGate | None = None
        self.username: str | None = None
        self._password: str | bytes | None = None
        self.refused = False
        self.abandoned = False
        self._waiting: Deferred[Defer | None] | None = None

    @property
    def client_key(self) -> str:
        """The fair hashing pool's key for this client."""
        return self.limiter.settings.client_key(self.address) if self.address else ""

    def admit(self, username: str, password: str | bytes | None = None
              ) -> "Defer | None | Deferred[Defer | None]":
        """Before any credential is checked: ``None`` to go on, or the 454 to answer (at
        once when the store answers at once, else through a Deferred)."""
        if self.gate is not None:
            return GATE_REFUSAL if self.refused else None
        self.username = username
        self._password = password
        gate = self.limiter.gate_then(self.address, username, self._gated)
        if gate is not None:
            return self._decided(gate)
        if self.gate is not None:  # answered before gate_then returned
            return GATE_REFUSAL if self.refused else None
        waiting: Deferred[Defer | None] = Deferred()
        self._waiting = waiting
        return waiting

    def _gated(self, gate: AuthGate) -> None:
        """A shared store's answer, or the gate's once attempts in flight landed."""
        if self.abandoned:  # the exchange ended while it waited: no seat kept for it
            self.limiter.abandoned(gate)
            return
        refusal = self._decided(gate)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(refusal)

    def _decided(self, gate: AuthGate) -> Defer | None:
        self.gate = gate
        self.refused = not gate.verdict.allowed
        return GATE_REFUSAL if self.refused else None

    def abandon(self) -> None:
        """The exchange ended without a verdict (``*``, a bad line, the client left)."""
        self.abandoned = True
        if self.gate is not None:
            self.limiter.abandoned(self.gate)

    def judged(self, ok: bool | None, username: str | None = None, reason: str | None = None,
               counted: bool = True) -> "Deferred[None] | None":
        """The verdict is known: ``True`` (235), ``False`` (535), ``None`` (454, abort).

        A failure is counted and logged now, whether or not the client stays; the
        answer waits for the returned Deferred (the address's penalty, for successes
        too), or goes at once when there is nothing to wait for (``None``).  ``reason``:
        the log line's (default "invalid credentials"); ``counted=False``: a failure
        that tried no secret (EXTERNAL's certificate), logged but not counted toward
        ``auth_failures_per_ip``/``_per_user`` or the penalty."""
        tried = self.username if self.username is not None else (username or "")
        if self.refused:
            faillog.log_auth_failure(self.address, self.mechanism, tried, "too many failures")
            ok = None
        elif ok is False:
            faillog.log_auth_failure(self.address, self.mechanism, tried,
                                     reason or "invalid credentials")
            if not counted:
                ok = None
        elif ok:
            faillog.log_auth_success(self.address, self.mechanism, username or tried)
        gate = self.gate
        if gate is None:
            gate = AuthGate(ALLOWED, self.address, tried, self.limiter.penalty(self.address),
                            trusted=self.limiter.settings.is_trusted(self.address))
        password, self._password = self._password, None
        return self.limiter.verdict(gate, ok, tried, password)


class ConnectionLimits:
    """The limits of one connection: its seat, its AUTH attempts, its mail counters."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter
        self._admission: Admission | None = None
        self._then: Callable[[Verdict], object] | None = None  # who waits for the verdict
        self._waiting = False  # ``admit_then`` returned before the store answered
        self._pending: Deferred[Verdict] | None = None
        self.trusted = False  # a client in trusted_networks: its mail is not counted either

    def admit_then(self, address: str, then: Callable[[Verdict], object]) -> Verdict | None:
        """A new connection from ``address``: its verdict (``421 4.7.0`` when over a
        limit) when the store answers at once; else ``None``, and ``then(verdict)``
        once it answers, unless ``release`` came first (a seat that still comes is then
        given back).  No Deferred: over a shared store every connection waits here."""
        if not address:  # a UNIX socket: no client address to count
            return ALLOWED
        self.trusted = self.limiter.settings.is_trusted(address)
        self._then = then
        admission = self.limiter.seat_then(address, self._seated)
        if admission is None:
            admission = self._admission  # answered before seat_then returned
            if admission is None:
                self._waiting = True
                return None
        self._then = None
        self._admission = admission
        return admission.verdict

    def admit(self, address: str) -> "Verdict | Deferred[Verdict]":
        """``admit_then`` with a Deferred for the verdict that comes later; cancelled
        (and the seat that still comes given back) by ``release``."""
        pending: Deferred[Verdict] = Deferred()
        verdict = self.admit_then(address, pending.callback)
        if verdict is not None:
            return verdict
        self._pending = pending
        return pending

    def _seated(self, admission: Admission) -> None:
        """A shared store's answer."""
        if not self._waiting:  # before ``admit_then`` returned
            self._admission = admission
            return
        self._waiting = False
        then, self._then = self._then, None
        if then is None:  # the connection went away meanwhile
            admission.release()
            return
        self._admission = admission
        then(admission.verdict)

    def release(self) -> None:
        """The connection is gone: give its slot back (or stop waiting for one)."""
        self._then = None  # a seat that still comes is given back
        pending, self._pending = self._pending, None
        if pending is not None and not pending.called:
            pending.cancel()
            pending.addErrback(lambda f: None)  # the cancellation is no error
        admission, self._admission = self._admission, None
        if admission is not None:
            admission.release()

    def attempt(self, address: str, mechanism: str) -> AuthAttempt:
        return AuthAttempt(self.limiter, address, mechanism)

    def mail_allowed(self, user: str | None) -> "Deferred[Verdict]":
        if user is None or self.trusted:
            return succeed(ALLOWED)
        return self.limiter.mail_allowed(user)

    def recipient_allowed(self, user: str | None) -> "Deferred[Verdict]":
        if user is None or self.trusted:
            return succeed(ALLOWED)
        return self.limiter.recipient_allowed(user)

    def message_accepted(self, user: str | None) -> None:
        if user is not None and not self.trusted:
            self.limiter.message_accepted(user)


def refusal_line(verdict: Verdict) -> bytes:
    """The reply for a refusing ``Verdict``, with CRLF."""
    return verdict.line().encode("ascii") + b"\r\n"


__all__ = ["AuthAttempt", "ConnectionLimits", "GATE_REFUSAL", "refusal_line"]
