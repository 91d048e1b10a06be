"""The workers' metric files, with their disk space taken when they are made.

prometheus_client's multi-process mode keeps each process's values in memory-mapped
files (``MmapedDict``) that it creates and grows with ``truncate``: a sparse file whose
pages get their disk blocks only when a value is first written to them.  On a full
filesystem (``/tmp``, where the folder is by default, filled by anyone) that write is a
SIGBUS, which ends the worker with no word in the log, in the middle of its sessions, and
again in every worker that replaces it.

``AllocatedMmapedDict`` takes the blocks with ``posix_fallocate`` when it creates or grows
a file, where a full disk is an ``OSError`` it can answer: from then on that file's
values are kept in this process's memory (the serving goes on; ``/metrics`` misses them
until the worker is replaced) and ``install``'s handler is told once, to log it.
``install(on_failure)`` makes prometheus_client use it; the worker calls it before it
creates its metrics.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict

#: Told (file name, error) when a file cannot be made or grown.
FailureHandler = Callable[[str, OSError], None]


def _ignore(name: str, error: OSError) -> None:
    pass


#: ``install``'s handler (one per process: prometheus_client's files are per process).
_told: list[FailureHandler] = [_ignore]


def _allocate(fd: int, size: int) -> None:
    """Take the disk blocks of the first ``size`` bytes of ``fd`` (and make it that long)."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:  # (no such call: the sparse file prometheus_client makes)
        os.ftruncate(fd, max(size, os.fstat(fd).st_size))


def _entry_size(key: str) -> int:
    """At least the bytes ``MmapedDict`` appends for ``key``: length, key padded to 8, two
    doubles."""
    return 4 + len(key.encode("utf-8")) + 8 + 16


class AllocatedMmapedDict(MmapedDict):
    """``MmapedDict`` whose file never has a page without its disk block; on a filesystem
    that has none left it keeps the values in memory."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        self._memory: dict[str, tuple[float, float]] | None = None
        if read_mode:
            super().__init__(filename, read_mode)
            return
        try:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _allocate(fd, max(os.fstat(fd).st_size, 1 << 16))
            finally:
                os.close(fd)
            super().__init__(filename)
        except OSError as e:
            self._fname = filename
            self._to_memory(e)
            try:  # an empty file would break the master's reading of the folder
                if os.stat(filename).st_size == 0:
                    os.unlink(filename)
            except OSError:
                pass

    def _to_memory(self, error: OSError) -> None:
        mapped = getattr(self, "_m", None) is not None
        kept = {key: (value, stamp) for key, value, stamp in self.read_all_values()} if mapped else {}
        if mapped:
            self._m.close()
        if getattr(self, "_f", None) is not None:
            self._f.close()
        self._m = self._f = None
        self._memory = kept
        _told[0](self._fname, error)

    def _room_for(self, key: str) -> bool:
        """Whether ``key`` can be written to the file: there is room, or the file grew."""
        if key in self._positions:
            return True
        capacity = self._capacity
        while self._used + _entry_size(key) > capacity:
            capacity *= 2
        if capacity == self._capacity:
            return True
        try:
            _allocate(self._f.fileno(), capacity)  # (MmapedDict then maps it as it grows)
        except OSError as e:
            self._to_memory(e)
            return False
        return True

    def read_value(self, key: str) -> Any:
        if self._memory is None and self._room_for(key):
            return super().read_value(key)
        assert self._memory is not None
        return self._memory.setdefault(key, (0.0, 0.0))

    def write_value(self, key: str, value: float, timestamp: float) -> None:
        if self._memory is None and self._room_for(key):
            super().write_value(key, value, timestamp)
            return
        assert self._memory is not None
        self._memory[key] = (value, timestamp)

    def read_all_values(self) -> Iterator[tuple[str, float, float]]:
        if self._memory is not None:
            return ((key, value, stamp) for key, (value, stamp) in self._memory.items())
        return super().read_all_values()


def install(on_failure: FailureHandler) -> None:
    """Make prometheus_client create this process's metric files as ``AllocatedMmapedDict``
    and tell ``on_failure`` about each one that cannot have its disk space."""
    _told[0] = on_failure
    setattr(values, "MmapedDict", AllocatedMmapedDict)  # (looked up there at each new file)
