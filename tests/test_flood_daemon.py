"""Hostile and sloppy clients against a real ``twistd`` on loopback.

Memory stays bounded before authentication: clients that pipeline megabytes of commands
without reading the replies do not grow the daemon (bounded in time), and are cut off
with 421.  SMTP smuggling and a body sent before its DATA was answered: a client with
bare LF line ends is served, a hidden second message stays text of the first (in the
Maildir and at a relay's upstream), and what cannot be commands is not run as such."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path

from tests.daemonclient import SMTPClient
from tests.mailsink import MailSink
from tests.support import Daemon, free_port, start_daemon, wait_for, write_config

FLOOD_BYTES = 24 * 1024 * 1024
RSS_LIMIT = 150 * 1024 * 1024


def _rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Flooder(threading.Thread):
    """One connection sending ``FLOOD_BYTES`` of ``line`` without reading, then reading
    whatever the server still has for it until it closes."""

    def __init__(self, port: int, line: bytes, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.stop = port, stop
        self.chunk = line * (1024 * 1024 // len(line))
        self.sent = 0
        self.received = b""
        self.closed_by_server = False

    def run(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            try:
                while self.sent < FLOOD_BYTES and not self.stop.is_set():
                    s.sendall(self.chunk)  # blocks (timeout) once the server stops reading
                    self.sent += len(self.chunk)
            except (socket.timeout, OSError):
                pass
            s.settimeout(20)
            try:
                while True:
                    data = s.recv(1 << 20)
                    if not data:
                        self.closed_by_server = True
                        break
                    self.received = (self.received + data)[-4096:]
            except ConnectionResetError:
                self.closed_by_server = True
            except OSError:
                pass


def test_four_flooding_connections_keep_the_daemon_small(tmp_path: Path) -> None:
    """Four unauthenticated connections each pipeline 24 MiB of HELP or EHLO lines without
    reading: the daemon stays under 150 MB RSS, every one of them is closed by the
    server, and a well-behaved client is still served."""
    port = free_port()
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    config = write_config(tmp_path, '[backends.u]\ntype = "file"\npath = "users"\n',
                          listen=[f"tcp:{port}:interface=127.0.0.1"])
    daemon = start_daemon(config, port, tmp_path / "daemon.log")
    stop = threading.Event()
    try:
        pid = daemon.process.pid
        flooders = [Flooder(port, line, stop) for line in (b"HELP\r\n", b"EHLO x\r\n") * 2]
        for f in flooders:
            f.start()
        peak, deadline = 0, time.monotonic() + 90
        while any(f.is_alive() for f in flooders) and time.monotonic() < deadline:
            peak = max(peak, _rss(pid))
            if peak > RSS_LIMIT:
                break  # the defect: stop before it hurts the machine
            time.sleep(0.05)
        stop.set()
        for f in flooders:
            f.join(30)
        assert peak < RSS_LIMIT, f"daemon grew to {peak // 2**20} MiB"
        assert all(f.closed_by_server for f in flooders), [f.sent for f in flooders]
        # HELP hits the junk command limit first; EHLO is cut off as a flood.  Whether the
        # 421 itself reaches a client that never read is up to TCP (the server closes with
        # unread input, which resets the connection): the transcript tests check its bytes,
        # the log says it was sent.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(100).startswith(b"220 ")
            s.sendall(b"EHLO ok.example\r\n")
            assert s.recv(1000).startswith(b"250-")
    finally:
        stop.set()
        daemon.stop()
    log = daemon.log_text()
    assert log.count("pipelined too much without reading the replies") == 2, log[-2000:]


# after 354: a legitimate first line, then a second transaction hidden behind non-standard
# ends of data (LF . LF, LF . CRLF, CR . CRLF) and a stray CR, then the real final dot
SMUGGLING = (b"Subject: one\r\n\r\nhello\n.\nMAIL FROM:<ceo@example.test>\r\n"
             b"RCPT TO:<victim@example.test>\r\nDATA\r\nSubject: forged\n.\r\n"
             b"\r.\r\nx\ry\r\n.\r\n")
CANONICAL = (b"Subject: one\r\n\r\nhello\r\n\r\nMAIL FROM:<ceo@example.test>\r\n"
             b"RCPT TO:<victim@example.test>\r\nDATA\r\nSubject: forged\r\n\r\n .\r\n"
             b"x y\r\n")
LOGIN = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret")


def alice_daemon(tmp_path: Path, delivery: str = "") -> tuple[Daemon, int]:
    port = free_port()
    (tmp_path / "users").write_text("alice:{PLAIN}secret\n")
    config = write_config(tmp_path, '[backends.u]\ntype = "file"\npath = "users"\n',
                          listen=[f"tcp:{port}:interface=127.0.0.1"])
    if delivery:
        text = config.read_text()
        start = text.index("[delivery]")
        end = text.index("\n\n", start)
        config.write_text(text[:start] + delivery + text[end:])
    return start_daemon(config, port, tmp_path / "daemon.log"), port


def sloppy_message(port: int) -> bytes:
    """A client whose commands end in bare LF sends SMUGGLING; the replies after 354."""
    client = SMTPClient(port, timeout=20)
    try:
        client.sock.sendall(b"EHLO sloppy.example\n")
        assert client.reply().startswith(b"250-")
        client.sock.sendall(LOGIN + b"\n")
        assert client.reply() == b"235 2.7.0 Authentication successful\r\n"
        for line, code in ((b"MAIL FROM:<alice@example.test>", b"250 "),
                           (b"RCPT TO:<bob@example.test>", b"250 "), (b"DATA", b"354 ")):
            client.sock.sendall(line + b"\n")
            assert client.reply().startswith(code)
        client.sock.sendall(SMUGGLING + b"NOOP\r\n")
        return client.reply() + client.reply()
    finally:
        client.close()


def test_smuggling_through_the_daemon_into_the_maildir(tmp_path: Path) -> None:
    """One file in new/, with the smuggled transaction as text and LF line ends only
    (no CR at all), answered once; the NOOP after the real final dot is a command."""
    daemon, port = alice_daemon(tmp_path)
    try:
        replies = sloppy_message(port)
        assert replies.startswith(b"250 2.0.0 OK: queued as ") and replies.endswith(
            b"\r\n250 2.0.0 OK\r\n") and replies.count(b"\r\n") == 2
    finally:
        daemon.stop()
    [stored] = [p.read_bytes() for p in (tmp_path / "mail" / "new").iterdir()]
    assert stored[stored.index(b"Subject: one"):] == CANONICAL.replace(b"\r\n", b"\n")
    assert b"\r" not in stored


def test_smuggling_through_the_daemon_to_a_relay_upstream(tmp_path: Path) -> None:
    """Relayed to an aiosmtpd upstream: one message arrives, its content the same
    canonical bytes (CRLF line ends only, no stray CR), and the client gets the
    upstream's 250."""
    sink = MailSink(free_port())
    sink.start()
    try:
        daemon, port = alice_daemon(tmp_path, f'[delivery]\ntype = "smtp"\n'
                                              f'endpoint = "tcp:127.0.0.1:{sink.port}"')
        try:
            replies = sloppy_message(port)
            assert replies == b"250 2.0.0 OK: queued\r\n250 2.0.0 OK\r\n"
            wait_for(lambda: sink.messages, 10, "the relayed message")
        finally:
            daemon.stop()
    finally:
        sink.stop()
    [message] = sink.messages
    assert message.rcpt_tos == ("bob@example.test",)
    assert message.content[message.content.index(b"Subject: one"):] == CANONICAL


