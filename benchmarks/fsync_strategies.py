#!/usr/bin/env python3
"""How to make a batch of small Maildir messages durable: wall time and CPU per message
of each strategy, on the filesystem of ``--dir`` (default: the temporary folder, where
``run.py`` puts the benchmark's Maildir).

    flock /tmp/saslsmtp-bench.lock python3 benchmarks/fsync_strategies.py --batch 6 --rounds 200

Every strategy creates ``--batch`` files of ``--size`` bytes in ``tmp/``, makes their data
durable, renames them into ``new/`` and makes ``new/`` durable, like one ``GroupCommit``
batch (saslsmtp/delivery.py):

* ``serial``: write every file, fsync each, rename each, fsync ``new/`` (GroupCommit before);
* ``serial-fdatasync``: the same with ``fdatasync`` on the files;
* ``threads-N``: the files' fsyncs run in N threads at once (the journal commits them together);
* ``writeback``: ``sync_file_range(WRITE)`` on every file first, then fsync each
  (``writeback-threads-N``: those fsyncs in N threads);
* ``syncfs``: write every file, one ``syncfs`` (all their data), rename each, fsync ``new/``.

Only this process's CPU is counted (``resource.getrusage``: user + system, all threads);
the kernel's flusher and journal threads are not.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
SYNC_FILE_RANGE_WRITE = 2


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        raise OSError(ctypes.get_errno(), "syncfs")


def _writeback(fd: int) -> None:
    if _libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0),
                             SYNC_FILE_RANGE_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "sync_file_range")


class Batch:
    def __init__(self, root: Path, size: int) -> None:
        self.tmp = str(root / "tmp") + "/"
        self.new = str(root / "new") + "/"
        self.data = b"x" * (size - 1) + b"\n"
        self.n = 0

    def write(self, count: int) -> list[tuple[str, int]]:
        files = []
        for _ in range(count):
            self.n += 1
            name = f"m{self.n}"
            fd = os.open(self.tmp + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.write(fd, self.data)
            files.append((name, fd))
        return files

    def publish(self, files: list[tuple[str, int]]) -> None:
        for name, _ in files:
            os.rename(self.tmp + name, self.new + name)
        dirfd = os.open(self.new, os.O_RDONLY | os.O_CLOEXEC)
        os.fsync(dirfd)
        os.close(dirfd)


def serial(sync: Callable[[int], None]) -> Callable[[Batch, int, ThreadPoolExecutor], None]:
    def run(b: Batch, count: int, pool: ThreadPoolExecutor) -> None:
        files = b.write(count)
        for _, fd in files:
            sync(fd)
            os.close(fd)
        b.publish(files)
    return run


def _sync_in_threads(files: list[tuple[str, int]], n: int, pool: ThreadPoolExecutor) -> None:
    """fsync and close ``files`` split over ``n`` threads (this one included)."""
    groups = [files[i::n] for i in range(n) if files[i::n]]

    def sync(group: list[tuple[str, int]]) -> None:
        for _, fd in group:
            os.fsync(fd)
            os.close(fd)
    futures = [pool.submit(sync, g) for g in groups[1:]]
    sync(groups[0])
    for f in futures:
        f.result()


def threads_wait(n: int) -> Callable[[Batch, int, ThreadPoolExecutor], None]:
    def run(b: Batch, count: int, pool: ThreadPoolExecutor) -> None:
        files = b.write(count)
        _sync_in_threads(files, n, pool)
        b.publish(files)
    return run


def writeback_threads(n: int) -> Callable[[Batch, int, ThreadPoolExecutor], None]:
    def run(b: Batch, count: int, pool: ThreadPoolExecutor) -> None:
        files = b.write(count)
        for _, fd in files:
            _writeback(fd)
        _sync_in_threads(files, n, pool)
        b.publish(files)
    return run


def writeback(b: Batch, count: int, pool: ThreadPoolExecutor) -> None:
    files = b.write(count)
    for _, fd in files:
        _writeback(fd)
    for _, fd in files:
        os.fsync(fd)
        os.close(fd)
    b.publish(files)


def syncfs(b: Batch, count: int, pool: ThreadPoolExecutor) -> None:
    files = b.write(count)
    _syncfs(files[0][1])
    for _, fd in files:
        os.close(fd)
    b.publish(files)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--size", type=int, default=2300)
    p.add_argument("--rounds", type=int, default=200)
    args = p.parse_args()
    strategies: dict[str, Callable[[Batch, int, ThreadPoolExecutor], None]] = {
        "serial": serial(os.fsync),
        "serial-fdatasync": serial(os.fdatasync),
        "threads-2": threads_wait(2),
        "threads-4": threads_wait(4),
        "writeback": writeback,
        "writeback-threads-2": writeback_threads(2),
        "writeback-threads-4": writeback_threads(4),
        "syncfs": syncfs,
    }
    print(f"batch {args.batch} x {args.size} B, {args.rounds} rounds each, on {args.dir}")
    print("| strategy | wall ms/batch (median) | wall ms/batch (p90) | CPU ms/message |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="fsync-strategies-") as tmp, \
            ThreadPoolExecutor(8) as pool:
        root = Path(tmp)
        results: dict[str, tuple[list[float], float]] = {name: ([], 0.0) for name in strategies}
        for round_ in range(args.rounds):  # interleaved, so load changes hit all alike
            for name, run in strategies.items():
                b = Batch(root, args.size)
                b.n = round_ * 1000 + hash(name) % 1000 * 1_000_000
                (root / "tmp").mkdir(exist_ok=True)
                (root / "new").mkdir(exist_ok=True)
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                run(b, args.batch, pool)
                wall = time.perf_counter() - t0
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
                walls, total = results[name]
                walls.append(wall)
                results[name] = (walls, total + cpu)
            if round_ % 20 == 19:
                for f in os.listdir(root / "new"):
                    os.unlink(root / "new" / f)
        for name, (walls, cpu) in results.items():
            walls.sort()
            print(f"| {name} | {1000 * statistics.median(walls):.2f} | "
                  f"{1000 * walls[int(len(walls) * 0.9)]:.2f} | "
                  f"{1000 * cpu / (args.rounds * args.batch):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
