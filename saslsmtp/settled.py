"""Deferreds that have already fired, taken at once.

Most AUTH steps finish synchronously (a users-file entry, the memory limits store): the
Deferreds on the way have fired before anyone looks at them.  Taking their results at
once, instead of chaining more callbacks, spares a session a dozen callback hops.
"""

from __future__ import annotations

from typing import Any, TypeGuard

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

_IS_DEFERRED: dict[type, bool] = {}  # per type; emptied when it grows past _TYPES_KEPT
_TYPES_KEPT = 256  # classes of reloaded AUTH scripts must not be kept alive for ever


def is_deferred(value: object) -> "TypeGuard[Deferred[Any]]":
    """``isinstance(value, Deferred)``, without its price when ``value`` is something
    else.  ``Deferred`` is an ``Awaitable``, so ``isinstance`` goes through ``ABCMeta``:
    0.12 µs for a value that is not a Deferred, against 0.05 µs for this dict lookup,
    and an AUTH exchange asks a dozen times."""
    kind = type(value)
    answer = _IS_DEFERRED.get(kind)
    if answer is None:
        if len(_IS_DEFERRED) >= _TYPES_KEPT:
            _IS_DEFERRED.clear()
        answer = _IS_DEFERRED[kind] = issubclass(kind, Deferred)
    return answer


def result_now(value: Any) -> Any:
    """``value`` itself unless it is a Deferred; the result (maybe a ``Failure``, then
    handled) of a Deferred that has already fired; else the Deferred, untouched (its
    result will flow on to the callbacks added later)."""
    if not is_deferred(value):
        return value
    if not value.called:  # still waiting (a Redis store's gate): nothing to take, no hop
        return value
    if not value.paused:
        # Fired and not waiting on another Deferred: every callback has run (this is never
        # called from inside ``value``'s own callbacks), so the result is read directly.
        result = value.result
        if not isinstance(result, Failure) and not is_deferred(result):
            return result
    box: list[Any] = []
    waiting = False

    def take(result: Any) -> Any:
        if waiting:
            return result  # fired later: pass it on
        box.append(result)
        return None
    value.addBoth(take)
    waiting = True
    return box[0] if box else value
