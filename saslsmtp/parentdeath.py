"""A signal to this process when its parent dies (Linux's ``PR_SET_PDEATHSIG``).

A worker notices its master's death by the end of file on its standard input, but only
while its reactor turns: a worker stuck in an AUTH script (``while True: pass``) never
reads it, and kept the listening socket, accepting connections it never answered, for
as long as it lived.  With the kernel's parent-death signal it is told anyway, in its
main thread (Python runs a signal handler between two bytecodes of the loop).

The setting is cleared when the process changes its user or group ids, so it is made
after ``privileges.drop``; and a parent that died before it was made sends nothing, so
the caller compares ``os.getppid()`` with the pid it expects afterwards.  Where
``prctl`` does not exist (not Linux, no libc found) this does nothing and says so.
No Twisted here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load() -> Callable[[int], bool] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    prctl.restype = ctypes.c_int

    def set_signal(signum: int) -> bool:
        return prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    return set_signal


_set = _load()


def signal_when_parent_dies(signum: int) -> bool:
    """Ask the kernel for ``signum`` when the parent (the thread that forked us) ends;
    whether it was done."""
    return _set is not None and _set(signum)
