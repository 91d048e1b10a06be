"""Metrics with workers on a full filesystem: the workers' metric files live under
``PROMETHEUS_MULTIPROC_DIR`` (by default a folder in ``/tmp``), and a full ``/tmp`` must
not end a worker (prometheus_client's sparse files made that a SIGBUS, with no word in
the log): the workers serve, the log says which file could not be written."""

from __future__ import annotations

import errno
import os
import smtplib
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import require, require_binary
from tests.support import ROOT, alice_config, free_port, workers_daemon


def fill(folder: Path) -> None:
    """Write into ``folder`` until its filesystem has no block left."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


@pytest.fixture
def full_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of this test's own under ``tmp_path``, filled to the last block."""
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    mount = require_binary("mount", "mount")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run([mount, "-t", "tmpfs", "-o", "size=1m,mode=0777", "tmpfs", str(small)],
                   check=True, capture_output=True, timeout=30)
    try:
        (small / "metrics").mkdir()
        fill(small)
        yield small
    finally:
        subprocess.run([require_binary("umount", "mount"), "-l", str(small)],
                       capture_output=True, timeout=30)


def send(port: int, n: int) -> list[tuple[int, bytes]]:
    replies = []
    for i in range(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.login("alice", "wonderland")
            client.mail("alice@example.test")
            client.rcpt("bob@example.test")
            replies.append(client.data(f"Subject: {i}\r\n\r\nbody\r\n".encode()))
    return replies


def test_workers_serve_when_the_metrics_folder_is_full(tmp_path: Path, full_tmpfs: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Started with ``PROMETHEUS_MULTIPROC_DIR`` on a full filesystem, both workers say
    ready and serve; each file they could not write is one error line naming it; none
    ends with a signal; ``/metrics`` still answers."""
    metrics_port = free_port()
    config, port = alice_config(tmp_path, "workers = 2\n")
    config.write_text(config.read_text()
                      + f'\n[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n')
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(full_tmpfs / "metrics"))
    log = tmp_path / "daemon.log"
    with workers_daemon(config, log, 2) as master:
        replies = send(port, 6)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            assert r.status == 200
        text = log.read_text()
        assert master.poll() is None, text
    assert [code for code, _ in replies] == [250] * 6, replies
    assert "ended unexpectedly" not in text, text
    assert "Traceback" not in text, text
    assert "ended before it was ready" not in text, text
    failed = [line for line in text.splitlines() if "metrics: cannot write" in line]
    assert failed, text
    assert all(f"{full_tmpfs / 'metrics'}/" in line and "No space left on device" in line
               and "missing from /metrics until it is restarted" in line for line in failed)
    assert len(failed) == len({line.split("cannot write ")[1].split(":")[0] for line in failed})


GROW = textwrap.dedent("""
    import errno, os, sys
    from saslsmtp.metricfiles import AllocatedMmapedDict, install
    told = []
    install(lambda name, error: told.append(error.errno))
    folder = sys.argv[1]
    values = AllocatedMmapedDict(os.path.join(folder, "counter_1.db"))
    values.write_value("first", 1.0, 0.0)
    fd = os.open(os.path.join(folder, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\\0" * 4096)
    except OSError:
        os.close(fd)
    for n in range(400):            # ~70 KB of keys: past the first 64 KiB, so it grows
        values.write_value("key-%03d-" % n + "x" * 150, float(n), 0.0)
    assert told == [errno.ENOSPC], told
    assert values.read_value("first") == (1.0, 0.0)
    assert values.read_value("key-399-" + "x" * 150) == (399.0, 0.0)
    print("ok")
""")


def test_a_metric_file_that_cannot_grow_keeps_its_values_in_memory(full_tmpfs: Path) -> None:
    """A file made while there was room, then grown past its first 64 KiB on a full
    filesystem: the growth is refused (not a SIGBUS at the first write to the new pages),
    the values so far and the new ones are kept in memory, the failure is told once."""
    folder = full_tmpfs / "grow"
    (full_tmpfs / "filler").unlink()
    folder.mkdir()
    done = subprocess.run([sys.executable, "-c", GROW, str(folder)], capture_output=True,
                          text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
