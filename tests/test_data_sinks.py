"""DATA through a message sink, over a string transport: the Maildir sink writes the
message in chunks as it arrives and answers ``250 ... queued as <name>`` only once the
file is fsynced and in ``new/``; the size and line limits hold, and neither the Maildir
nor a relay's upstream gets a message another server could split (SMTP smuggling)."""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet import defer

from saslsmtp.delivery import Maildir, MaildirRealm
from saslsmtp.testing import SMTPHarness
from saslsmtp.threads import SynchronousRunner

USERS = {"tim": "tanstaaftanstaaf"}
START = (b"MAIL FROM:<tim@example.test>\r\nRCPT TO:<a@example.test>\r\nDATA\r\n")
DATA_OK = b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"


class ManualRunner:
    """A blocking runner whose jobs run when the test says so (to see the order)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[..., Any], tuple, defer.Deferred]] = []

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.jobs.append((f, args, d))
        return d

    def run_all(self) -> None:
        while self.jobs:
            self.run_one()

    def run_one(self) -> None:
        f, args, d = self.jobs.pop(0)
        try:
            result = f(*args)
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def harness(tmp_path: Path, runner: Any, **settings: Any) -> SMTPHarness:
    realm = MaildirRealm(Maildir(tmp_path / "mail", "mx.example.test"), runner)
    h = SMTPHarness(users=USERS, realm=realm, **settings)
    h.login("tim", "tanstaaftanstaaf")
    return h


def test_maildir_250_only_after_the_file_is_in_new(tmp_path: Path) -> None:
    """The body goes to tmp/ in chunks; no 250 until the blocking steps (write, fsync,
    rename) ran; the 250 names the file; pipelined commands wait for it."""
    runner = ManualRunner()
    h = harness(tmp_path, runner)
    assert h.send(START) == DATA_OK
    body = b"Subject: big\r\n\r\n" + b"..x\r\n" * 100000 + b".\r\nNOOP\r\n"
    for i in range(0, len(body), 65536):
        assert h.send(body[i:i + 65536]) == b""
    assert files(tmp_path / "mail" / "new") == []
    runner.run_all()
    out = h.take()
    [name] = [p.name for p in (tmp_path / "mail" / "new").iterdir()]
    assert out == f"250 2.0.0 OK: queued as {name}\r\n".encode() + b"250 2.0.0 OK\r\n"
    stored = (tmp_path / "mail" / "new" / name).read_bytes()
    assert stored.startswith(b"Received: from client.example ([192.0.2.10])\n\tby ")
    assert stored.endswith(b"\nSubject: big\n\n" + b".x\n" * 100000)
    assert files(tmp_path / "mail" / "tmp") == []


def test_maildir_sink_pauses_the_client_while_the_disk_lags(tmp_path: Path) -> None:
    """More than the high-water mark waiting for the disk pauses the client's transport;
    it resumes once the writes are done."""
    runner = ManualRunner()
    h = harness(tmp_path, runner)
    h.send(START)
    h.send(b"x" * 1000 + b"\r\n")
    for _ in range(40):
        h.send((b"y" * 998 + b"\r\n") * 64)
    assert h.transport.producerState == "paused"
    runner.run_all()
    assert h.transport.producerState == "producing"
    h.send(b".\r\n")
    runner.run_all()
    assert h.take().startswith(b"250 2.0.0 OK: queued as ")


def test_oversize_and_overlong_are_refused_at_the_dot_and_leave_no_file(tmp_path: Path) -> None:
    """Over max_message_size: 552 at the final dot; a line over 16384 octets: 554 5.6.0;
    the tmp/ file is removed and nothing reaches new/."""
    runner = ManualRunner()
    h = harness(tmp_path, runner, max_message_size=5000)
    h.send(START)
    h.send(b"z" * 998 + b"\r\n")
    out = h.send((b"z" * 998 + b"\r\n") * 10 + b".\r\n")
    runner.run_all()
    assert out + h.take() == b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    h.send(START)
    h.take()
    out = h.send(b"q" * 20000 + b"\r\nshort\r\n.\r\n")
    runner.run_all()
    assert out + h.take() == b"554 5.6.0 Message contains a line longer than 16384 octets\r\n"
    assert files(tmp_path / "mail" / "new") == files(tmp_path / "mail" / "tmp") == []


# SMTP smuggling: what the client sends after 354, then a second transaction hidden
# behind a non-standard end of data (LF . LF, LF . CRLF, CR . CRLF) and a stray CR
SMUGGLING = (b"Subject: one\r\n\r\nbare\nline\n.\nMAIL FROM:<ceo@example.test>\r\n"
             b"RCPT TO:<victim@example.test>\r\nDATA\r\nSubject: two\n.\r\nQUIT\r\n"
             b"\r.\r\nx\ry\r\n.\r\nNOOP\r\n")


def test_smuggled_end_of_data_stays_in_one_maildir_message(tmp_path: Path) -> None:
    """The Maildir gets ONE message, its lines all ending in LF (the bare LFs read as line
    ends, the non-standard dot lines as empty lines, the stray CRs as spaces), answered
    once at the real final dot; the NOOP after it is a command again."""
    h = harness(tmp_path, SynchronousRunner())
    assert h.send(START) == DATA_OK
    out = h.send(SMUGGLING)
    name = queued_name(out[:out.index(b"\r\n") + 2])
    assert out.endswith(b"\r\n250 2.0.0 OK\r\n") and out.count(b"\r\n") == 2
    assert files(tmp_path / "mail" / "new") == [name]
    stored = (tmp_path / "mail" / "new" / name).read_bytes()
    assert stored[stored.index(b"Subject: one"):] == (
        b"Subject: one\n\nbare\nline\n\nMAIL FROM:<ceo@example.test>\nRCPT TO:<victim@example.test>\n"
        b"DATA\nSubject: two\n\nQUIT\n .\nx y\n")
    assert b"\r" not in stored


def test_smuggled_end_of_data_is_relayed_as_one_canonical_message() -> None:
    """Relayed: the upstream gets one DATA whose lines all end in CRLF, no bare LF, no
    stray CR, dots stuffed, and one final dot: nothing in it another server could end a
    message at.  (The upstream is the relay tests' StringTransport endpoint.)"""
    from saslsmtp.relay.delivery import RelayRealm
    from tests.test_relay_client import greet, make

    client, upstream, _ = make()
    h = SMTPHarness(users=USERS, realm=RelayRealm(client))
    h.login("tim", "tanstaaftanstaaf")
    assert h.send(b"MAIL FROM:<tim@example.test>\r\n") == b""
    greet(upstream)
    assert upstream.said() == b"MAIL FROM:<tim@example.test>\r\n"
    upstream.answer(b"250 2.1.0 Ok\r\n")
    assert h.send(b"RCPT TO:<a@example.test>\r\n") == b"250 2.1.0 Ok\r\n"
    assert upstream.said() == b"RCPT TO:<a@example.test>\r\n"
    upstream.answer(b"250 2.1.5 Ok\r\n")
    assert h.send(b"DATA\r\n") == b"250 2.1.5 Ok\r\n"
    assert upstream.said() == b"DATA\r\n"
    upstream.answer(b"354 go ahead\r\n")
    assert h.take() == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert h.send(SMUGGLING) == b""
    sent = upstream.said()
    assert sent[sent.index(b"Subject: one"):] == (
        b"Subject: one\r\n\r\nbare\r\nline\r\n\r\nMAIL FROM:<ceo@example.test>\r\n"
        b"RCPT TO:<victim@example.test>\r\nDATA\r\nSubject: two\r\n\r\nQUIT\r\n .\r\n"
        b"x y\r\n.\r\n")
    assert sent.count(b"\n") == sent.count(b"\r\n") == sent.count(b"\r")
    upstream.answer(b"250 2.0.0 Ok: queued as 4XYZ\r\n")
    assert h.take() == b"250 2.0.0 Ok: queued as 4XYZ\r\n250 2.0.0 OK\r\n"


def test_354_answered_late_takes_queued_body_lines(tmp_path: Path) -> None:
    """A client that sends body lines right behind DATA, while the DATA answer is still
    pending (a relay waiting for its upstream), gets them counted as body, in order."""
    h = SMTPHarness(users=USERS)
    h.login("tim", "tanstaaftanstaaf")
    h.send(b"MAIL FROM:<tim@example.test>\r\nRCPT TO:<a@example.test>\r\n")
    envelope = h.protocol.transaction.envelope
    pending: defer.Deferred = defer.Deferred()
    original = envelope.data
    envelope.data = lambda: pending  # type: ignore[method-assign]
    h.take()
    assert h.send(b"DATA\r\nSubject: late\r\n\r\n..one\r\n.\r\nNOOP\r\n") == b""
    pending.callback(original())
    assert h.take() == (b"354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 OK: queued\r\n"
                        b"250 2.0.0 OK\r\n")
    assert h.realm.messages[0].endswith(b"Subject: late\r\n\r\n.one\r\n")



# -- group commit: one runner job per batch, one directory fsync per batch ---------------

MESSAGE = b"Subject: gc\r\n\r\nbody\r\n.\r\n"
ACCEPTED = re.compile(rb"^250 2\.0\.0 OK: queued as (\S+)\r\n$")


def disk_calls(monkeypatch: pytest.MonkeyPatch, fail: str | None = None) -> list[str]:
    """Record (and optionally fail) the durability steps: "fsync file", "fsync dir",
    "rename <name>"; ``fail`` names the kind of fsync that raises EIO."""
    calls: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        calls.append(f"fsync {kind}")
        if kind == fail:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        calls.append(f"rename {os.path.basename(dst)}")
        real_rename(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    return calls


def three_sessions(tmp_path: Path, runner: Any) -> list[SMTPHarness]:
    """Three logged-in connections to one server (one Maildir), each with a message
    whose final dot was sent."""
    first = harness(tmp_path, runner)
    sessions = [first, first.connect(), first.connect()]
    for h in sessions[1:]:
        h.login("tim", "tanstaaftanstaaf")
    for h in sessions:
        h.take()
        assert h.send(START) == DATA_OK
        assert h.send(MESSAGE) == b""
    return sessions


def queued_name(reply: bytes) -> str:
    match = ACCEPTED.match(reply)
    assert match, reply
    return match.group(1).decode()


def test_messages_ending_together_share_one_directory_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first message is committed alone; two that end while its batch runs form the
    next batch: one runner job, both files fsynced, then both renamed, then ONE fsync of
    new/, and no 250 before the directory fsync that covers the message's rename."""
    calls = disk_calls(monkeypatch)
    runner = ManualRunner()
    sessions = three_sessions(tmp_path, runner)
    assert len(runner.jobs) == 1  # the first batch; the other two wait for it
    runner.run_one()
    first = queued_name(sessions[0].take())
    assert calls == ["fsync file", f"rename {first}", "fsync dir"]
    assert [h.take() for h in sessions[1:]] == [b"", b""]
    assert len(runner.jobs) == 1  # both waiting messages in one job
    calls.clear()
    runner.run_one()
    names = [queued_name(h.take()) for h in sessions[1:]]
    assert calls == ["fsync file", "fsync file", f"rename {names[0]}", f"rename {names[1]}",
                     "fsync dir"]
    assert files(tmp_path / "mail" / "new") == sorted([first] + names)
    assert files(tmp_path / "mail" / "tmp") == []
    realm: Any = sessions[0].realm
    committer = realm.maildir.committer(runner)
    assert committer.batches == 2


def test_a_failed_file_fsync_answers_451_and_stores_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync of the message file fails (EIO): 451 4.3.0, never a 250, no file left in
    tmp/ or new/, no rename, and the connection goes on (RSET answers)."""
    calls = disk_calls(monkeypatch, fail="file")
    h = harness(tmp_path, SynchronousRunner())
    assert h.send(START) == DATA_OK
    assert h.send(MESSAGE) == b"451 4.3.0 Local error in processing; try again later\r\n"
    assert calls == ["fsync file"]
    assert files(tmp_path / "mail" / "new") == files(tmp_path / "mail" / "tmp") == []
    assert h.send(b"RSET\r\n") == b"250 2.0.0 Reset state\r\n"


def test_a_failed_directory_fsync_answers_451_to_the_whole_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fsync of new/ fails: every message of that batch gets 451, none a 250."""
    runner = ManualRunner()
    sessions = three_sessions(tmp_path, runner)
    runner.run_one()
    assert ACCEPTED.match(sessions[0].take())
    disk_calls(monkeypatch, fail="dir")
    runner.run_one()
    assert [h.take() for h in sessions[1:]] == [
        b"451 4.3.0 Local error in processing; try again later\r\n"] * 2


def test_a_message_waiting_for_its_batch_is_dropped_when_the_client_goes(tmp_path: Path) -> None:
    """A client that disconnects while its message waits for the next batch: it is taken
    out of the batch and its tmp/ file removed; the others are stored."""
    runner = ManualRunner()
    sessions = three_sessions(tmp_path, runner)
    sessions[1].close()
    runner.run_all()
    stored = [queued_name(sessions[0].take()), queued_name(sessions[2].take())]
    assert files(tmp_path / "mail" / "new") == sorted(stored)
    assert files(tmp_path / "mail" / "tmp") == []


def test_every_split_of_the_stream_stores_the_same_bytes(tmp_path: Path) -> None:
    """The client's bytes cut at every position (inside the final CRLF.CRLF, inside a
    stuffed dot, inside the CRLF before it): the same file in new/ every time."""
    stream = b"Subject: split\r\n\r\n..dot\r\n..\r\nx\r\n...\r\n.\r\nRSET\r\n"
    h = harness(tmp_path, SynchronousRunner())
    stored = set()
    for cut in range(len(stream) + 1):
        assert h.send(START) == DATA_OK
        out = h.send(stream[:cut]) + h.send(stream[cut:])
        name = queued_name(out[:out.index(b"\r\n") + 2])
        assert out.endswith(b"\r\n250 2.0.0 Reset state\r\n")
        data = (tmp_path / "mail" / "new" / name).read_bytes()
        stored.add(data[data.index(b"Subject"):])  # the Received header has the time
    assert stored == {b"Subject: split\n\n.dot\n.\nx\n..\n"}


def test_the_realms_give_envelope_avatars_and_refuse_other_interfaces(tmp_path: Path) -> None:
    """Both daemon realms (Maildir, relay) share ``EnvelopeRealm``: the avatar is named
    after the login (bytes decoded, a bad byte replaced), any other interface is refused,
    and the stock ``IMessageDelivery`` methods refuse every recipient."""
    from twisted.cred.portal import IRealm
    from twisted.mail import smtp
    from twisted.mail.interfaces import IMessageDelivery

    from saslsmtp.relay.delivery import RelayDelivery, RelayRealm

    maildir = MaildirRealm(Maildir(tmp_path / "mail", "mx.example.test"), SynchronousRunner())
    relay = RelayRealm(client=object())  # type: ignore[arg-type]  # never called here
    for realm, kind in ((maildir, "MaildirDelivery"), (relay, "RelayDelivery")):
        assert IRealm.providedBy(realm)
        interface, avatar, logout = realm.requestAvatar(b"tim\xff", None, IMessageDelivery)
        assert interface is IMessageDelivery and IMessageDelivery.providedBy(avatar)
        assert type(avatar).__name__ == kind and avatar.username == "tim\ufffd"
        assert logout() is None
        with pytest.raises(NotImplementedError, match=f"{type(realm).__name__} only provides"):
            realm.requestAvatar(b"tim", None, IRealm)
        user = smtp.User(b"a@example.test", None, None, smtp.Address(b"tim@example.test"))
        with pytest.raises(smtp.SMTPBadRcpt):
            avatar.validateTo(user)
        origin = smtp.Address(b"tim@example.test")
        assert avatar.validateFrom(None, origin) is origin
        assert avatar.receivedHeader(None, origin, [user]) is None
    assert isinstance(relay.requestAvatar((), None, IMessageDelivery)[1], RelayDelivery)
