"""``result_now``: a fired Deferred's result at once, a waiting one untouched."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from saslsmtp.settled import is_deferred, result_now


def test_plain_values_pass_through() -> None:
    assert result_now(7) == 7
    assert result_now(None) is None


def test_a_fired_deferred_gives_its_result() -> None:
    assert result_now(defer.succeed("done")) == "done"


def test_a_failed_deferred_gives_its_failure_handled() -> None:
    """The Failure is returned (and the Deferred no longer holds an unhandled error)."""
    d = defer.fail(ValueError("x"))
    out = result_now(d)
    assert isinstance(out, Failure) and out.check(ValueError)
    seen: list[Any] = []
    d.addBoth(seen.append)
    assert seen == [None]


def test_a_waiting_deferred_is_returned_and_its_result_flows_on() -> None:
    d: defer.Deferred[str] = defer.Deferred()
    assert result_now(d) is d
    seen: list[Any] = []
    d.addCallback(seen.append)
    d.callback("later")
    assert seen == ["later"]


def test_a_paused_deferred_is_returned_and_its_result_flows_on() -> None:
    """Fired but waiting on another Deferred: its result is not there yet either."""
    inner: defer.Deferred[str] = defer.Deferred()
    d: defer.Deferred[str] = defer.succeed("first")
    d.addCallback(lambda _: inner)
    assert result_now(d) is d
    seen: list[Any] = []
    d.addCallback(seen.append)
    inner.callback("later")
    assert seen == ["later"]


def test_is_deferred_agrees_with_isinstance() -> None:
    """The per-type answer is isinstance's, for Deferreds, their subclasses and the
    plain values AUTH steps return, asked more than once (the cached answer)."""
    from twisted.internet.defer import DeferredList

    class Later(defer.Deferred):  # type: ignore[type-arg]
        pass

    values = [defer.Deferred(), defer.succeed(1), Later(), DeferredList([]), None, 1, "x",
              b"x", object(), defer.Deferred, Failure(ValueError("x"))]
    for _ in range(2):
        for value in values:
            assert is_deferred(value) is isinstance(value, defer.Deferred), value


def test_is_deferred_keeps_no_type_alive_for_ever() -> None:
    """Classes made at run time (a reloaded AUTH script's) do not pile up in the per-type
    answers: past a bound they are forgotten, and the answers stay right."""
    import gc
    import weakref

    from saslsmtp import settled

    made = [type(f"Outcome{i}", (), {}) for i in range(settled._TYPES_KEPT + 10)]
    first = weakref.ref(made[0])
    for kind in made:
        assert is_deferred(kind()) is False
    assert len(settled._IS_DEFERRED) <= settled._TYPES_KEPT
    del made, kind
    gc.collect()
    assert first() is None
    assert is_deferred(defer.Deferred()) is True and is_deferred(None) is False
