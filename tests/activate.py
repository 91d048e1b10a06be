"""Start a process the way systemd starts a socket-activated service: the listening
sockets as fds 3, 4, ..., ``LISTEN_FDS``, ``LISTEN_FDNAMES`` and ``LISTEN_PID`` set to
the process's own pid (known only after the fork: a small Python program moves the fds,
sets the variables and execs the command, keeping its pid).  The test keeps its sockets
open, as systemd keeps them, across as many starts as it likes."""

from __future__ import annotations

import socket
import sys
from typing import Sequence

#: argv: FD,FD,... NAME:NAME:... COMMAND...
SHIM = """
import fcntl, os, sys
sources = [int(fd) for fd in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
for fd in sources:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)  # inheritable: dup2 clears close-on-exec
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(sources)))
if sys.argv[2]:
    os.environ["LISTEN_FDNAMES"] = sys.argv[2]
os.execvp(sys.argv[3], sys.argv[3:])
"""


def activated_command(command: Sequence[str], sockets: Sequence[socket.socket],
                      names: Sequence[str] = ()) -> tuple[list[str], list[int]]:
    """(argv, pass_fds) for ``subprocess.Popen``: ``command`` with ``sockets`` passed
    as systemd passes them (named ``names``; none: no ``LISTEN_FDNAMES``)."""
    fds = [sock.fileno() for sock in sockets]
    return ([sys.executable, "-c", SHIM, ",".join(map(str, fds)), ":".join(names), *command],
            fds)
