"""tests/alone.py: an ``alone`` test waits for the ordinary tests in flight, and no new
ordinary test overtakes it while it waits (flock locks conflict across open files, so
threads stand in for the parallel worker processes)."""

from __future__ import annotations

import fcntl
import threading
import time
from pathlib import Path

from tests.alone import turn


def _enter(folder: Path, exclusive: bool, name: str, order: list[str],
           inside: threading.Event, leave: threading.Event) -> threading.Thread:
    def run() -> None:
        with turn(str(folder), exclusive):
            order.append(name)
            inside.set()
            leave.wait(10)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _gate_taken(folder: Path) -> bool:
    with open(folder / "turnstile", "a") as gate:
        try:
            fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(gate, fcntl.LOCK_UN)
        return False


def test_an_alone_test_waits_for_the_running_one_and_the_next_waits_for_it(tmp_path: Path) -> None:
    order: list[str] = []
    events = {n: (threading.Event(), threading.Event()) for n in ("a", "b", "c", "d")}
    a = _enter(tmp_path, False, "a", order, *events["a"])
    assert events["a"][0].wait(5)
    d = _enter(tmp_path, False, "d", order, *events["d"])  # ordinary tests share the room
    assert events["d"][0].wait(5)
    events["d"][1].set()
    d.join(5)

    b = _enter(tmp_path, True, "b", order, *events["b"])  # alone: waits for a
    deadline = time.monotonic() + 5
    while not _gate_taken(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _gate_taken(tmp_path) and not events["b"][0].is_set()

    c = _enter(tmp_path, False, "c", order, *events["c"])  # may not overtake b
    assert not events["c"][0].wait(0.3)

    events["a"][1].set()
    assert events["b"][0].wait(5)
    assert not events["c"][0].wait(0.3)  # b is alone in the room
    events["b"][1].set()
    assert events["c"][0].wait(5)
    events["c"][1].set()
    for thread in (a, b, c):
        thread.join(5)
    assert order == ["a", "d", "b", "c"]
