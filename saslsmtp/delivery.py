"""Delivery: a cred realm whose avatars write accepted mail into one Maildir.

A message is complete before the 250: written to ``tmp/`` in chunks as it arrives,
fsynced, renamed into ``new/`` (the Maildir protocol) and ``new/`` fsynced, all in the
injected blocking runner, never on the reactor thread; messages that end together share
one directory fsync (``GroupCommit``, docs/delivery.md).  All recipients of one
transaction share one file.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from saslsmtp.envelope import EnvelopeAvatar, EnvelopeRealm
from saslsmtp.replies import REPLIES, SMTPReply

from saslsmtp.threads import BlockingRunner
from saslsmtp.writeback import start_writeback

log = Logger(namespace="saslsmtp.delivery")
_counter = itertools.count(1)


class Maildir:
    """A Maildir folder (created on first use) that stores complete messages."""

    def __init__(self, path: str | Path, hostname: str | None = None) -> None:
        self.path = Path(path)
        self.hostname = (hostname or socket.gethostname()).replace("/", "\\057").replace(":", "\\072")
        # plain strings: a Path join per file costs more than the syscall it names
        self._tmp = os.path.join(self.path, "tmp", "")
        self._new = os.path.join(self.path, "new", "")
        self._committer: GroupCommit | None = None

    def ensure(self) -> None:
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)

    def unique_name(self) -> str:
        now = time.time()
        return f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(_counter)}.{self.hostname}"

    def tmp_path(self, name: str) -> str:
        return self._tmp + name

    def new_path(self, name: str) -> str:
        return self._new + name

    def create(self, name: str) -> int:
        """Open a new file ``tmp/name`` for writing (blocking); the folders are made
        only when they are missing (removed while the server runs), not per message."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return os.open(self._tmp + name, flags, 0o600)
        except FileNotFoundError:
            self.ensure()
            return os.open(self._tmp + name, flags, 0o600)

    def rename_new(self, name: str) -> None:
        """Move ``tmp/name`` into ``new/`` (blocking; ``new/`` is made if it went missing)."""
        try:
            os.rename(self._tmp + name, self._new + name)
        except FileNotFoundError:
            if not os.path.exists(self._tmp + name):
                raise
            self.ensure()
            os.rename(self._tmp + name, self._new + name)

    def sync_new(self) -> None:
        """fsync ``new/``: the renames into it so far survive a crash (blocking)."""
        dirfd = os.open(self._new, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dirfd)
        except OSError as e:
            e.filename = e.filename or self._new  # (the log line names what failed)
            raise
        finally:
            os.close(dirfd)

    def store(self, data: bytes) -> str:
        """Write ``data`` durably; return the file name in ``new/`` (blocking)."""
        name = self.unique_name()
        fd = self.create(name)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rename_new(name)
        self.sync_new()
        return name

    def committer(self, runner: BlockingRunner) -> "GroupCommit":
        """The one ``GroupCommit`` of this folder (made on first use)."""
        if self._committer is None:
            self._committer = GroupCommit(self, runner)
        return self._committer


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a short write is legal)."""
    written = os.write(fd, data)
    if written < len(data):
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view):]


class _Commit:
    """One finished message waiting for (or in) a commit batch."""

    __slots__ = ("sink", "data", "result")

    def __init__(self, sink: "MaildirSink", data: bytes) -> None:
        self.sink = sink
        self.data = data
        self.result: Deferred[str] = Deferred()


class GroupCommit:
    """Finished messages of one Maildir, made durable in batches (group commit).

    A batch is one job in the blocking runner: the rest of each message's bytes is
    written, then each file is fsynced and closed, then each is renamed from ``tmp/``
    into ``new/``; then ``new/`` is fsynced once for all of them.  A message's Deferred
    fires with its name only after that directory fsync, which started after its own
    fsync and rename: every ``250`` is still preceded by the file fsync, the rename and a
    directory fsync that covers the rename (docs/delivery.md).  Messages that finish
    while a batch runs wait and form the next batch, so under load several renames share
    one directory fsync, and the reactor is woken once per batch instead of once per
    message.  At most ``max_batches`` batches run at once (one by default: a batch grows
    while the previous one is on the disk).

    A message whose write, fsync or rename fails gets that error (its ``tmp/`` file is
    removed in the same job); a failed directory fsync fails every message of the batch.
    """

    def __init__(self, maildir: Maildir, runner: BlockingRunner, max_batches: int = 1) -> None:
        self.maildir = maildir
        self.runner = runner
        self.max_batches = max_batches
        self._waiting: list[_Commit] = []
        self._running = 0
        self.batches = 0  # batches committed (tests, benchmarks)

    def submit(self, sink: "MaildirSink", data: bytes) -> "Deferred[str]":
        """Commit ``sink``'s message, ``data`` being its last bytes: fires with its name
        in ``new/`` once durable, or fails (the message is not stored)."""
        job = _Commit(sink, data)
        self._waiting.append(job)
        self._start()
        return job.result

    def withdraw(self, sink: "MaildirSink") -> bool:
        """Take ``sink``'s message out of the queue if its batch has not started."""
        for job in self._waiting:
            if job.sink is sink:
                self._waiting.remove(job)
                if not job.result.called:
                    job.result.cancel()
                return True
        return False

    def _start(self) -> None:
        while self._waiting and self._running < self.max_batches:
            jobs, self._waiting = self._waiting, []
            self._running += 1
            self.runner.run(self._commit, jobs).addCallbacks(
                self._done, self._lost, callbackArgs=(jobs,), errbackArgs=(jobs,))

    def _commit(self, jobs: list[_Commit]) -> list[str | Failure]:
        """The blocking batch (a runner thread), in passes so the kernel can write the
        files together: write every file, start the write-out of each (no wait), fsync
        each, rename each into ``new/``; then one fsync of ``new/``.  Each file is still
        fsynced before its rename."""
        results: list[str | Failure | None] = [None] * len(jobs)
        for step in _PASSES:
            for i, job in enumerate(jobs):
                if results[i] is None:
                    try:
                        step(job.sink, job.data)
                    except Exception:
                        results[i] = Failure()
                        job.sink._drop()
        if any(result is None for result in results):
            try:
                self.maildir.sync_new()
            except Exception:
                failure = Failure()
                results = [failure if result is None else result for result in results]
        return [job.sink.queue_id if result is None else result
                for job, result in zip(jobs, results)]

    def _done(self, results: list[str | Failure], jobs: list[_Commit]) -> None:
        self._running -= 1
        self.batches += 1
        self._start()  # keep the disk busy before answering
        for job, result in zip(jobs, results):
            if isinstance(result, Failure):
                job.result.errback(result)
            else:
                job.result.callback(result)

    def _lost(self, failure: Failure, jobs: list[_Commit]) -> None:
        """The runner could not run the batch (e.g. stopping): nothing was stored."""
        self._running -= 1
        self._start()
        for job in jobs:
            job.result.errback(failure)


