"""The control socket's protocol (``saslsmtp.control``) and what it does to sessions
(``saslsmtp.sessionctl``), line by line over string transports, with real
``SubmissionESMTP`` sessions from ``SMTPHarness``; and ``saslsmtp-ctl``'s output and exit
status against sockets that stand in for a server.  ``test_control_daemon.py`` runs it
all against a real daemon with two workers."""

from __future__ import annotations

import io
import json
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher

from saslsmtp import ctl
from saslsmtp.control import ControlProtocol
from saslsmtp.replies import REPLIES
from saslsmtp.sessionctl import SessionControl, SessionInfo, Selector
from saslsmtp.testing import SMTPHarness
from tests.support import write_config

KICKED = b"421 4.7.0 Session closed by the administrator, closing connection\r\n"
PASSWORDS = {"alice": "wonderland", "bob": "tanstaaftanstaaf"}


class Cache:
    """An auth cache that records what it was asked to flush."""

    def __init__(self, held: dict[str, int]) -> None:
        self.held = held
        self.flushed: list[str | None] = []

    def flush(self, user: str | None = None) -> int:
        self.flushed.append(user)
        if user is None:
            dropped, self.held = sum(self.held.values()), {}
            return dropped
        return self.held.pop(user.casefold(), 0)


class Factory:
    """What ``SessionControl`` reads of ``serving.MeteredFactory``."""

    def __init__(self, *sessions: SMTPHarness) -> None:
        self.connections = {h.protocol for h in sessions}
        self.listener_of = {h.protocol: "tcp:587" for h in sessions}


def server() -> tuple[SMTPHarness, SMTPHarness, SMTPHarness, SMTPHarness]:
    """alice from 192.0.2.10 and 198.51.100.7, bob from 192.0.2.11, and a session that
    has not logged in (192.0.2.12)."""
    alice = SMTPHarness(users=PASSWORDS)
    assert alice.login("alice", PASSWORDS["alice"]).startswith(b"235")
    alice2 = alice.connect("198.51.100.7")
    assert alice2.login("alice", PASSWORDS["alice"]).startswith(b"235")
    bob = alice.connect("192.0.2.11")
    assert bob.login("bob", PASSWORDS["bob"]).startswith(b"235")
    anonymous = alice.connect("192.0.2.12")
    anonymous.send(b"EHLO client.example\r\n")
    return alice, alice2, bob, anonymous


def control(factory: Factory, cache: Cache | None = None) -> tuple[ControlProtocol, StringTransport]:
    caches = [cache] if cache is not None else []
    protocol = ControlProtocol(lambda: caches, SessionControl(factory, lambda: caches, pid=4242))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def ask(protocol: ControlProtocol, transport: StringTransport, line: bytes) -> bytes:
    transport.clear()
    protocol.dataReceived(line + b"\n")
    return transport.value()


def test_who_lists_every_open_session_without_a_secret() -> None:
    """``who`` answers ``ok`` and one JSON list: address, port, listener, login, mechanism,
    TLS, start and messages of each session (the anonymous one has no user); nothing of a
    password or an AUTH line is in it."""
    alice, alice2, bob, anonymous = server()
    protocol, transport = control(Factory(alice, alice2, bob, anonymous))
    answer = ask(protocol, transport, b"who")
    assert answer.startswith(b"ok [") and answer.endswith(b"]\n") and answer.count(b"\n") == 1
    listed = [SessionInfo.from_json(item) for item in json.loads(answer[3:])]
    assert sorted((i.client, i.user, i.mechanism) for i in listed) == [
        ("192.0.2.10", "alice", "PLAIN"), ("192.0.2.11", "bob", "PLAIN"),
        ("192.0.2.12", None, None), ("198.51.100.7", "alice", "PLAIN")]
    assert {(i.pid, i.port, i.listener, i.tls, i.messages) for i in listed} == {
        (4242, 54321, "tcp:587", None, 0)}
    for password in PASSWORDS.values():
        assert password.encode() not in answer
    assert b"AUTH" not in answer and b"AGFsaWNl" not in answer


