"""Failures that appear after a good start are one clear error line each, no traceback:
a users file that becomes unreadable, a Maildir that cannot be written."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from saslsmtp.checkers.file import FileChecker
from saslsmtp.errors import TemporaryFailure
from saslsmtp.threads import SynchronousRunner
from tests.support import start_server

BACKEND = '[backends.users]\ntype = "file"\npath = "{path}"\n'


class Events(list):
    def __enter__(self) -> "Events":
        globalLogPublisher.addObserver(self.append)
        return self

    def __exit__(self, *_: object) -> None:
        globalLogPublisher.removeObserver(self.append)

    def at(self, level: LogLevel) -> list[str]:
        return [formatEvent(e) for e in self if e.get("log_level") is level]


def test_an_unreadable_users_file_is_one_error_per_outage(tmp_path: Path) -> None:
    """Each login then fails temporarily (454), but the log says why once, as an error;
    once the file is readable again, a new outage is reported again."""
    path = tmp_path / "users"
    path.write_text("demo:{PLAIN}pw\n")
    readable = [False]

    def read(p: str) -> bytes:
        if not readable[0]:
            raise PermissionError(13, "Permission denied", p)
        return Path(p).read_bytes()

    checker = FileChecker(str(path), SynchronousRunner(), "PLAIN", name="users", read=read)
    with Events() as events:
        for _ in range(3):
            with pytest.raises(TemporaryFailure, match="Permission denied"):
                checker.users()
        readable[0] = True
        checker.users()
        path.write_text("demo:{PLAIN}pw2\n")
        readable[0] = False
        with pytest.raises(TemporaryFailure, match="Permission denied"):
            checker.users()
    errors = events.at(LogLevel.error)
    assert errors == [f"backend users: users file {path} cannot be read: Permission denied;"
                      " logins get 454"] * 2, errors
    assert not any(e.get("log_failure") for e in events)


async def send_one(server: Any, body: bytes = b"Subject: x\r\n\r\nhi\r\n") -> tuple[int, bytes, Any]:
    """One message from ``demo`` over smtplib (in a thread): the reply to its DATA (250
    when accepted) and the log events while it was sent."""
    from twisted.internet import threads

    def send() -> tuple[int, bytes]:
        import smtplib
        with smtplib.SMTP("127.0.0.1", server.port, timeout=15) as s:
            s.login("demo", "pw")
            try:
                s.sendmail("demo@example.test", ["x@example.test"], body)
            except smtplib.SMTPDataError as e:
                return e.smtp_code, e.smtp_error
            return 250, b""
    with Events() as events:
        code, text = await threads.deferToThread(send)
    return code, text, events


@pytest_twisted.ensureDeferred
async def test_a_maildir_that_cannot_be_written_is_451_and_one_error_line(tmp_path: Path) -> None:
    """tmp/ replaced by a file after the start: DATA gets 451, the log one error line
    naming the path, and no traceback."""
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    server = await start_server(tmp_path, BACKEND.format(path=tmp_path / "users"))
    try:
        tmp = server.maildir / "tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        server.maildir.mkdir(parents=True, exist_ok=True)
        tmp.write_text("not a folder")
        code, text, events = await send_one(server)
    finally:
        await server.stop()
    assert code == 451, text
    errors = events.at(LogLevel.error) + events.at(LogLevel.critical)
    assert len(errors) == 1 and errors[0].startswith("message not stored: ") \
        and str(tmp) in errors[0], errors
    assert not any(e.get("log_failure") for e in events)


@pytest_twisted.ensureDeferred
async def test_a_full_maildir_is_451_and_one_error_line_naming_the_file(tmp_path: Path) -> None:
    """The Maildir on a filesystem with no block left (a real tmpfs, filled): DATA gets
    451, and the one error line names the message's ``tmp/`` file (a failed ``write`` or
    ``fsync`` carries no file name: the line read ``message not stored: ?: No space left
    on device``); nothing is left in ``tmp/`` or ``new/``."""
    import os
    import subprocess

    from tests.conftest import require, require_binary
    from tests.test_metrics_full_disk import fill
    require(os.geteuid() == 0, "mounting a tmpfs needs root")
    mail = tmp_path / "mail"
    mail.mkdir()
    subprocess.run([require_binary("mount", "mount"), "-t", "tmpfs", "-o", "size=256k",
                    "tmpfs", str(mail)], check=True, capture_output=True, timeout=30)
    try:
        (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
        server = await start_server(tmp_path, BACKEND.format(path=tmp_path / "users"))
        try:
            for sub in ("tmp", "new", "cur"):
                (server.maildir / sub).mkdir(parents=True, exist_ok=True)
            fill(mail)
            code, text, events = await send_one(
                server, b"Subject: x\r\n\r\n" + (b"y" * 70 + b"\r\n") * 1000)
        finally:
            await server.stop()
        assert code == 451, text
        errors = events.at(LogLevel.error) + events.at(LogLevel.critical)
        assert len(errors) == 1 and errors[0].startswith(
            f"message not stored: {server.maildir / 'tmp'}/") \
            and errors[0].endswith(": No space left on device"), errors
        assert not any(e.get("log_failure") for e in events)
        assert not list((server.maildir / "tmp").iterdir())
        assert not list((server.maildir / "new").iterdir())
    finally:
        subprocess.run([require_binary("umount", "mount"), "-l", str(mail)],
                       capture_output=True, timeout=30)


@pytest_twisted.ensureDeferred
async def test_a_failed_rename_into_new_names_the_rename(tmp_path: Path) -> None:
    """``new/`` cannot take the message (replaced by a file here: the same failed rename a
    ``chmod 500 new/`` gives a server that is not root): DATA gets 451, and the one error
    line names the move into ``new/`` with both paths (it named only the ``tmp/`` file,
    as if writing it had failed); nothing is left in ``tmp/``."""
    (tmp_path / "users").write_text("demo:{PLAIN}pw\n")
    server = await start_server(tmp_path, BACKEND.format(path=tmp_path / "users"))
    try:
        for sub in ("tmp", "cur"):
            (server.maildir / sub).mkdir(parents=True, exist_ok=True)
        new = server.maildir / "new"
        if new.exists():
            shutil.rmtree(new)
        new.write_text("not a folder")
        code, text, events = await send_one(server)
    finally:
        await server.stop()
    assert code == 451, text
    errors = events.at(LogLevel.error) + events.at(LogLevel.critical)
    tmp = server.maildir / "tmp"
    assert len(errors) == 1, errors
    assert re.fullmatch(rf"message not stored: cannot rename {re.escape(str(tmp))}/(\S+)"
                        rf" to {re.escape(str(new))}/\1: Not a directory", errors[0]), errors
    assert not any(e.get("log_failure") for e in events)
    assert not list(tmp.iterdir())