class MaildirSink:
    """One message into the Maildir as it arrives: chunks are collected up to ``chunk``
    bytes and written to ``tmp/`` by the blocking runner, one write after the other;
    ``end()`` hands the rest to the Maildir's ``GroupCommit`` (write, fsync, rename into
    ``new/``, fsync of the folder, in one runner job) and only then fires with
    ``250 ... queued as <name>``.  A small message touches the disk only there: one
    thread hop per message.  When more than ``high_water`` bytes wait for the disk, the
    client's transport (the registered producer) is paused.  Lines are stored with LF
    ends, as Maildir readers expect."""

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
        self._committing = False  # handed to the GroupCommit
        self._tail: Deferred[Any] | None = None  # the chunk writes, in order (None: none yet)

    # blocking steps (a runner thread): chunk writes, then GroupCommit's passes -----

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self._fd = self._maildir.create(self.queue_id)
            self._created = True
        try:
            write_all(self._fd, data)
        except OSError as e:
            raise self._named(e)

    def _named(self, error: OSError) -> OSError:
        """``error`` of a write or fsync of the ``tmp/`` file (which carry no file name)
        with that file's path, for the one log line a failed message gets."""
        if error.filename is None:
            error.filename = self._maildir.tmp_path(self.queue_id)
        return error

    def _write_rest(self, data: bytes) -> None:
        """GroupCommit's first pass: the last bytes into ``tmp/`` (the file is made now
        for a small message)."""
        self._write(data)

    def _start_writeback(self, data: bytes) -> None:
        """Second pass: queue the file's data for the disk, without waiting (the fsync
        that follows makes it durable; saslsmtp.writeback)."""
        assert self._fd is not None
        start_writeback(self._fd)

    def _sync(self, data: bytes) -> None:
        """Third pass: fsync and close the file."""
        fd, self._fd = self._fd, None
        assert fd is not None
        try:
            os.fsync(fd)
        except OSError as e:
            raise self._named(e)
        finally:
            os.close(fd)

    def _publish(self, data: bytes) -> None:
        """Fourth pass: rename it into ``new/`` (GroupCommit fsyncs ``new/`` after)."""
        self._maildir.rename_new(self.queue_id)
        self._created = False

    def _drop(self) -> None:
        """A pass failed: remove the ``tmp/`` file now (same job), never raise."""
        try:
            self._discard()
        except OSError:
            pass

    def _discard(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if not self._created:
            return  # no tmp/ file: never made (e.g. the Maildir is not writable) or renamed
        self._created = False
        try:
            os.unlink(self._maildir.tmp_path(self.queue_id))
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
        if self._tail is None:
            self._tail = succeed(None)
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
        assert self._tail is not None
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
        if self._tail is None:  # nothing written yet (a small message): straight in
            return self._commit(rest)
        result: Deferred[SMTPReply] = Deferred()

        def written(_: Any) -> None:
            if self._error is not None:
                failure = self._error
                self._runner.run(self._discard).addErrback(lambda _: None)
                result.errback(failure)
            else:
                self._commit(rest).chainDeferred(result)
        self._tail.addCallback(written)
        return result

    def _commit(self, rest: bytes) -> "Deferred[SMTPReply]":
        self._committing = True
        d = self._maildir.committer(self._runner).submit(self, rest)
        return d.addCallback(_queued)

    def abort(self) -> None:
        """The message will not be delivered: close and remove the ``tmp/`` file (a
        message already in a commit batch is stored; the client is gone anyway)."""
        if self._aborted:
            return
        self._aborted = True
        self._buffer, self._buffered = [], 0
        self._producer = None
        if self._committing and not self._maildir.committer(self._runner).withdraw(self):
            return  # its batch runs: it is stored, as if the client had waited
        if self._tail is None and not self._created and self._fd is None:
            return  # nothing on disk yet
        tail = self._tail if self._tail is not None else succeed(None)
        tail.addBoth(lambda _: self._runner.run(self._discard)).addErrback(
            lambda f: log.failure("could not remove {id}", failure=f, id=self.queue_id))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer

    def unregisterProducer(self) -> None:
        if self._paused and self._producer is not None:
            self._producer.resumeProducing()
        self._paused = False
        self._producer = None


#: GroupCommit's passes over a batch, in order (each over every message still in the batch).
_PASSES = (MaildirSink._write_rest, MaildirSink._start_writeback, MaildirSink._sync,
           MaildirSink._publish)


def _queued(name: str) -> SMTPReply:
    return REPLIES["message_accepted"].with_text(f"OK: queued as {name}")


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


class MaildirDelivery(EnvelopeAvatar):
    """The avatar of an authenticated user: every recipient goes into one Maildir."""

    def __init__(self, username: str, maildir: Maildir, runner: BlockingRunner) -> None:
        super().__init__(username)
        self._maildir = maildir
        self._runner = runner

    def begin_transaction(self, client: Any) -> MaildirEnvelope:
        return MaildirEnvelope(self._maildir, self._runner)


class MaildirRealm(EnvelopeRealm):
    """Gives each authenticated user a ``MaildirDelivery`` into the configured Maildir."""

    def __init__(self, maildir: Maildir, runner: BlockingRunner) -> None:
        self.maildir = maildir
        self.runner = runner

    def avatar(self, username: str) -> MaildirDelivery:
        return MaildirDelivery(username, self.maildir, self.runner)


#: Dovecot's rule: a file in ``tmp/`` this old is a write that was killed, not one in flight.
STALE_TMP_SECONDS = 36 * 3600


def maildir_problem(path: str | Path) -> str | None:
    """Why ``prepare_maildir`` would fail for this process, found without changing
    anything that stays: ``cannot use PATH: REASON``, or ``None``.  The mode bits say
    yes to root everywhere, but a read-only mount or a pseudo-filesystem (``/proc``)
    still refuses, so a folder is really made (and removed) where ``prepare_maildir``
    would make one."""
    maildir = Path(path)
    existing = maildir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        for sub in ("", "tmp", "new", "cur"):
            if (maildir / sub).exists() and not (maildir / sub).is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR),
                                         str(maildir / sub))
        if all((maildir / sub).is_dir() for sub in ("tmp", "new", "cur")):
            probe = maildir / "tmp"  # in use already: a file will be made here
        elif existing.is_dir():
            probe = existing
        else:
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
    except OSError as e:
        return f"cannot use {e.filename}: {e.strerror}"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".saslsmtp-check-", dir=probe))
    except OSError as e:  # named as the start names it: the folder it could not make
        return f"cannot use {maildir if probe == existing else probe}: {e.strerror}"
    return None


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
