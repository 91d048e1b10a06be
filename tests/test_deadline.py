"""The one deadline helper and the one credential coercion, on a fake clock."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from saslsmtp.deadline import DeadlineExceeded, with_deadline
from saslsmtp.octets import as_bytes, as_text


class WrappedCancel(Exception):
    """What treq does: the cancellation arrives wrapped in another error."""


def failures(d: Deferred) -> list[Failure]:
    seen: list[Failure] = []
    d.addErrback(seen.append)
    return seen


def test_a_wrapped_cancellation_after_the_deadline_is_deadline_exceeded() -> None:
    """addTimeout alone would pass WrappedCancel through; the helper says what happened."""
    clock = Clock()
    d: Deferred[str] = Deferred(lambda d: d.errback(WrappedCancel()))
    seen = failures(with_deadline(d, 2.0, clock))
    clock.advance(1.9)
    assert seen == []
    clock.advance(0.1)
    assert len(seen) == 1 and seen[0].check(DeadlineExceeded)
    assert str(seen[0].value) == "no answer within 2s" and seen[0].value.timeout == 2.0


def test_a_plain_cancellation_is_deadline_exceeded_too() -> None:
    """A Deferred without a canceller fails with CancelledError: converted the same way."""
    clock = Clock()
    seen = failures(with_deadline(Deferred(), 1.0, clock))
    clock.advance(1.0)
    assert seen[0].check(DeadlineExceeded) and not seen[0].check(CancelledError)


def test_an_answer_in_time_cancels_the_timer_and_passes_through() -> None:
    """Nothing stays scheduled once the operation is done; its result and errors are its own."""
    clock = Clock()
    d: Deferred[str] = Deferred()
    results: list[str] = []
    with_deadline(d, 5.0, clock).addCallback(results.append)
    d.callback("ok")
    assert results == ["ok"] and clock.getDelayedCalls() == []
    e: Deferred[str] = Deferred()
    seen = failures(with_deadline(e, 5.0, clock))
    e.errback(WrappedCancel())
    assert seen[0].check(WrappedCancel) and clock.getDelayedCalls() == []


def test_on_timeout_decides_the_result() -> None:
    """A caller may turn the timeout into its own error (with its own words)."""
    clock = Clock()
    d: Deferred[str] = Deferred()
    seen = failures(with_deadline(d, 1.5, clock,
                                  lambda result, timeout: Failure(KeyError(timeout))))
    clock.advance(2)
    assert seen[0].check(KeyError) and seen[0].value.args == (1.5,)


@pytest.mark.parametrize("value,raw,text", [("é", b"\xc3\xa9", "é"), (b"\xc3\xa9", b"\xc3\xa9", "é"),
                                            (bytearray(b"a"), b"a", "a")])
def test_credentials_are_utf8_both_ways(value: object, raw: bytes, text: str) -> None:
    """str and bytes name the same credential; bytes must be UTF-8 to become text."""
    assert as_bytes(value) == raw and as_text(value) == text  # type: ignore[arg-type]
    with pytest.raises(UnicodeDecodeError):
        as_text(b"\xff")
