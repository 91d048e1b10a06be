"""Logging an upstream's outages: a warning when one starts, one line when it ends.

While the upstream cannot be reached (refused, no answer, a TLS handshake or certificate
that fails, a greeting or EHLO that turns us away) every message gets a ``451`` at its
first command that needs the upstream, and each attempt failed the same way.  An
operator's alerting reads warnings: the first failure after a success is one
(``upstream NAME unreachable: WHY; ...``), the repeats within ``every`` seconds are
``info``, and the first one after that is a warning again that counts them.  The first
handshake that succeeds ends the outage: ``upstream NAME reachable again after N s``
(``info``), the words of the backends' outage log (``saslsmtp.checkers.outage``).  That
one is not reused: it names a backend and a ``454``, and during an outage it never
warns again, while an upstream down for hours should stay visible.  Only ever used on
the reactor thread.
"""

from __future__ import annotations

from typing import Callable

from twisted.logger import Logger

# the namespace operators filter on stays the one of the relay client
log = Logger(namespace="saslsmtp.relay.client")

#: Seconds within which further failures are only ``info``.
REPEAT_WARNING = 60.0


class UpstreamOutage:
    """The outage state of the upstream ``name``; ``seconds`` is its clock."""

    def __init__(self, name: str, seconds: Callable[[], float],
                 every: float = REPEAT_WARNING) -> None:
        self.name = name
        self._seconds = seconds
        self.every = every
        self.down_since: float | None = None
        self._warned_at = 0.0
        self._since_warning = 0  # failures logged at info since the last warning

    def down(self, why: str) -> None:
        """An attempt to reach the upstream failed (``why`` must hold no secret)."""
        now = self._seconds()
        if self.down_since is None:
            self.down_since = self._warned_at = now
            self._since_warning = 0
            log.warn("upstream {name} unreachable: {why}; messages get 451 until it"
                     " answers again", name=self.name, why=why)
        elif now - self._warned_at < self.every:
            self._since_warning += 1
            log.info("upstream {name} still unreachable: {why}", name=self.name, why=why)
        else:
            log.warn("upstream {name} still unreachable after {seconds:.0f} s: {why}"
                     " ({failures} failed attempts since the last warning)", name=self.name,
                     seconds=now - self.down_since, why=why,
                     failures=self._since_warning + 1)
            self._warned_at = now
            self._since_warning = 0

    def up(self) -> None:
        """A connection to the upstream completed its handshake."""
        if self.down_since is not None:
            seconds = self._seconds() - self.down_since
            self.down_since = None
            log.info("upstream {name} reachable again after {seconds:.1f} s", name=self.name,
                     seconds=seconds)
