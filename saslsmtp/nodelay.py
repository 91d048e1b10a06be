"""``no_delay``: Nagle's algorithm off on a session's TCP connection.

SMTP is request/response, and a TLS session writes twice in a row without the client
answering in between: the handshake flight, then the session tickets OpenSSL issues when
the handshake completes.  The client's next command (EHLO) can leave before the tickets
arrive, so it does not acknowledge them, and with Nagle on the kernel holds the EHLO
reply until the client's delayed ACK (tens of milliseconds) comes.  Twisted leaves Nagle
on; asyncio turns it off for every TCP transport.  Replies are written whole (one write
per reply, Twisted's TLS layer joins the writes of one reactor turn), so turning it off
adds no small packets.
"""

from __future__ import annotations

from typing import Any


def no_delay(transport: Any) -> bool:
    """Set TCP_NODELAY on the TCP connection under ``transport``, looking through
    wrappers (an ``ssl:`` listener's TLS layer, the PROXY-protocol wrapper); ``False``
    when there is none (a UNIX socket, a test transport without it)."""
    for _ in range(4):
        if transport is None:
            return False
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if callable(set_no_delay):
            set_no_delay(True)
            return True
        transport = getattr(transport, "transport", None)
    return False
