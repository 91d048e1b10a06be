"""What the limiter answers: a ``Verdict`` (allowed, or the reply to send), a
connection's ``Admission`` and an AUTH attempt's ``AuthGate``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Verdict:
    """``allowed``, or the reply to send (``code``, ``enhanced``, ``text``) and which
    ``limit`` said no (a metrics label)."""

    allowed: bool
    code: int = 0
    enhanced: str = ""
    text: str = ""
    limit: str = ""

    def line(self) -> str:
        """The reply line without CRLF, e.g. ``421 4.7.0 Too many connections from ...``."""
        return f"{self.code} {self.enhanced} {self.text}"


ALLOWED = Verdict(True)


@dataclass
class Admission:
    """A connection's seat: ``verdict`` says whether it may stay; ``release()`` (idempotent)
    gives back its concurrency slot when the connection is lost."""

    verdict: Verdict
    _release: Callable[[], object] | None = None

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


@dataclass(frozen=True)
class AuthGate:
    """The answer before checking credentials: ``verdict`` (454 when over a failure limit)
    and ``delay``, the penalty every verdict of this attempt waits first."""

    verdict: Verdict
    address: str
    username: str
    delay: float = 0.0
    trusted: bool = False
    token: int = 0  # this attempt's place among the in-flight ones (0: none taken)
    key: str = ""  # the address's client key ("": not worked out yet)
    flights: tuple[str, ...] = ()  # the in-flight counters the token sits in
