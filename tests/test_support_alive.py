"""``tests.support.alive``, which many daemon tests trust to say a process is gone (its
sockets closed): a process whose first thread has ended while another still runs shows
``State: Z`` and still holds its files."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import require
from tests.support import alive, wait_for

#: Listens, starts a thread that lives on for a while, then ends only its main thread
#: (``pthread_exit``): the process keeps its listening socket until that thread ends.
FIRST_THREAD_ENDS = """
import ctypes, socket, threading, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
print(s.getsockname()[1], flush=True)
threading.Thread(target=time.sleep, args=(2.0,)).start()
ctypes.CDLL(None).pthread_exit(None)
"""


def first_thread_state(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("State:"):
            return line.split()[1]
    return "?"


def test_a_zombie_first_thread_with_a_live_thread_is_alive_until_that_thread_ends() -> None:
    require(Path("/proc/self/task").is_dir(), "needs /proc (Linux)")
    child = subprocess.Popen([sys.executable, "-c", FIRST_THREAD_ENDS], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        wait_for(lambda: first_thread_state(child.pid) == "Z", timeout=10,
                 what="the first thread a zombie")
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) == 0  # the socket is still held
        assert alive(child.pid)
        wait_for(lambda: not alive(child.pid), timeout=10, what="the last thread gone")
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    finally:
        child.kill()
        child.wait()