def test_kick_user_closes_exactly_that_users_sessions_and_flushes_its_cache() -> None:
    """``kick user ALICE`` (any case): both of alice's sessions get the 421 and are closed,
    her cache entries go first; bob and the anonymous session are untouched and still
    served; a second kick finds nobody."""
    alice, alice2, bob, anonymous = server()
    cache = Cache({"alice": 2, "bob": 1})
    protocol, transport = control(Factory(alice, alice2, bob, anonymous), cache)
    assert ask(protocol, transport, b"kick user ALICE") == b"ok 2 2\n"
    assert cache.flushed == ["ALICE"]
    for kicked in (alice, alice2):
        assert kicked.take() == KICKED
        assert kicked.transport.disconnecting
        assert kicked.send(b"NOOP\r\n") == b""  # nothing more is read
    for untouched in (bob, anonymous):
        assert untouched.take() == b"" and not untouched.transport.disconnecting
        assert untouched.send(b"NOOP\r\n").startswith(b"250")
    assert ask(protocol, transport, b"kick user alice") == b"ok 0 0\n"


def test_kick_client_by_address_and_by_network() -> None:
    """``kick client`` takes an address or a network, logged in or not, and flushes no
    cache; an IPv4-mapped IPv6 client address matches its IPv4 network."""
    alice, alice2, bob, anonymous = server()
    cache = Cache({"alice": 2})
    protocol, transport = control(Factory(alice, alice2, bob, anonymous), cache)
    assert ask(protocol, transport, b"kick client 198.51.100.7") == b"ok 1 0\n"
    assert alice2.take() == KICKED and alice.take() == b""
    assert ask(protocol, transport, b"kick client 192.0.2.0/24") == b"ok 3 0\n"
    assert [h.take() for h in (alice, bob, anonymous)] == [KICKED] * 3
    assert cache.flushed == []
    info = SessionInfo(1, "::ffff:192.0.2.9", 1, "", None, None, None, 0.0, 0)
    assert Selector(client="192.0.2.0/24").matches(info)
    assert not Selector(client="2001:db8::/32").matches(info)


def test_kick_in_data_discards_the_message() -> None:
    """A session between the 354 and the final dot: the 421 comes at once, the part of
    the message received is dropped, and the rest of it (the final dot included) is not
    read: nothing is delivered.  bob's message, sent the same way, is."""
    alice, _, bob, _ = server()
    protocol, transport = control(Factory(alice, bob))
    for sender in (alice, bob):
        sender.send(b"MAIL FROM:<sender@example.test>\r\n")
        sender.send(b"RCPT TO:<rcpt@example.test>\r\n")
        assert sender.send(b"DATA\r\n").startswith(b"354")
        assert sender.send(b"Subject: spam\r\n\r\nfirst half\r\n") == b""
    assert ask(protocol, transport, b"kick user alice") == b"ok 1 0\n"
    assert alice.take() == KICKED
    assert alice.send(b"second half\r\n.\r\nQUIT\r\n") == b""
    alice.close()
    assert bob.send(b"second half\r\n.\r\n").startswith(b"250")
    assert [m.count(b"first half") for m in alice.realm.messages] == [1]  # bob's only


@pytest.mark.parametrize("line, answer", [
    (b"kick", b"error kick user USER or kick client ADDRESS\n"),
    (b"kick user", b"error kick user USER or kick client ADDRESS\n"),
    (b"kick someone alice", b"error kick user USER or kick client ADDRESS\n"),
    (b"kick client example.org", b"error 'example.org' is no address or network (e.g."
                                 b" 203.0.113.7, 203.0.113.0/24, 2001:db8::/32)\n"),
    (b"who alice", b"error unknown command (known: flush [USER], who, kick user USER,"
                   b" kick client ADDRESS)\n"),
    (b"shutdown", b"error unknown command (known: flush [USER], who, kick user USER,"
                  b" kick client ADDRESS)\n"),
])
def test_a_request_that_is_not_understood_is_answered_error(line: bytes, answer: bytes) -> None:
    """One ``error`` line each, and no session is touched."""
    alice, _, _, _ = server()
    protocol, transport = control(Factory(alice))
    assert ask(protocol, transport, line) == answer
    assert alice.take() == b"" and not alice.transport.disconnecting


def test_flush_is_answered_as_before() -> None:
    cache = Cache({"alice": 2, "bob": 1})
    protocol, transport = control(Factory(), cache)
    assert ask(protocol, transport, b"flush alice") == b"ok 2\n"
    assert ask(protocol, transport, b"flush") == b"ok 1\n"
    assert cache.flushed == ["alice", None]


