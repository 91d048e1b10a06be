"""``MechanismAdapter`` edge cases: what a mechanism step may return (or raise) when a
stock Twisted protocol drives it synchronously, and the credentials each outcome makes."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer

from saslsmtp.adapter import FailedExchangeChecker, IFailedExchange, MechanismAdapter
from saslsmtp.credentials import IAuthenticatedIdentity
from saslsmtp.errors import AuthRejected, TemporaryFailure
from saslsmtp.sasl import login
from saslsmtp.sasl.mechanism import MechanismSpec
from saslsmtp.sasl.outcome import Accept, Defer, Lookup, Reject, Reply, Session, Verify


class Scripted:
    """A mechanism whose ``start`` and ``receive`` return (or raise) what a test says."""

    def __init__(self, start: Callable[[], Any], receive: Callable[[bytes], Any]) -> None:
        self._start, self._receive = start, receive

    def start(self, initial: bytes | None) -> Any:
        return self._start()

    def receive(self, response: bytes) -> Any:
        return self._receive(response)


def adapter(start: Callable[[], Any], receive: Callable[[bytes], Any] = lambda r: Reply(b"")
            ) -> MechanismAdapter:
    spec = MechanismSpec("X-TEST", lambda session: Scripted(start, receive))
    return MechanismAdapter(spec, Session())


def failure_of(a: MechanismAdapter) -> Reject | Defer | None:
    assert IFailedExchange.providedBy(a)
    return a.failure


def boom() -> Any:
    raise RuntimeError("mechanism bug")


def test_a_step_that_raises_is_a_temporary_failure() -> None:
    """A mechanism bug is 454 for the client, not a traceback."""
    first = adapter(boom)
    assert first.getChallenge() == b"" and not first.moreChallenges()
    assert failure_of(first) == Defer("Mechanism error")
    a = adapter(lambda: Reply(b"go on"), lambda r: boom())
    assert a.getChallenge() == b"go on" and a.moreChallenges()
    a.setResponse(b"x")
    assert not a.moreChallenges()
    assert failure_of(a) == Defer("Mechanism error")


def test_an_unfired_deferred_is_waited_for_by_the_checker() -> None:
    """A last step that is still pending is not cancelled: the exchange checker waits
    for it inside ``portal.login`` and logs in whom its ``Accept`` names."""
    pending: defer.Deferred[Any] = defer.Deferred()
    a = adapter(lambda: Reply(b"?"), lambda r: pending)
    a.setResponse(b"x")
    assert not a.moreChallenges() and a.pending is not None
    result = FailedExchangeChecker().requestAvatarId(a)
    assert not result.called
    pending.callback(Accept("bob"))
    assert result.result == b"bob"


def test_an_unfired_step_that_wants_another_challenge_is_reported() -> None:
    """A stock protocol cannot send a challenge that arrives late: a temporary failure
    that says so, not a hang."""
    pending: defer.Deferred[Any] = defer.Deferred()
    a = adapter(lambda: Reply(b"?"), lambda r: pending)
    a.setResponse(b"x")
    result = FailedExchangeChecker().requestAvatarId(a)
    pending.callback(Reply(b"more"))
    failures: list[Any] = []
    result.addErrback(failures.append)
    assert failures and failures[0].check(TemporaryFailure)
    assert "another challenge" in str(failures[0].value)


def test_a_fired_deferred_gives_its_outcome() -> None:
    """A step that already fired (a synchronous script) counts like a plain return."""
    a = adapter(lambda: defer.succeed(Verify("bob", "pw")))
    assert IUsernamePassword.providedBy(a)
    assert (a.username, a.password) == (b"bob", b"pw")
    assert a.checkPassword(b"pw") and a.checkPassword("pw")
    assert not a.checkPassword(b"other")


def test_a_fired_deferred_with_something_else_is_a_mechanism_error() -> None:
    """A Deferred that fired with a non-outcome value (or a failure) is 454."""
    assert failure_of(adapter(lambda: defer.succeed("not an outcome"))) == Defer("Mechanism error")
    failed = adapter(lambda: defer.fail(RuntimeError("script error")))
    assert failure_of(failed) == Defer("Mechanism error")


@pytest.mark.parametrize("name", ["carol", b"carol"])
def test_accept_with_a_username_is_an_authenticated_identity(name: str | bytes) -> None:
    """``Accept(username)`` (text or bytes) becomes ``IAuthenticatedIdentity``."""
    a = adapter(lambda: Accept(name))
    assert IAuthenticatedIdentity.providedBy(a)
    assert a.username == b"carol"
    assert repr(a) == "<MechanismAdapter X-TEST username=b'carol'>"


def test_accept_without_a_username_defers() -> None:
    """An ``Accept`` that names nobody cannot log anyone in: temporary failure."""
    assert failure_of(adapter(lambda: Accept())) == Defer("Mechanism accepted nobody")


def test_lookup_defers_in_a_stock_protocol() -> None:
    """Stored-secret mechanisms need a secret source (``embed.challengers(secrets=...)``)."""
    a = adapter(lambda: Lookup("dave", ("plaintext",)))
    assert failure_of(a) == Defer("No secret source for this mechanism")


def test_reject_and_defer_become_failed_exchanges() -> None:
    """Reject -> AuthRejected (535); Defer -> TemporaryFailure (454), each with its outcome."""
    checker = FailedExchangeChecker()
    rejected = adapter(lambda: Reject("no"))
    errors: list[Any] = []
    checker.requestAvatarId(rejected).addErrback(errors.append)
    deferred = adapter(lambda: Defer("later"))
    checker.requestAvatarId(deferred).addErrback(errors.append)
    assert errors[0].check(AuthRejected) and errors[0].value.outcome == Reject("no")
    assert errors[1].check(TemporaryFailure) and errors[1].value.outcome == Defer("later")


def test_set_response_after_the_end_is_ignored() -> None:
    """A stray ``setResponse`` once the exchange is over changes nothing."""
    a = adapter(lambda: Verify("bob", "pw"))
    a.setResponse(b"more")
    assert (a.username, a.password) == (b"bob", b"pw")


def test_login_through_the_adapter() -> None:
    """The LOGIN prompts in order, then the credentials."""
    a = MechanismAdapter(login.SPEC)
    assert a.getChallenge() == b"Username:"
    a.setResponse(b"erin")
    assert a.getChallenge() == b"Password:"
    a.setResponse(b"pw")
    assert not a.moreChallenges()
    assert (a.username, a.password) == (b"erin", b"pw")
