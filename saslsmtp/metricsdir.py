"""The master's own folder for its workers' metric files, when ``PROMETHEUS_MULTIPROC_DIR``
is not set: ``saslsmtp-metrics-PID-XXXXXXXX`` in the temporary directory (``$TMPDIR``,
else ``/tmp``).

The master removes it when it stops and when its start fails; a master that cannot
(SIGKILL, the OOM killer, a power cut of the process) leaves it, so ``make`` first
removes the folders of masters that are no longer running.  Only what is provably
stale goes: a folder whose name and ``master`` file agree on a pid, whose owner is one
of ``owners``, whose master is gone (``os.kill(pid, 0)`` fails with ``ESRCH``, or that
pid is another process now: another start time in ``/proc/PID/stat``) and none of
whose workers still runs (the pids in its ``*.db`` file names).  Anything else is left
alone: a live master's folder, an older saslsmtp's (no ``master`` file), a stranger's.
No Twisted here.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

PREFIX = "saslsmtp-metrics-"
#: The file in the folder that says whose it is: ``PID START`` (START: the process's
#: start time in clock ticks since boot, from ``/proc/PID/stat``; ``-`` when unknown).
STAMP = "master"
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-")
_DB_PID = re.compile(r"_(\d+)\.db$")


def process_start(pid: int) -> str | None:
    """When ``pid`` started (field 22 of ``/proc/PID/stat``), or ``None`` where that
    cannot be read (no such process, no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # after "(comm)", which may hold spaces
    return fields[19].decode() if len(fields) > 19 else None


def make(directory: str | None = None) -> Path:
    """A new folder for this master, stamped with its pid and start time."""
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=directory))
    (path / STAMP).write_text(f"{os.getpid()} {process_start(os.getpid()) or '-'}\n")
    return path


def _running(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` may still be the process it was (with ``start``: that start time)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    if start is None or start == "-":
        return True
    now = process_start(pid)
    return now is None or now == start  # another start time: the pid was reused


def _worker_running(pid: int) -> bool:
    if not _running(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"saslsmtp.worker" in f.read()
    except OSError:
        return True  # cannot tell: keep the folder


def stale(path: Path, owners: Iterable[int]) -> bool:
    """Whether ``path`` is a master's folder (ours) whose master and workers are gone."""
    name = _NAME.match(path.name)
    try:
        info = path.lstat()
        stamp = (path / STAMP).read_text().split()
    except (OSError, UnicodeDecodeError):
        return False
    if name is None or not path.is_dir() or path.is_symlink() or info.st_uid not in set(owners):
        return False
    if len(stamp) != 2 or not stamp[0].isdigit() or stamp[0] != name.group(1):
        return False
    pid = int(stamp[0])
    if pid == os.getpid() or _running(pid, stamp[1]):
        return False
    try:
        workers = {int(m.group(1)) for f in os.listdir(path) if (m := _DB_PID.search(f))}
    except OSError:
        return False
    return not any(_worker_running(worker) for worker in workers)


def remove_stale(owners: Iterable[int], directory: str | None = None) -> list[Path]:
    """Remove every ``stale`` folder in ``directory`` (the temporary directory); the
    folders removed."""
    owners = set(owners)
    removed = []
    try:
        candidates = sorted(Path(directory or tempfile.gettempdir()).glob(PREFIX + "*"))
    except OSError:
        return []
    for path in candidates:
        if stale(path, owners):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                removed.append(path)
    return removed
