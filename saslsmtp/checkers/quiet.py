"""Backend connections that Twisted does not announce in the log.

Every ``Factory`` is ``noisy`` by default: ``Starting factory <...>`` and ``Stopping
factory <...>`` at info level each time a client connection is made and ends.  A backend
connects for logins all day (the ``smtp`` backend once per login), so those two lines
would outnumber the log lines about the logins themselves.  These factories are the
same, quiet; Twisted's own classes are left as they are.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory

__all__ = ["QuietFactory", "connect_protocol"]



class QuietFactory(Factory):
    """A ``Factory`` that logs nothing when its connections start and stop
    (``QuietFactory.forProtocol(build)`` as with ``Factory``)."""

    noisy = False


class _OneConnection(QuietFactory):
    """``connectProtocol``'s one-shot factory, quiet."""

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self._protocol


def connect_protocol(endpoint: IStreamClientEndpoint, protocol: Any) -> "Deferred[Any]":
    """``twisted.internet.endpoints.connectProtocol`` without its two log lines."""
    return endpoint.connect(_OneConnection(protocol))