def test_a_body_that_did_not_wait_is_not_run_as_commands(tmp_path: Path) -> None:
    """A client sends its whole session at once, but its DATA is refused (no RCPT): the
    503, then 421 4.5.0 and the close; the RSET/MAIL/RCPT/DATA in its body never run
    (nothing is stored).  A message header sent as a command later closes too."""
    daemon, port = alice_daemon(tmp_path)
    try:
        client = SMTPClient(port, timeout=20)
        client.sock.sendall(b"EHLO eager.example\r\n" + LOGIN + b"\r\n")
        assert client.reply().startswith(b"250-") and client.reply().startswith(b"235 ")
        client.sock.sendall(b"MAIL FROM:<alice@example.test>\r\nDATA\r\nRSET\r\n"
                            b"MAIL FROM:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
                            b"DATA\r\nSubject: run me\r\n\r\n.\r\nQUIT\r\n")
        assert client.reply() == b"250 2.1.0 Sender OK\r\n"
        assert client.reply() == b"503 5.5.1 Need RCPT command first\r\n"
        assert client.reply() == (
            b"421 4.5.0 Error: SMTP protocol synchronization, closing connection\r\n")
        assert client.sock.recv(100) == b""
        client.sock.close()
        client = SMTPClient(port, timeout=20)
        assert client.command(b"EHLO late.example").startswith(b"250-")
        assert client.command(b"Subject: run me") == (
            b"421 4.7.0 Not an SMTP command, closing connection\r\n")
        assert client.sock.recv(100) == b""
        client.sock.close()
    finally:
        daemon.stop()
    assert not (tmp_path / "mail" / "new").exists() or not list((tmp_path / "mail" / "new").iterdir())
    log = daemon.log_text()
    assert "sent more input before the reply to its DATA; closing" in log
    assert "sent a message header or an HTTP request as a command; closing" in log
