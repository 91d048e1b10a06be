"""The real daemon (``twistd -n saslsmtp`` in a subprocess) delivering onward: into a
Maildir with bounded memory whatever the line lengths, and to an aiosmtpd upstream
(``[delivery] type = "smtp"``): replies passed through, an upstream that is down or dies
mid-DATA gives 4xx, concurrent clients' messages arrive exactly once, a 50 MB message
relays with bounded memory, and the sender policy answers MAIL FROM.  A scripted upstream
on a real socket that answers DATA with 250: the client gets 451 4.5.0, the upstream not
one message byte, the log a warning, and the retry reaches it byte for byte."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest

from tests.daemonclient import RSSSampler, SMTPClient, memory
from tests.mailsink import running_sink
from tests.support import ROOT, Daemon, free_port, start_daemon, write_config

USER, PASSWORD = "alice@example.test", "wonderland"
MB = 1024 * 1024


def daemon_config(tmp_path: Path, port: int, delivery: str = "", *, server: str = "",
                  submission: str = "") -> Path:
    """The test config with another ``[delivery]`` table and extra ``[server]`` keys."""
    users = tmp_path / "users"
    users.write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
    path = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{users}"\n',
                        listen=[f"tcp:{port}:interface=127.0.0.1"], extra=submission)
    text = path.read_text()
    if delivery:
        text = re.sub(r'\[delivery\]\ntype = "maildir"\npath = "[^"]*"\n', delivery, text)
    if server:
        text = text.replace('hostname = "mx.example.test"\n',
                            f'hostname = "mx.example.test"\n{server}\n')
    path.write_text(text)
    return path


def relay_delivery(port: int, **extra: str) -> str:
    lines = ['[delivery]', 'type = "smtp"', f'endpoint = "tcp:127.0.0.1:{port}"',
             'timeout = 10.0']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def run_daemon(tmp_path):
    started: list[Daemon] = []

    def run(config: Path, port: int) -> Daemon:
        daemon = start_daemon(config, port, tmp_path / f"daemon-{len(started)}.log")
        started.append(daemon)
        return daemon
    yield run
    for daemon in started:
        daemon.stop()


def two_byte_lines(total: int) -> Iterator[bytes]:
    block = b"ab\r\n" * (65536 // 4)
    for _ in range(total // len(block)):
        yield block


def start_message(client: SMTPClient, rcpt: str = "bob@example.test") -> None:
    assert client.login(USER, PASSWORD).startswith(b"235 ")
    assert client.command(f"MAIL FROM:<{USER}>").startswith(b"250 ")
    assert client.command(f"RCPT TO:<{rcpt}>").startswith(b"250 ")
    assert client.command("DATA").startswith(b"354 ")
    client.stream([b"Message-ID: <big@example.test>\r\nSubject: big\r\n\r\n"])


def test_25_mb_of_two_byte_lines_into_maildir_with_bounded_memory(tmp_path, run_daemon):
    """25 MB of 2-octet lines (6.5 million lines) into the Maildir: the daemon's RSS
    grows by less than 10 MB, the message is complete on disk (LF line ends), and the
    250 names the file."""
    port = free_port()
    daemon = run_daemon(daemon_config(tmp_path, port, server="max_message_size = 60000000"),
                        port)
    client = SMTPClient(port)
    start_message(client)  # warm up every code path with a first small message
    client.stream([b"small\r\n"])
    assert client.command(".").startswith(b"250 2.0.0 OK: queued as ")
    before = memory(daemon.process.pid)["VmRSS"]
    client.command("MAIL FROM:<%s>" % USER)
    client.command("RCPT TO:<bob@example.test>")
    assert client.command("DATA").startswith(b"354 ")
    started = time.monotonic()
    with RSSSampler(daemon.process.pid) as sampler:
        total = client.stream(two_byte_lines(25 * 1000 * 1000))
        final = client.command(".")
    elapsed = time.monotonic() - started
    client.close()
    growth = sampler.peak - before
    print(f"\n25 MB of 2-octet lines into Maildir: {elapsed:.2f}s, RSS {before / MB:.1f} MB"
          f" -> peak {sampler.peak / MB:.1f} MB (+{growth / MB:.2f} MB)")
    match = re.match(rb"250 2\.0\.0 OK: queued as (\S+)\r\n$", final)
    assert match, final
    stored = tmp_path / "mail" / "new" / match.group(1).decode()
    assert stored.stat().st_size > total * 3 // 4  # CRLF -> LF: 3 of every 4 octets
    with open(stored, "rb") as f:
        f.seek(-9, os.SEEK_END)
        assert f.read() == b"ab\nab\nab\n"
    assert growth < 10 * MB, f"RSS grew by {growth / MB:.1f} MB"
    log = daemon.log_text()
    assert re.search(rf"message {re.escape(match.group(1).decode())} accepted: from=<{USER}>"
                     rf" recipients=1 size=\d+ user={USER}", log), log


@pytest.fixture
def sink():
    yield from running_sink()


def test_relay_to_aiosmtpd_passes_replies_through(tmp_path, run_daemon, sink):
    """MAIL/RCPT forwarded as sent (AUTH= from the client accepted), the upstream's RCPT
    refusal is our client's RCPT reply, the final reply is the upstream's 250, and the
    message (with our Received header, dot-unstuffed) arrives once; one log line."""
    port = free_port()
    daemon = run_daemon(daemon_config(tmp_path, port, relay_delivery(sink.port)), port)
    client = SMTPClient(port)
    assert client.login(USER, PASSWORD).startswith(b"235 ")
    assert client.command(f"MAIL FROM:<{USER}> SIZE=100 AUTH=<>") == b"250 2.0.0 OK\r\n"  # aiosmtpd: no enhanced code
    assert client.command("RCPT TO:<reject@example.test>") == (
        b"550 5.1.1 <reject@example.test>: Recipient address rejected: User unknown\r\n")
    assert client.command("RCPT TO:<bob@example.test>") == b"250 2.1.5 OK\r\n"
    assert client.command("DATA") == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    client.stream([b"Message-ID: <one@example.test>\r\n\r\n..dotted\r\nend\r\n"])
    assert client.command(".") == b"250 2.0.0 OK: queued\r\n"
    client.close()
    [message] = sink.messages
    assert message.mail_from == USER and message.rcpt_tos == ("bob@example.test",)
    assert message.content.startswith(b"Received: from client.example ([127.0.0.1])\r\n\tby"
                                      b" mx.example.test (saslsmtp) with ESMTPA\r\n\t"
                                      b"(authenticated user alice@example.test)")
    assert message.content.endswith(b"Message-ID: <one@example.test>\r\n\r\n.dotted\r\nend\r\n")
    assert re.search(rf"message [0-9A-F]+ accepted: from=<{USER}> recipients=1 size=\d+"
                     rf" user={USER} reply=250 OK: queued", daemon.log_text())


def test_upstream_down_is_4xx_and_nothing_claims_delivery(tmp_path, run_daemon):
    """Nobody listens at the upstream's address: MAIL gets 451 4.4.1; no 250 anywhere."""
    port = free_port()
    run_daemon(daemon_config(tmp_path, port, relay_delivery(free_port())), port)
    client = SMTPClient(port)
    assert client.login(USER, PASSWORD).startswith(b"235 ")
    assert client.command(f"MAIL FROM:<{USER}>") == (
        b"451 4.4.1 Upstream server unavailable, try again later\r\n")
    assert client.command("RCPT TO:<bob@example.test>").startswith(b"503 5.5.1 ")
    client.close()


