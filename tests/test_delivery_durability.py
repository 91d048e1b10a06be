"""Crash consistency of Maildir delivery: every ``250`` is sent only after the fsyncs that
make its message survive a crash (the file's data, then its name in ``new/``).

The disk calls are recorded (``os.open``, ``os.fsync``, ``os.rename``, the early
write-out) and the replies are read after each thread-pool job, so the test sees one
sequence of events.  A crash is then simulated after every prefix of that sequence: a
message counts as stored when its file was fsynced before its rename and ``new/`` was
fsynced after the rename; every message answered ``250`` in the prefix must be stored."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from saslsmtp import delivery, writeback
from saslsmtp.delivery import Maildir, MaildirRealm
from saslsmtp.testing import SMTPHarness

from tests.test_data_sinks import DATA_OK, START, USERS, ManualRunner

ACCEPTED = re.compile(rb"250 2\.0\.0 OK: queued as (\S+)\r\n")


class DiskRecorder:
    """The durability-relevant calls, in the order they returned, plus the 250s."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str]] = []
        self._names: dict[int, str] = {}  # open fd -> file name
        real_open, real_fsync, real_rename = os.open, os.fsync, os.rename

        def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            fd = real_open(path, flags, *args, **kwargs)
            if flags & os.O_CREAT:
                self._names[fd] = os.path.basename(path)
                self.events.append(("create", os.path.basename(path)))
            return fd

        def fsync(fd: int) -> None:
            real_fsync(fd)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                self.events.append(("fsync dir", ""))
            else:
                self.events.append(("fsync file", self._names[fd]))

        def rename(src: Any, dst: Any) -> None:
            real_rename(src, dst)
            self.events.append(("rename", os.path.basename(dst)))

        def start(fd: int) -> None:
            self.events.append(("writeback", self._names[fd]))
        monkeypatch.setattr(os, "open", open_)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(delivery, "start_writeback", start)

    def replied(self, out: bytes) -> None:
        for name in ACCEPTED.findall(out):
            self.events.append(("250", name.decode()))


def stored_after_crash(events: list[tuple[str, str]]) -> set[str]:
    """The messages a crash right after ``events`` leaves complete in ``new/``."""
    synced: set[str] = set()       # data fsynced
    renamed: set[str] = set()      # renamed after its data fsync (not yet covered)
    stored: set[str] = set()
    for kind, name in events:
        if kind == "fsync file":
            synced.add(name)
        elif kind == "rename" and name in synced:
            renamed.add(name)
        elif kind == "fsync dir":
            stored |= renamed
            renamed = set()
    return stored


def test_no_250_before_the_fsyncs_that_cover_it(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Six connections, messages ending while batches run (batches of one, two and
    three), one of them big enough to be written in chunks before its end: at every
    point of the recorded sequence, each message already answered 250 would survive a
    crash there, and every message was answered."""
    recorder = DiskRecorder(monkeypatch)
    runner = ManualRunner()
    realm = MaildirRealm(Maildir(tmp_path / "mail", "mx.example.test"), runner)
    first = SMTPHarness(users=USERS, realm=realm)
    sessions = [first] + [first.connect() for _ in range(5)]
    for h in sessions:
        h.login("tim", "tanstaaftanstaaf")
        h.take()
        assert h.send(START) == DATA_OK
    big = b"Subject: big\r\n\r\n" + b"y" * 998 + b"\r\n" + (b"z" * 998 + b"\r\n") * 400

    def run_jobs() -> None:
        while runner.jobs:
            runner.run_one()
            for h in sessions:
                recorder.replied(h.take())

    assert sessions[0].send(b"Subject: 0\r\n\r\nzero\r\n.\r\n") == b""
    sessions[1].send(b"Subject: 1\r\n\r\none\r\n.\r\n")     # waits for the first batch
    sessions[2].send(big)                                    # chunk writes start
    runner.run_one()                                         # first batch: message 0
    recorder.replied(sessions[0].take())
    sessions[2].send(b".\r\n")
    for h in sessions[3:]:
        h.send(b"Subject: n\r\n\r\nn\r\n.\r\n")
    run_jobs()
    answered = [e for e in recorder.events if e[0] == "250"]
    assert len(answered) == 6
    for cut in range(len(recorder.events) + 1):
        prefix = recorder.events[:cut]
        acknowledged = {name for kind, name in prefix if kind == "250"}
        assert acknowledged <= stored_after_crash(prefix), (cut, prefix)
    assert sorted(p.name for p in (tmp_path / "mail" / "new").iterdir()) == \
        sorted(name for _, name in answered)
    committer = realm.maildir.committer(runner)
    assert committer.batches >= 3  # several messages shared a directory fsync
    assert sum(1 for kind, _ in recorder.events if kind == "fsync dir") == committer.batches


def test_each_files_write_out_is_started_before_any_fsync_of_the_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a batch every file is written and its write-out started before the first
    fsync (so the kernel writes them together); each is still fsynced before its
    rename, and new/ after the last rename."""
    recorder = DiskRecorder(monkeypatch)
    runner = ManualRunner()
    realm = MaildirRealm(Maildir(tmp_path / "mail", "mx.example.test"), runner)
    first = SMTPHarness(users=USERS, realm=realm)
    sessions = [first, first.connect(), first.connect()]
    for h in sessions:
        h.login("tim", "tanstaaftanstaaf")
        h.take()
        h.send(START)
        h.send(b"Subject: w\r\n\r\nw\r\n.\r\n")
    runner.run_one()  # the first message alone
    recorder.events.clear()
    runner.run_one()  # the two that waited
    kinds = [kind for kind, _ in recorder.events]
    assert kinds == ["create", "create", "writeback", "writeback", "fsync file", "fsync file",
                     "rename", "rename", "fsync dir"]
    names = [name for kind, name in recorder.events if kind == "create"]
    assert [name for kind, name in recorder.events if kind == "writeback"] == names
    assert [name for kind, name in recorder.events if kind == "rename"] == names


def test_start_writeback_leaves_the_file_as_it_was(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The early write-out neither changes nor truncates the file, on a system that has
    it and (as a no-op) on one that does not."""
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"data\n")
        writeback.start_writeback(fd)
        monkeypatch.setattr(writeback, "_start", None)
        writeback.start_writeback(fd)
        os.write(fd, b"more\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"data\nmore\n"
    if os.uname().sysname == "Linux":
        assert writeback.AVAILABLE