def test_the_kick_reply_is_in_the_table() -> None:
    assert REPLIES["kicked"].to_bytes() == KICKED


# ---- the command, against sockets standing in for a server ---------------------------


def serve_once(path: Path, answer: bytes, received: list[bytes]) -> threading.Thread:
    """A UNIX socket at ``path`` that reads one request and sends ``answer``."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()

    def run() -> None:
        with listener:
            connection, _ = listener.accept()
            with connection:
                received.append(connection.recv(65536))
                connection.sendall(answer)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def ctl_config(tmp_path: Path, control_path: Path) -> Path:
    (tmp_path / "users").write_text("alice:{PLAIN}x\n")
    path = write_config(tmp_path, '[backends.users]\ntype = "file"\npath = "users"\n')
    text = path.read_text().replace("[server]\n", f'[server]\ncontrol_socket = "{control_path}"\n', 1)
    path.write_text(text)
    return path


SESSIONS = [
    {"pid": 11, "client": "192.0.2.10", "port": 40112, "listener": "tcp:587", "user": "alice",
     "mechanism": "PLAIN", "tls": "TLSv1.3", "since": 1796046250.0, "messages": 3},
    {"pid": 12, "client": "2001:db8::7", "port": 5000, "listener": "ssl:465", "user": None,
     "mechanism": None, "tls": None, "since": 1796046200.0, "messages": 0},
]


def run(config: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = ctl.main(["--config", str(config), *args], stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def test_who_prints_a_table_of_every_process_oldest_first(tmp_path: Path) -> None:
    base = tmp_path / "control.sock"
    config = ctl_config(tmp_path, base)
    received: list[bytes] = []
    threads = [serve_once(Path(f"{base}.0"), b"ok " + json.dumps(SESSIONS[:1]).encode() + b"\n",
                          received),
               serve_once(Path(f"{base}.1"), b"ok " + json.dumps(SESSIONS[1:]).encode() + b"\n",
                          received)]
    status, out, err = run(config, "who")
    for thread in threads:
        thread.join()
    assert (status, err) == (0, "")
    assert received == [b"who\n", b"who\n"]
    since = [SessionInfo.from_json(item).since_text for item in SESSIONS]
    assert out.splitlines() == [
        "PID  CLIENT              LISTENER  USER   MECHANISM  TLS      SINCE                 MESSAGES",
        f"12   [2001:db8::7]:5000  ssl:465   -      -          -        {since[1]}  0",
        f"11   192.0.2.10:40112    tcp:587   alice  PLAIN      TLSv1.3  {since[0]}  3"]


def test_who_filters_and_json(tmp_path: Path) -> None:
    """``--user`` (any case) and ``--client`` (a network) filter; ``--json`` is the list
    with ``since`` as an ISO 8601 UTC time."""
    base = tmp_path / "control.sock"
    config = ctl_config(tmp_path, base)
    answer = b"ok " + json.dumps(SESSIONS).encode() + b"\n"
    for args, pids in ((["--user", "ALICE"], [11]), (["--client", "2001:db8::/32"], [12]),
                       (["--client", "192.0.2.10", "--user", "bob"], [])):
        received: list[bytes] = []
        thread = serve_once(base, answer, received)
        status, out, err = run(config, "who", "--json", *args)
        thread.join()
        base.unlink()
        assert (status, err) == (0, "")
        listed = json.loads(out)
        assert [item["pid"] for item in listed] == pids
        for item in listed:
            assert item["since"] == SessionInfo.from_json(
                next(s for s in SESSIONS if s["pid"] == item["pid"])).since_text
    thread = serve_once(base, b"ok []\n", [])
    assert run(config, "who") == (0, "no open sessions\n", "")
    thread.join()


def test_kick_prints_the_sessions_closed_in_every_process(tmp_path: Path) -> None:
    base = tmp_path / "control.sock"
    config = ctl_config(tmp_path, base)
    received: list[bytes] = []
    threads = [serve_once(Path(f"{base}.0"), b"ok 2 1\n", received),
               serve_once(Path(f"{base}.1"), b"ok 1 1\n", received)]
    status, out, err = run(config, "kick", "alice")
    for thread in threads:
        thread.join()
    assert (status, err) == (0, "")
    assert received == [b"kick user alice\n"] * 2
    assert out == "kicked user alice: 3 sessions closed in 2 processes; auth cache: 2 entries dropped\n"
    received.clear()
    thread = serve_once(base, b"ok 1 0\n", received)
    assert run(config, "kick", "--client", "192.0.2.0/24") == (
        0, "kicked client 192.0.2.0/24: 1 session closed in 1 process\n", "")
    thread.join()
    assert received == [b"kick client 192.0.2.0/24\n"]


@pytest.mark.parametrize("args, said", [
    (["kick"], "kick needs USER or --client ADDRESS (one of them)"),
    (["kick", "alice", "--client", "192.0.2.1"], "kick needs USER or --client ADDRESS (one of them)"),
    (["kick", ""], "the user name is empty"),
    (["kick", "alice\nkick user bob"], "a user name cannot contain line breaks or NUL"),
    (["kick", "--client", "mail.example.org"],
     "'mail.example.org' is no address or network (e.g. 203.0.113.7, 203.0.113.0/24,"
     " 2001:db8::/32)"),
    (["who", "--client", "300.1.2.3"],
     "'300.1.2.3' is no address or network (e.g. 203.0.113.7, 203.0.113.0/24, 2001:db8::/32)"),
])
def test_what_cannot_be_sent_is_a_usage_error(tmp_path: Path, args: list[str], said: str) -> None:
    """Exit 64 and one line; nothing reaches the socket (none is there to reach)."""
    config = ctl_config(tmp_path, tmp_path / "control.sock")
    assert run(config, *args) == (64, "", f"saslsmtp-ctl: {said}\n")


def test_no_server_running_is_exit_1_and_one_line(tmp_path: Path) -> None:
    """Nothing at the path, or a dead process's socket nobody listens on: exit 1."""
    base = tmp_path / "control.sock"
    config = ctl_config(tmp_path, base)
    line = f"saslsmtp-ctl: no saslsmtp server is running (nothing answers on {base})\n"
    assert run(config, "who") == (1, "", line)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(f"{base}.0")
    dead.close()  # the file stays, nobody listens: ECONNREFUSED
    assert run(config, "kick", "alice") == (1, "", line)


