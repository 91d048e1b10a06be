"""systemd's readiness notification (``Type=notify``), without libsystemd.

Under ``Type=exec`` systemd calls a service started as soon as twistd is executed, so
``systemctl start`` succeeded even when the listeners could not be bound a moment later.
With ``Type=notify`` it waits until the service says ``READY=1`` on the datagram socket
named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace), and a start
that exits first is a failed ``systemctl start``.  Outside systemd the variable is unset
and ``notify`` does nothing.

With ``WatchdogSec=`` systemd sets ``$WATCHDOG_USEC`` and kills (then restarts) a service
that has not said ``WATCHDOG=1`` for that long.  ``Watchdog`` says it from the reactor, at
half the interval, so a process whose reactor is stuck (an AUTH script looping forever)
stops saying it and is replaced; with workers that is the master, which watches the
workers itself (``server.worker_timeout``).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable, Mapping

from twisted.internet import task
from twisted.logger import Logger

log = Logger(namespace="saslsmtp")


def notify(state: str, environ: Mapping[str, str] = os.environ, quiet: bool = False) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to systemd; ``False`` when there is no
    notification socket or it cannot be reached (logged unless ``quiet``: systemd then
    times out)."""
    address = environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode("utf-8"))
    except OSError as e:
        if quiet:
            return False
        log.warn("cannot tell systemd {state}: {address}: {error}", state=state,
                 address=address, error=e.strerror or str(e))
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """Seconds systemd waits for ``WATCHDOG=1`` (``$WATCHDOG_USEC``), or ``None``: no
    watchdog, or one meant for another process (``$WATCHDOG_PID``, as sd_watchdog_enabled
    reads it)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if usec <= 0 or owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return usec / 1_000_000


class Watchdog:
    """``WATCHDOG=1`` every ``interval / 2`` seconds while the reactor turns.  A failed
    send is logged once (until one succeeds again), not at every tick."""

    def __init__(self, clock: Any, interval: float,
                 send: Callable[[str], bool] = lambda state: notify(state, quiet=True)) -> None:
        self.interval = interval
        self.send = send
        self.failing = False
        self.loop = task.LoopingCall(self.ping)
        self.loop.clock = clock

    def start(self) -> "Watchdog":
        self.loop.start(self.interval / 2, now=True)
        return self

    def stop(self) -> None:
        if self.loop.running:
            self.loop.stop()

    def ping(self) -> None:
        ok = self.send("WATCHDOG=1")
        if not ok and not self.failing:
            log.warn("cannot tell systemd WATCHDOG=1 on {address}: it will restart the"
                     " service after {interval:g} s", address=os.environ.get("NOTIFY_SOCKET", ""),
                     interval=self.interval)
        self.failing = not ok


def start_watchdog(clock: Any, environ: Mapping[str, str] = os.environ) -> Watchdog | None:
    """The watchdog systemd asked for (``WatchdogSec=``), started; ``None`` without one."""
    interval = watchdog_interval(environ)
    if interval is None or not environ.get("NOTIFY_SOCKET"):
        return None
    return Watchdog(clock, interval, lambda state: notify(state, environ, quiet=True)).start()
