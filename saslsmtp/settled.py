"""Deferreds that have already fired, taken at once.

Most AUTH steps finish synchronously (a users-file entry, the memory limits store): the
Deferreds on the way have fired before anyone looks at them.  Taking their results at
once, instead of chaining more callbacks, spares a session a dozen callback hops.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred


def result_now(value: Any) -> Any:
    """``value`` itself unless it is a Deferred; the result (maybe a ``Failure``, then
    handled) of a Deferred that has already fired; else the Deferred, untouched (its
    result will flow on to the callbacks added later)."""
    if not isinstance(value, Deferred):
        return value
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
