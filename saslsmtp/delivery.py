"""Delivery: a cred realm whose avatars write accepted mail into one Maildir.

A message is complete before the 250: written to ``tmp/`` in chunks as it arrives,
fsynced, renamed into ``new/`` (the Maildir protocol), all in the injected blocking
runner, never on the reactor thread.  All recipients of one transaction share one file.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.mail.interfaces import IMessageDelivery
from twisted.python.failure import Failure
from zope.interface import implementer

from saslsmtp.replies import REPLIES, SMTPReply

from saslsmtp.threads import BlockingRunner

log = Logger(namespace="saslsmtp.delivery")
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


class MaildirSink:
    """One message into the Maildir as it arrives: chunks are collected up to ``chunk``
    bytes and written to ``tmp/`` by the blocking runner, one write after the other;
    ``end()`` writes the rest, fsyncs, renames into ``new/`` and fsyncs the folder, and
    only then fires with ``250 ... queued as <name>``.  When more than ``high_water``
    bytes wait for the disk, the client's transport (the registered producer) is paused.
    Lines are stored with LF ends, as Maildir readers expect."""

    def __init__(self, maildir: Maildir, runner: BlockingRunner, *, chunk: int = 256 * 1024,
                 high_water: int = 1024 * 1024) -> None:
        self._maildir = maildir
        self._runner = runner
        self._chunk = chunk
        self._high_water = high_water
        self.queue_id = maildir.unique_name()
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._in_flight = 0
        self._producer: Any = None
        self._paused = False
        self._fd: int | None = None
        self._created = False  # the tmp/ file exists (so abort has something to remove)
        self._error: Failure | None = None
        self._aborted = False
        self._tail: Deferred[Any] = succeed(None)

    # blocking steps (the runner's thread); a small message takes one: _finish -----

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self._maildir.ensure()
            self._fd = os.open(self._maildir.path / "tmp" / self.queue_id,
                               os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._created = True
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _finish(self, data: bytes) -> str:
        self._write(data)
        assert self._fd is not None
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        name = self.queue_id
        os.rename(self._maildir.path / "tmp" / name, self._maildir.path / "new" / name)
        dirfd = os.open(self._maildir.path / "new", os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        return name

    def _discard(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if not self._created:
            return  # the tmp/ file was never made (e.g. the Maildir is not writable)
        try:
            os.unlink(self._maildir.path / "tmp" / self.queue_id)
        except FileNotFoundError:
            pass

    # the reactor side -------------------------------------------------------------

    def _then(self, f: Any, *args: Any) -> None:
        def step(_: Any) -> Any:
            if self._error is not None or self._aborted:
                return None
            return self._runner.run(f, *args)

        def failed(failure: Failure) -> None:
            if self._error is None:
                self._error = failure
            return None
        self._tail.addCallback(step).addErrback(failed)

    def write(self, chunk: bytes) -> None:
        if self._aborted or self._error is not None:
            return
        self._buffer.append(chunk.replace(b"\r\n", b"\n"))
        self._buffered += len(chunk)
        if self._buffered >= self._chunk:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        self._in_flight += len(data)
        self._then(self._write, data)
        self._tail.addBoth(self._written, len(data))
        if self._in_flight > self._high_water and self._producer is not None and not self._paused:
            self._paused = True
            self._producer.pauseProducing()

    def _written(self, result: Any, size: int) -> Any:
        self._in_flight -= size
        if self._paused and self._in_flight <= self._chunk:
            self._paused = False
            if self._producer is not None:
                self._producer.resumeProducing()
        return result

    def end(self) -> "Deferred[SMTPReply]":
        """Everything is on disk, fsynced and renamed before the ``250``."""
        rest = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        result: Deferred[SMTPReply] = Deferred()

        def finish(_: Any) -> Any:
            if self._error is not None:
                return self._error
            return self._runner.run(self._finish, rest)

        def stored(name: str) -> None:
            result.callback(REPLIES["message_accepted"].with_text(f"OK: queued as {name}"))

        def failed(failure: Failure) -> None:
            # the transaction reports it: one error line for an OSError (unwritable or
            # full disk), a logged traceback for anything else; the reply is 451
            self._runner.run(self._discard).addErrback(lambda _: None)
            result.errback(failure)
        self._tail.addCallback(finish).addCallbacks(stored, failed)
        return result

    def abort(self) -> None:
        """The message will not be delivered: close and remove the ``tmp/`` file."""
        if self._aborted:
            return
        self._aborted = True
        self._buffer, self._buffered = [], 0
        self._producer = None
        self._tail.addBoth(lambda _: self._runner.run(self._discard)).addErrback(
            lambda f: log.failure("could not remove {id}", failure=f, id=self.queue_id))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer

    def unregisterProducer(self) -> None:
        if self._paused and self._producer is not None:
            self._producer.resumeProducing()
        self._paused = False
        self._producer = None


class MaildirEnvelope:
    """One transaction into the Maildir: every sender and recipient is accepted (the
    Maildir is the only mailbox); DATA opens a ``MaildirSink``."""

    def __init__(self, maildir: Maildir, runner: BlockingRunner) -> None:
        self._maildir = maildir
        self._runner = runner
        self.sink: MaildirSink | None = None

    def mail(self, address: str, params: Sequence[str]) -> SMTPReply:
        return REPLIES["sender_ok"]

    def rcpt(self, address: str, params: Sequence[str]) -> SMTPReply:
        return REPLIES["rcpt_ok"]

    def data(self) -> SMTPReply:
        self.sink = MaildirSink(self._maildir, self._runner)
        return REPLIES["data_start"]

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()
            self.sink = None


@implementer(IMessageDelivery)
class MaildirDelivery:
    """The avatar of an authenticated user: every recipient goes into one Maildir."""

    def __init__(self, username: str, maildir: Maildir, runner: BlockingRunner) -> None:
        self.username = username
        self._maildir = maildir
        self._runner = runner

    def begin_transaction(self, client: Any) -> MaildirEnvelope:
        return MaildirEnvelope(self._maildir, self._runner)

    # IMessageDelivery (the portal asks for it); the server uses begin_transaction
    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], Any]:
        raise smtp.SMTPBadRcpt(user)


@implementer(IRealm)
class MaildirRealm:
    """Gives each authenticated user a ``MaildirDelivery`` into the configured Maildir."""

    def __init__(self, maildir: Maildir, runner: BlockingRunner) -> None:
        self.maildir = maildir
        self.runner = runner

    def requestAvatar(self, avatarId: bytes | tuple[()], mind: Any, *interfaces: Any) -> tuple:
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
