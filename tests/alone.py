"""Tests that measure time run alone, also when the suite runs in parallel processes.

``scripts/test.sh`` runs the suite with pytest-xdist, one process per CPU.  A test
marked ``@pytest.mark.alone`` asserts a latency or a timeout window: its figures must be
about saslsmtp, not about a neighbour starting a daemon on the other CPU.  So every
test holds a lock for its whole run (setup, call and teardown, so a module or session
fixture started for it counts too): shared for ordinary tests, exclusive for ``alone``
ones.  Both are taken through a turnstile: while an ``alone`` test waits for the
ordinary tests in flight to finish, no new one may start, so it is never starved.

The locks are ``flock(2)`` locks on two files in a folder the controlling process makes
(``LOCKS_VARIABLE`` names it to the worker processes, which inherit its environment);
without that folder (a serial run) nothing is locked.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from typing import Iterator

LOCKS_VARIABLE = "SASLSMTP_TEST_LOCKS"


@contextmanager
def turn(folder: str, exclusive: bool) -> Iterator[None]:
    """Hold the room for one test: alone (``exclusive``) or beside other ordinary tests."""
    with open(os.path.join(folder, "turnstile"), "a") as gate, \
            open(os.path.join(folder, "room"), "a") as room:
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(room, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(room, fcntl.LOCK_UN)