def sink_process(tmp_path: Path, port: int | None = None) -> tuple[subprocess.Popen, int, Path]:
    port, log = port or free_port(), tmp_path / "sink.log"
    process = subprocess.Popen([sys.executable, "-m", "tests.mailsink", str(port), str(log)],
                               cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process, port, log


def test_pool_after_an_upstream_restart_with_smtplib(tmp_path, run_daemon):
    """smtplib, one session, the upstream process restarted on the same port: while our
    connection to it idles in the pool (the next message goes out on a new connection,
    250); between MAIL and RCPT (nothing accepted upstream yet: MAIL goes out again on a
    new connection, and RCPT answers 250); after an accepted RCPT (the next RCPT and
    DATA answer 451 4.4.2, and after RSET the next message goes through).  Every
    accepted message arrives once."""
    import smtplib

    process, sink_port, log = sink_process(tmp_path)
    try:
        port = free_port()
        run_daemon(daemon_config(tmp_path, port, relay_delivery(sink_port)), port)

        def restart() -> None:
            nonlocal process
            process.kill()
            process.wait(10)
            process = sink_process(tmp_path, sink_port)[0]

        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.login(USER, PASSWORD)
            for n in (1, 2):
                assert smtp.sendmail(USER, ["bob@example.test"],
                                     f"Message-ID: <r{n}@example.test>\r\n\r\nhi\r\n") == {}
                if n == 1:
                    restart()  # our connection to it is in the pool
            assert smtp.mail(USER) == (250, b"2.0.0 OK")
            restart()
            assert smtp.rcpt("bob@example.test") == (250, b"2.1.5 OK")
            assert smtp.data("Message-ID: <r3@example.test>\r\n\r\nhi\r\n")[0] == 250
            assert smtp.mail(USER) == (250, b"2.0.0 OK")
            assert smtp.rcpt("bob@example.test") == (250, b"2.1.5 OK")
            restart()
            lost = (451, b"4.4.2 Upstream connection lost, try again later")
            assert smtp.rcpt("carol@example.test") == lost
            assert smtp.docmd("DATA") == lost
            assert smtp.rset()[0] == 250
            assert smtp.sendmail(USER, ["bob@example.test"],
                                 "Message-ID: <r4@example.test>\r\n\r\nhi\r\n") == {}
        ids = [line.split()[-1] for line in log.read_text().splitlines()]
        assert ids == ["<r1@example.test>", "<r2@example.test>", "<r3@example.test>",
                       "<r4@example.test>"], ids
    finally:
        process.kill()
        process.wait(10)


def eighty_octet_lines(total: int) -> Iterator[bytes]:
    block = (b"x" * 78 + b"\r\n") * 820
    for _ in range(total // len(block)):
        yield block


def test_upstream_killed_mid_data_is_4xx(tmp_path, run_daemon):
    """The upstream process is killed 10 MB into a 30 MB message: our client's data is
    still read to the final dot, and the final reply is 451 4.4.2."""
    process, sink_port, log = sink_process(tmp_path)
    try:
        port = free_port()
        daemon = run_daemon(daemon_config(tmp_path, port, relay_delivery(sink_port),
                                          server="max_message_size = 60000000"), port)
        client = SMTPClient(port)
        start_message(client)
        client.stream(eighty_octet_lines(10 * 1000 * 1000))
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        client.stream(eighty_octet_lines(20 * 1000 * 1000))
        final = client.command(".")
        assert final.startswith(b"451 4.4."), final
        assert client.command("NOOP") == b"250 2.0.0 OK\r\n"
        client.close()
        assert not log.exists() or log.read_text() == ""
        assert re.search(r"message \S+ not accepted: .* reply=451 ", daemon.log_text())
    finally:
        process.kill()
        process.wait(10)


def test_50_mb_relay_with_bounded_memory(tmp_path, run_daemon):
    """50 MB relayed to an upstream in another process: the daemon's RSS grows by less
    than 20 MB; the upstream logs the whole message."""
    process, sink_port, log = sink_process(tmp_path)
    try:
        port = free_port()
        daemon = run_daemon(daemon_config(tmp_path, port, relay_delivery(sink_port),
                                          server="max_message_size = 60000000"), port)
        client = SMTPClient(port)
        start_message(client)  # warm up with a small message first
        client.stream([b"small\r\n"])
        assert client.command(".").startswith(b"250 ")
        before = memory(daemon.process.pid)["VmRSS"]
        client.command(f"MAIL FROM:<{USER}>")
        client.command("RCPT TO:<bob@example.test>")
        client.command("DATA")
        started = time.monotonic()
        with RSSSampler(daemon.process.pid) as sampler:
            total = client.stream(eighty_octet_lines(50 * 1000 * 1000))
            final = client.command(".")
        elapsed = time.monotonic() - started
        client.close()
        growth = sampler.peak - before
        print(f"\n50 MB relayed: {elapsed:.2f}s ({total / elapsed / 1e6:.0f} MB/s), RSS"
              f" {before / MB:.1f} MB -> peak {sampler.peak / MB:.1f} MB (+{growth / MB:.2f} MB)")
        assert final == b"250 2.0.0 OK: queued\r\n"
        sizes = [int(line.split()[2]) for line in log.read_text().splitlines()]
        assert len(sizes) == 2 and sizes[1] > total
        assert growth < 20 * MB, f"RSS grew by {growth / MB:.1f} MB"
    finally:
        process.kill()
        process.wait(10)


def test_100_messages_over_16_concurrent_clients_arrive_exactly_once(tmp_path, run_daemon, sink):
    """16 clients at once, 100 messages in all, each with its own Message-ID: the
    upstream has each exactly once and every client got 250."""
    port = free_port()
    run_daemon(daemon_config(tmp_path, port, relay_delivery(sink.port)), port)

    def one_client(index: int) -> list[bytes]:
        client = SMTPClient(port)
        assert client.login(USER, PASSWORD).startswith(b"235 ")
        finals = []
        for n in range(index, 100, 16):
            assert client.command(f"MAIL FROM:<{USER}>").startswith(b"250 ")
            assert client.command("RCPT TO:<bob@example.test>").startswith(b"250 ")
            assert client.command("DATA").startswith(b"354 ")
            client.stream([f"Message-ID: <m{n}@example.test>\r\n\r\nbody {n}\r\n".encode()])
            finals.append(client.command("."))
        client.close()
        return finals

    with ThreadPoolExecutor(16) as pool:
        finals = [f for result in pool.map(one_client, range(16)) for f in result]
    assert finals == [b"250 2.0.0 OK: queued\r\n"] * 100
    ids = sorted(m.message_id for m in sink.messages)
    assert ids == sorted(f"<m{n}@example.test>" for n in range(100))


def test_sender_policy_login_on_the_real_daemon(tmp_path, run_daemon, sink):
    """``sender_policy = "login"`` with ``allow_null_sender = false``: the login's own
    address is relayed, another one and ``<>`` get 553 5.7.1 and never reach the
    upstream."""
    port = free_port()
    run_daemon(daemon_config(tmp_path, port, relay_delivery(sink.port),
                             submission='[submission]\nsender_policy = "login"\n'
                                        'allow_null_sender = false\n'), port)
    client = SMTPClient(port)
    assert client.login(USER, PASSWORD).startswith(b"235 ")
    assert client.command("MAIL FROM:<bob@example.test>") == (
        b"553 5.7.1 <bob@example.test>: Sender address rejected: not owned by user"
        b" alice@example.test\r\n")
    assert client.command("MAIL FROM:<>") == (
        b"553 5.7.1 <>: Sender address rejected: not owned by user alice@example.test\r\n")
    assert client.command(f"MAIL FROM:<{USER}>") == b"250 2.0.0 OK\r\n"
    assert client.command("RCPT TO:<bob@example.test>").startswith(b"250 ")
    assert client.command("DATA").startswith(b"354 ")
    client.stream([b"Subject: mine\r\n\r\nhi\r\n"])
    assert client.command(".") == b"250 2.0.0 OK: queued\r\n"
    client.close()
    assert [m.mail_from for m in sink.messages] == [USER]


class ScriptedUpstream:
    """An SMTP server on a loopback socket, one thread per connection; connection ``i``
    answers from ``scripts[i]`` (a verb, or ``"."`` for the end of data -> the reply
    bytes), good replies otherwise.  ``received[i]``: every byte connection ``i`` got;
    ``closed[i]`` is set when its peer closed it."""

    GOOD = {"EHLO": b"250-upstream.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
            "MAIL": b"250 2.1.0 Ok\r\n", "RCPT": b"250 2.1.5 Ok\r\n", "DATA": b"354 go\r\n",
            ".": b"250 2.0.0 Ok: queued as UP1\r\n", "RSET": b"250 2.0.0 Ok\r\n",
            "QUIT": b"221 2.0.0 Bye\r\n"}

    def __init__(self, scripts: list[dict[str, bytes]],
                 delays: dict[str, float] | None = None) -> None:
        self.scripts = scripts
        self.delays = delays or {}  # verb -> seconds the reply waits (a slow filter)
        self.received: list[bytearray] = []
        self.closed: list[threading.Event] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed by stop()
                return
            index = len(self.received)
            self.received.append(bytearray())
            self.closed.append(threading.Event())
            script = {**self.GOOD, **(self.scripts[index] if index < len(self.scripts) else {})}
            threading.Thread(target=self._serve, args=(conn, index, script), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int, script: dict[str, bytes]) -> None:
        buffer, in_data = b"", False
        with conn:
            conn.sendall(b"220 upstream.test ESMTP\r\n")
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:  # reset: the relay aborted the connection
                    data = b""
                if not data:
                    self.closed[index].set()
                    return
                self.received[index] += data
                buffer += data
                while b"\r\n" in buffer:
                    line, buffer = buffer.split(b"\r\n", 1)
                    if in_data:
                        if line != b".":
                            continue
                        verb, in_data = ".", False
                    else:
                        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode()
                    reply = script.get(verb, b"502 5.5.2 Error: command not recognized\r\n")
                    if verb in self.delays:
                        time.sleep(self.delays[verb])
                    conn.sendall(reply)
                    in_data = verb == "DATA" and reply.startswith(b"354 ")

    def stop(self) -> None:
        self.listener.close()


def test_an_upstream_answering_250_to_data_gets_no_message_byte(tmp_path, run_daemon):
    """A real socket upstream answers DATA with ``250`` instead of ``354``: our client
    gets ``451 4.5.0`` (not the 250, which it would take for a DATA to go on with),
    the upstream connection is closed after ``DATA`` with nothing more written to it,
    and the log names the upstream, the command and the reply.  The client's retry goes
    to a new connection and reaches the upstream byte for byte: our Received header,
    then the message as the client sent it (dot-stuffing and CRLF kept), then the dot."""
    upstream = ScriptedUpstream([{"DATA": b"250 2.0.0 Ok\r\n"}])
    try:
        port = free_port()
        daemon = run_daemon(daemon_config(tmp_path, port, relay_delivery(upstream.port)), port)
        client = SMTPClient(port)
        assert client.login(USER, PASSWORD).startswith(b"235 ")
        assert client.command(f"MAIL FROM:<{USER}>") == b"250 2.1.0 Ok\r\n"
        assert client.command("RCPT TO:<bob@example.test>") == b"250 2.1.5 Ok\r\n"
        assert client.command("DATA") == b"451 4.5.0 Upstream protocol error, try again later\r\n"
        assert upstream.closed[0].wait(10)
        assert bytes(upstream.received[0]).endswith(b"\r\nDATA\r\n")
        assert re.search(r"\[saslsmtp\.relay\.client#warn\] upstream tcp:127\.0\.0\.1:"
                         rf'{upstream.port}: protocol error: DATA answered "250 2\.0\.0 Ok"',
                         daemon.log_text()), daemon.log_text()

        body = (b"From: alice@example.test\r\nSubject: exact\r\n\r\n..leading dot\r\n"
                b"...\r\n..\r\n \r\n\ttab\r\nlast line\r\n")
        assert client.command(f"MAIL FROM:<{USER}>") == b"250 2.1.0 Ok\r\n"
        assert client.command("RCPT TO:<bob@example.test>") == b"250 2.1.5 Ok\r\n"
        assert client.command("DATA").startswith(b"354 ")
        client.stream([body])
        assert client.command(".") == b"250 2.0.0 Ok: queued as UP1\r\n"
        client.close()
        received = bytes(upstream.received[1])
        message = received[received.index(b"DATA\r\n") + 6:]
        assert re.fullmatch(rb"Received: from client\.example \(\[127\.0\.0\.1\]\)\r\n"
                            rb"\tby mx\.example\.test \(saslsmtp\) with ESMTPA\r\n"
                            rb"\t\(authenticated user alice@example\.test\)\r\n"
                            rb"\tfor <bob@example\.test>; [^\r\n]+\r\n" + re.escape(body)
                            + rb"\.\r\n(QUIT\r\n)?", message), message
        assert len(upstream.received) == 2
    finally:
        upstream.stop()


def test_a_slow_end_of_data_is_waited_for_final_timeout(tmp_path, run_daemon):
    """The upstream (a content filter, say) answers the final dot 3 s after it, three
    times the ``timeout`` of its commands: the reply to the dot has its own wait,
    ``final_timeout`` (600 s by default), so the client gets the upstream's 250 and the
    upstream has the message once.  (With ``timeout`` for that wait too, the client got
    451 4.4.2 while the upstream queued the message: the client's retry was a copy.)"""
    upstream = ScriptedUpstream([], delays={".": 3.0})
    try:
        port = free_port()
        delivery = ('[delivery]\ntype = "smtp"\n'
                    f'endpoint = "tcp:127.0.0.1:{upstream.port}"\ntimeout = 1.0\n')
        daemon = run_daemon(daemon_config(tmp_path, port, delivery), port)
        client = SMTPClient(port)
        assert client.login(USER, PASSWORD).startswith(b"235 ")
        assert client.command(f"MAIL FROM:<{USER}>") == b"250 2.1.0 Ok\r\n"
        assert client.command("RCPT TO:<bob@example.test>") == b"250 2.1.5 Ok\r\n"
        assert client.command("DATA").startswith(b"354 ")
        client.stream([b"Subject: slow filter\r\n\r\nbody\r\n"])
        started = time.monotonic()
        assert client.command(".") == b"250 2.0.0 Ok: queued as UP1\r\n"
        assert time.monotonic() - started >= 2.9
        client.close()
        assert bytes(upstream.received[0]).count(b"\r\n.\r\n") == 1
        assert len(upstream.received) == 1
        assert "accepted: from=<alice@example.test> recipients=1" in daemon.log_text()
    finally:
        upstream.stop()


def test_trace_header_goes_below_our_received_header(tmp_path, run_daemon):
    """``trace_header`` without XCLIENT, byte for byte as the upstream gets it: our
    Received header first (RFC 5321 4.4: trace information at the beginning of the
    message content; RFC 5322 3.6: trace fields above the others), then the trace
    header, then the message as the client sent it.  (It used to be written above the
    Received header.)"""
    upstream = ScriptedUpstream([])
    try:
        port = free_port()
        delivery = relay_delivery(upstream.port, trace_header='"X-Authenticated-User"')
        run_daemon(daemon_config(tmp_path, port, delivery), port)
        client = SMTPClient(port)
        assert client.login(USER, PASSWORD).startswith(b"235 ")
        assert client.command(f"MAIL FROM:<{USER}>") == b"250 2.1.0 Ok\r\n"
        assert client.command("RCPT TO:<bob@example.test>") == b"250 2.1.5 Ok\r\n"
        assert client.command("DATA").startswith(b"354 ")
        body = b"Received: from forged.example\r\nSubject: order\r\n\r\n..dot\r\n"
        client.stream([body])
        assert client.command(".") == b"250 2.0.0 Ok: queued as UP1\r\n"
        client.close()
        received = bytes(upstream.received[0])
        message = received[received.index(b"DATA\r\n") + 6:]
        assert re.fullmatch(rb"Received: from client\.example \(\[127\.0\.0\.1\]\)\r\n"
                            rb"\tby mx\.example\.test \(saslsmtp\) with ESMTPA\r\n"
                            rb"\t\(authenticated user alice@example\.test\)\r\n"
                            rb"\tfor <bob@example\.test>; [^\r\n]+\r\n"
                            rb"X-Authenticated-User: login=alice@example\.test;"
                            rb" client=\[127\.0\.0\.1\]:\d+; helo=client\.example\r\n"
                            + re.escape(body) + rb"\.\r\n(QUIT\r\n)?", message), message
    finally:
        upstream.stop()


def test_8bitmime_to_an_upstream_without_it(tmp_path, run_daemon):
    """An upstream that does not announce 8BITMIME (aiosmtpd told so): a client's
    ``BODY=8BITMIME`` is not forwarded; a message that is 7-bit after all arrives byte
    for byte; one with an 8-bit octet is refused at the final dot with ``554 5.6.3``
    naming the reason, and the upstream gets no message (no final dot: it is never
    sent as 8-bit data to a 7-bit server, RFC 6152).  A message without ``BODY=`` is
    passed as before."""
    from tests.mailsink import MailSink
    sink = MailSink(free_port(), eight_bit_mime=False)
    sink.start()
    try:
        port = free_port()
        daemon = run_daemon(daemon_config(tmp_path, port, relay_delivery(sink.port)), port)
        client = SMTPClient(port)
        assert client.login(USER, PASSWORD).startswith(b"235 ")

        def send(body: bytes, *params: str) -> bytes:
            assert client.command(" ".join([f"MAIL FROM:<{USER}>", *params])).startswith(b"250 ")
            assert client.command("RCPT TO:<bob@example.test>").startswith(b"250 ")
            assert client.command("DATA").startswith(b"354 ")
            client.stream([body])
            return client.command(".")

        seven = b"Message-ID: <seven@example.test>\r\nSubject: plain\r\n\r\nascii only\r\n"
        assert send(seven, "BODY=8BITMIME") == b"250 2.0.0 OK: queued\r\n"
        eight = ("Message-ID: <eight@example.test>\r\nContent-Type: text/plain; charset=utf-8"
                 "\r\nContent-Transfer-Encoding: 8bit\r\n\r\nsch\u00f6ne Gr\u00fc\u00dfe\r\n"
                 ).encode()
        assert send(eight, "BODY=8BITMIME") == (
            b"554 5.6.3 Message has 8-bit content and the upstream server does not support"
            b" 8BITMIME\r\n")
        assert client.command("NOOP") == b"250 2.0.0 OK\r\n"
        assert send(seven.replace(b"seven", b"after")) == b"250 2.0.0 OK: queued\r\n"
        client.close()
        assert [(m.mail_options, m.message_id) for m in sink.messages] == [
            ((), "<seven@example.test>"), ((), "<after@example.test>")]
        received, _, rest = sink.messages[0].content.partition(b"\r\nMessage-ID: ")
        assert received.startswith(b"Received: from ") and b"Message-ID: " + rest == seven
        log = daemon.log_text()
        assert "upstream tcp:127.0.0.1:%d: message with 8-bit content (BODY=8BITMIME)" \
               " refused: the upstream does not announce 8BITMIME" % sink.port in log, log
        assert re.search(r"message \S+ not accepted: .* reply=554 ", log), log
    finally:
        sink.stop()
