"""Delivery: a cred realm whose avatars write accepted mail into one Maildir.

A message is complete before the 250: written to ``tmp/``, fsynced, renamed into
``new/`` (the Maildir protocol), in the injected blocking runner, never on the
reactor thread.  All recipients of one transaction share one file.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery
from zope.interface import implementer

from saslsmtp.threads import BlockingRunner

_counter = itertools.count(1)


class Maildir:
    """A Maildir folder (created on first use) that stores complete messages."""

    def __init__(self, path: str | Path, hostname: str | None = None) -> None:
        self.path = Path(path)
        self.hostname = (hostname or socket.gethostname()).replace("/", "\\057").replace(":", "\\072")

    def ensure(self) -> None:
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def unique_name(self) -> str:
        now = time.time()
        return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}.{self.hostname}"

    def store(self, data: bytes) -> str:
        """Write ``data`` durably; return the file name in ``new/`` (blocking)."""
        self.ensure()
        name = self.unique_name()
        tmp = self.path / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path / "new" / name)
        dirfd = os.open(self.path / "new", os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        return name


@implementer(smtp.IMessage)
class MaildirMessage:
    """Collects the lines of one message; ``eomReceived`` stores it."""

    def __init__(self, maildir: Maildir, runner: BlockingRunner) -> None:
        self._maildir = maildir
        self._runner = runner
        self._lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)

    def eomReceived(self) -> "Deferred[str]":
        self._lines.append(b"")
        data = b"\n".join(line.replace(b"\r\n", b"\n") for line in self._lines)
        self._lines = []
        return self._runner.run(self._maildir.store, data)

    def connectionLost(self) -> None:
        self._lines = []


@implementer(IMessageDelivery)
class MaildirDelivery:
    """The avatar of an authenticated user: every recipient goes into one Maildir."""

    def __init__(self, username: str, maildir: Maildir, runner: BlockingRunner) -> None:
        self.username = username
        self._maildir = maildir
        self._runner = runner
        self._message: MaildirMessage | None = None

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None  # the protocol writes the Received header itself (it knows TLS/AUTH)

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        self._message = None
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], MaildirMessage]:
        return self._shared_message

    def _shared_message(self) -> MaildirMessage:
        if self._message is None:
            self._message = MaildirMessage(self._maildir, self._runner)
        return self._message


@implementer(IRealm)
class MaildirRealm:
    """Gives each authenticated user a ``MaildirDelivery`` into the configured Maildir."""

    def __init__(self, maildir: Maildir, runner: BlockingRunner) -> None:
        self.maildir = maildir
        self.runner = runner

    def requestAvatar(self, avatarId: bytes, mind: Any, *interfaces: Any) -> tuple:
        if IMessageDelivery not in interfaces:
            raise NotImplementedError("MaildirRealm only provides IMessageDelivery")
        name = avatarId.decode("utf-8", "replace") if isinstance(avatarId, bytes) else str(avatarId)
        return IMessageDelivery, MaildirDelivery(name, self.maildir, self.runner), lambda: None


#: Dovecot's rule: a file in ``tmp/`` this old is a write that was killed, not one in flight.
STALE_TMP_SECONDS = 36 * 3600


def prepare_maildir(path: str | Path, now: float | None = None,
                    max_age: float = STALE_TMP_SECONDS) -> int:
    """At startup: create ``tmp/``, ``new/`` and ``cur/`` and remove the files in ``tmp/``
    older than ``max_age`` seconds (left by a kill during a write).  Returns how many
    were removed; raises ``OSError`` when the folders cannot be made."""
    maildir = Path(path)
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    cutoff = (time.time() if now is None else now) - max_age
    removed = 0
    with os.scandir(maildir / "tmp") as entries:
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and \
                        entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:  # another worker removed it first
                continue
    return removed
