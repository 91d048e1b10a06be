"""Starting the write-out of a file's dirty pages without waiting for it.

``start_writeback(fd)`` is Linux's ``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``:
the kernel queues the file's data for the disk and returns.  It makes nothing durable
(no metadata, no cache flush, no error reported to rely on): the ``fsync`` that follows
still does all of that.  What it buys is order: when a batch of files is queued first and
fsynced after, their data goes to the disk together and the first fsync's journal commit
also carries the other files' block allocations, so the later fsyncs find most of their
work done (docs/delivery.md; ``benchmarks/fsync_strategies.py`` measures it).

Where the call does not exist (not Linux, no libc found) or fails, it does nothing: the
fsync alone is what the durability rests on.  No Twisted here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable

SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start write-out of dirty pages, do not wait


def _load() -> Callable[[int], None] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        sync_file_range = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    sync_file_range.restype = ctypes.c_int

    def start(fd: int) -> None:
        sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # releases the GIL (ctypes.CDLL)
    return start


_start = _load()

#: Whether this system can start a write-out early (otherwise ``start_writeback`` is a no-op).
AVAILABLE = _start is not None


def start_writeback(fd: int) -> None:
    """Queue ``fd``'s dirty pages for the disk now; returns at once, never raises."""
    if _start is not None:
        _start(fd)
