"""SIGHUP and SIGUSR1 while saslsmtp starts, before its own handlers are installed.

Their default action ends the process, and a start can take a while: the configuration
check imports the AUTH script (which may read a big file or ask a server), a master
waits up to a minute for its workers to import it too.  logrotate's ``postrotate``, a
config-management run or ``systemctl kill -s HUP`` can send one at exactly that time.
Meanwhile they are only noted (``hold``); once the daemon serves, ``report`` logs one
line per signal received and nothing else happens: a SIGHUP during the start asks for
the configuration being loaded anyway (it is the newest), and a SIGUSR1 finds no log
file saslsmtp has rotated or renamed yet.  The handlers that replace these later (the
reload, the log rotation) are installed as before.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

#: The signals held during the start; their default action would end the process.
HELD = (signal.SIGHUP, signal.SIGUSR1)

#: Why a held signal changed nothing, for its log line.
WHY = {
    signal.SIGHUP: "the configuration being loaded is already the newest",
    signal.SIGUSR1: "no log file had been rotated or renamed by saslsmtp yet",
}


class HeldSignals:
    """The held signals of this process (``received``, in the order they first came)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._blocked = False

    def hold(self) -> None:
        """Note SIGHUP and SIGUSR1 from now on where nothing else handles them (the main
        thread only: elsewhere signal handlers cannot be set)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in HELD:
            if signal.getsignal(signum) in (signal.SIG_DFL, None):
                signal.signal(signum, self._noted)

    def _noted(self, signum: int, frame: Any) -> None:
        if signum not in self.received:
            self.received.append(signum)

    def holding(self, signum: int) -> bool:
        """Whether ``signum`` is still only noted here (no other handler took it over)."""
        return bool(signal.getsignal(signum) == self._noted)

    def hand_over_sigusr1(self) -> None:
        """Before twistd opens the log: SIGUSR1 back to its default, so that the log's
        own rotation handler is installed (it only takes an unhandled signal), and
        blocked until ``take_back`` (a signal meanwhile waits, pending)."""
        if threading.current_thread() is not threading.main_thread() or not self.holding(signal.SIGUSR1):
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        self._blocked = True
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    def take_back(self) -> None:
        """After the log opened: SIGUSR1 noted again if nothing took it over (the log is
        not a file), then unblocked (a pending one reaches whichever handler is set)."""
        if not self._blocked:
            return
        self._blocked = False
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, self._noted)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})

    def report(self, log: Any) -> None:
        """One line per signal noted so far (``log``: a twisted ``Logger``)."""
        received, self.received = self.received, []
        for signum in received:
            log.info("{signal} received while starting: ignored ({why})",
                     signal=signal.Signals(signum).name, why=WHY[signal.Signals(signum)])


#: The process's held signals: signal dispositions belong to the whole process.
STARTING = HeldSignals()