def test_no_control_socket_configured_is_exit_78(tmp_path: Path) -> None:
    (tmp_path / "users").write_text("alice:{PLAIN}x\n")
    config = write_config(tmp_path, '[backends.users]\ntype = "file"\npath = "users"\n')
    assert run(config, "who") == (78, "", f"saslsmtp-ctl: {config} sets no [server]"
                                  " control_socket, so a running server cannot be reached\n")


def test_a_process_that_does_not_answer_makes_the_result_partial(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker answers, the other holds its socket and says nothing: the sessions found
    are printed, the silent one is named, and the exit status is 75 (the list may miss
    sessions; a kick may have left some open)."""
    from saslsmtp import control
    monkeypatch.setattr(control, "TIMEOUT", 0.2)
    base = tmp_path / "control.sock"
    config = ctl_config(tmp_path, base)
    thread = serve_once(Path(f"{base}.0"), b"ok 1 0\n", [])
    with socket.socket(socket.AF_UNIX) as stuck:
        stuck.bind(f"{base}.1")
        stuck.listen()
        status, out, err = run(config, "kick", "alice")
    thread.join()
    assert (status, out) == (75, "kicked user alice: 1 session closed in 1 process;"
                                 " auth cache: 0 entries dropped\n")
    assert err == f"saslsmtp-ctl: {base}.1: timed out\n"


def test_permission_denied_is_exit_77_and_one_line() -> None:
    """The socket is the server's (mode 0600); another user may not ask it.  The command
    runs in a child that has become ``nobody`` (root, as the tests run, may connect to
    any socket); the configuration and the socket are in a folder it can read."""
    import pwd
    import saslsmtp.config  # noqa: F401  (imported before the child drops root: it cannot
    import saslsmtp.service  # noqa: F401   read the interpreter's folder afterwards)
    nobody = pwd.getpwnam("nobody")
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        base = Path(folder) / "control.sock"
        config = ctl_config(Path(folder), base)
        os.chmod(config, 0o644)
        os.chmod(Path(folder) / "users", 0o644)
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(base))
            os.chmod(base, 0o600)
            server.listen()
            reader, writer = os.pipe()
            child = os.fork()
            if child == 0:  # pragma: no cover (the child's coverage is not collected)
                try:
                    os.setgid(nobody.pw_gid)
                    os.setuid(nobody.pw_uid)
                    out, err = io.StringIO(), io.StringIO()
                    status = ctl.main(["--config", str(config), "who"], stdout=out, stderr=err)
                    os.write(writer, json.dumps([status, out.getvalue(), err.getvalue()]).encode())
                finally:
                    os._exit(0)
            os.close(writer)
            with os.fdopen(reader) as result:
                status, out, err = json.load(result)
            os.waitpid(child, 0)
    assert (status, out, err) == (77, "", "saslsmtp-ctl: permission denied: run as root or as"
                                          " the server's user\n")


class SlowMessage:
    """A message whose storage answers when the test says so (``done``)."""

    def __init__(self, store: list[bytes], done: list[Any]) -> None:
        self.store = store
        self.done = done
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Any:
        from twisted.internet import defer
        d: Any = defer.Deferred()
        d.addCallback(lambda _: self.store.append(b"\r\n".join(self.lines)))
        self.done.append(d)
        return d

    def connectionLost(self) -> None:
        self.lines = []


def test_a_kick_while_the_message_is_being_stored_answers_it_first() -> None:
    """The final dot was read and the message is being stored: the message is complete,
    so its 250 is sent once stored, then the 421 (the client learns its message went
    through and is not tempted to send it again)."""
    from saslsmtp.testing import MemoryRealm

    done: list[Any] = []

    class Realm(MemoryRealm):
        def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, ...]:
            interface, delivery, logout = super().requestAvatar(avatarId, mind, *interfaces)
            delivery.validateTo = lambda user: lambda: SlowMessage(self.messages, done)
            return interface, delivery, logout

    alice = SMTPHarness(users=PASSWORDS, realm=Realm())
    assert alice.login("alice", PASSWORDS["alice"]).startswith(b"235")
    protocol, transport = control(Factory(alice))
    alice.send(b"MAIL FROM:<alice@example.test>\r\n")
    alice.send(b"RCPT TO:<bob@example.test>\r\n")
    assert alice.send(b"DATA\r\n").startswith(b"354")
    assert alice.send(b"Subject: late\r\n\r\nbody\r\n.\r\n") == b""  # being stored
    assert ask(protocol, transport, b"kick user alice") == b"ok 1 0\n"
    assert alice.take() == b"" and not alice.transport.disconnecting
    assert len(done) == 1
    done[0].callback(None)
    answer = alice.take()
    assert answer.startswith(b"250 ") and answer.endswith(b"\r\n" + KICKED)
    assert answer.count(b"\r\n") == 2
    assert alice.transport.disconnecting and len(alice.realm.messages) == 1


def test_the_table_escapes_what_a_client_chose() -> None:
    """A login name is the client's (a backend accepted it): control characters and
    spaces are shown escaped, never sent to the terminal; other scripts are shown."""
    info = SessionInfo(7, "192.0.2.1", 25, "tcp:587", "evil\x1b]0;owned\x07 x", "PLAIN", None,
                       0.0, 0)
    row = ctl.table([info, SessionInfo(8, "192.0.2.2", 26, "tcp:587", "jörg", "PLAIN", None,
                                       0.0, 0)]).splitlines()
    assert row[1].split()[3] == "evil\\x1b]0;owned\\x07\\x20x"
    assert row[2].split()[3] == "jörg"
    assert "\x1b" not in "".join(row)


def test_the_help_is_the_manual_an_operator_needs() -> None:
    """``saslsmtp-ctl --help`` said only "--config CONFIG {who,kick,flush}": not what it
    needs ([server] control_socket, which user), not the exit statuses scripts test, not
    that a kick is no ban.  It says them now, with the statuses the command returns."""
    from saslsmtp import control
    out, err = io.StringIO(), io.StringIO()
    assert ctl.main(["--help"], stdout=out, stderr=err) == 0
    text = " ".join(out.getvalue().split())
    assert "[server] control_socket" in text and "run as root or as the server's user" in text
    for status, meaning in ((control.EX_OK, "done"), (control.EX_NOSERVER, "no server is running"),
                            (control.EX_USAGE, "usage"),
                            (control.EX_TEMPFAIL, "a process holds its socket but did not answer"),
                            (control.EX_NOPERM, "permission denied"),
                            (control.EX_CONFIG, "no control socket")):
        assert f"{status} {meaning}" in text, (status, meaning)
    assert "change the password first, then kick" in text
    assert "kick --client ADDRESS[/PREFIX]" in text and "flush [USER]" in text
    out = io.StringIO()
    assert ctl.main(["--config", "x", "kick", "--help"], stdout=out, stderr=err) == 0
    kick_help = " ".join(out.getvalue().split())
    assert "[USER]" in kick_help and "A kick is no ban" in kick_help


def test_the_stolen_account_steps_flush_dovecots_own_cache_too() -> None:
    """The help and the docs said a kick makes a changed password stop working at once; a
    ``type = "dovecot"`` backend's Dovecot may cache the login itself (``auth_cache_size``)
    and keep accepting the old password, out of the kick's reach.  The steps say so and
    give ``doveadm auth cache flush USER`` between the password change and the kick."""
    from pathlib import Path
    out = io.StringIO()
    assert ctl.main(["--help"], stdout=out, stderr=io.StringIO()) == 0
    steps = out.getvalue().split("examples (a stolen account):", 1)[1].splitlines()
    commands = [line.split()[0] for line in steps if line.startswith("  ") and line.split()[0] != "#"]
    assert commands[:4] == ["saslsmtp-ctl", "saslsmtp-passwd", "doveadm", "saslsmtp-ctl"]
    assert "doveadm auth cache flush alice" in out.getvalue()
    assert "auth_cache_size" in " ".join(out.getvalue().split())
    out = io.StringIO()
    assert ctl.main(["--config", "x", "kick", "--help"], stdout=out, stderr=io.StringIO()) == 0
    assert "doveadm auth cache flush USER" in " ".join(out.getvalue().split())
    docs = Path(__file__).resolve().parent.parent / "docs"
    operations = " ".join((docs / "operations.md").read_text().split())
    assert "LDAP, an HTTP API or Dovecot stops working at once" not in operations
    steps_md = operations.split("The steps for a stolen account:", 1)[1].split("```")[1]
    assert steps_md.index("doveadm auth cache flush alice") < steps_md.index("kick alice")
    assert "doveadm auth cache flush USER" in " ".join((docs / "backend-dovecot.md").read_text().split())


@pytest.mark.parametrize("command", ["ctl", "cache"])
def test_config_may_follow_the_command(tmp_path: Path, command: str) -> None:
    """``saslsmtp-ctl kick alice --config F`` (as one types after ``doveadm kick``) said
    "the following arguments are required: --config" although it was given.  Either
    place works; none is still a usage error."""
    from saslsmtp import cachectl
    config = ctl_config(tmp_path, tmp_path / "control.sock")  # nothing listens there
    main = ctl.main if command == "ctl" else cachectl.main
    argv = [["who"], ["kick", "alice"], ["flush", "alice"]] if command == "ctl" else [["flush"]]
    for args in argv:
        for order in (["--config", str(config), *args], [*args, "--config", str(config)]):
            err = io.StringIO()
            assert main(order, stdout=io.StringIO(), stderr=err) == 1, (order, err.getvalue())
            assert "no saslsmtp server is running" in err.getvalue()
        err = io.StringIO()
        assert main(args, stdout=io.StringIO(), stderr=err) == 64
        assert err.getvalue().endswith("error: the following arguments are required: --config\n")


def test_the_kick_line_quotes_a_login_that_could_pass_for_more_fields() -> None:
    """The ``session closed by the administrator`` line writes an odd login name as a
    JSON string, as the session-end line does, so it cannot pose as another client."""
    odd = "john doe client=203.0.113.9"
    session = SMTPHarness(users={odd: "odd-password-1"})
    assert session.login(odd, "odd-password-1").startswith(b"235")
    protocol, transport = control(Factory(session))
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert ask(protocol, transport, b"kick client 192.0.2.10") == b"ok 1 0\n"
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [formatEvent(e) for e in events if "by the administrator" in formatEvent(e)]
    assert lines == ['session closed by the administrator: client=192.0.2.10'
                     ' user="john doe client=203.0.113.9"']
