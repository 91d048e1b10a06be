"""systemd's readiness notification (``Type=notify``), without libsystemd.

Under ``Type=exec`` systemd calls a service started as soon as twistd is executed, so
``systemctl start`` succeeded even when the listeners could not be bound a moment later.
With ``Type=notify`` it waits until the service says ``READY=1`` on the datagram socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace), and a start
that exits first is a failed ``systemctl start``.  Outside systemd the variable is unset
and ``notify`` does nothing.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping

from twisted.logger import Logger

log = Logger(namespace="saslsmtp")


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; ``False`` when there is no
    notification socket or it cannot be reached (logged: systemd then times out)."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode("utf-8"))
    except OSError as e:
        log.warn("cannot tell systemd {state}: {address}: {error}", state=state,
                 address=address, error=e.strerror or str(e))
        return False
    return True
