"""At startup the Maildir is made and the files a kill left in ``tmp/`` are removed
(Dovecot's rule: older than 36 hours), with a logged count."""

from __future__ import annotations

import os
import time
from pathlib import Path

from twisted.logger import formatEvent, globalLogPublisher

from saslsmtp.delivery import STALE_TMP_SECONDS, prepare_maildir
from saslsmtp.service import load, prepare_delivery
from tests.support import write_config


def old_file(path: Path, age: float, now: float) -> Path:
    path.write_bytes(b"partial message")
    os.utime(path, (now - age, now - age))
    return path


def test_stale_tmp_files_are_removed_and_fresh_ones_kept(tmp_path: Path) -> None:
    """Files in tmp/ older than 36 hours go; a write still in flight (younger) stays;
    new/ and cur/ are never touched."""
    now = time.time()
    maildir = tmp_path / "mail"
    assert prepare_maildir(maildir, now) == 0  # made from nothing
    stale = [old_file(maildir / "tmp" / f"stale{n}", STALE_TMP_SECONDS + 60, now) for n in range(3)]
    fresh = old_file(maildir / "tmp" / "fresh", STALE_TMP_SECONDS - 60, now)
    delivered = old_file(maildir / "new" / "old-but-delivered", 10 * STALE_TMP_SECONDS, now)
    (maildir / "tmp" / "a-folder").mkdir()
    assert prepare_maildir(maildir, now) == 3
    assert not any(p.exists() for p in stale)
    assert fresh.exists() and delivered.exists() and (maildir / "tmp" / "a-folder").is_dir()
    assert sorted(p.name for p in (maildir / "cur").iterdir()) == []


def test_the_start_logs_how_many_stale_files_it_removed(tmp_path: Path) -> None:
    """The service's start (``prepare_delivery``) says how many it removed, once."""
    (tmp_path / "users").write_text("")
    config = load(str(write_config(tmp_path, '[backends.u]\ntype = "file"\npath = "users"\n')))
    now = time.time()
    tmp = Path(config.delivery.path) / "tmp"
    tmp.mkdir(parents=True)
    old_file(tmp / "killed-during-write", STALE_TMP_SECONDS + 1, now)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        prepare_delivery(config, now)
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "saslsmtp"]
    assert lines == [f"maildir {config.delivery.path}: removed 1 stale files from tmp/"
                     " (older than 36 hours)"]
    assert list(tmp.iterdir()) == []
