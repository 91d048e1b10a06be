"""SCRAM's salts for an unknown user and for a ``{PLAIN}`` entry are derived, and must stay
as stable as a stored verifier's: a key per process let an unknown user's salt change from
one worker to the next, and at every restart, while a stored SCRAM entry's never did (a
way to tell who exists).  The key is the users file's (``FileChecker.salt_key``)."""

from __future__ import annotations

import base64
import socket
from pathlib import Path

from saslsmtp.checkers.file import FileChecker
from saslsmtp.passwords import make_hash
from saslsmtp.sasl.outcome import Lookup, Reply, Session
from saslsmtp.sasl.scram import Scram
from saslsmtp.threads import SynchronousRunner
from tests.support import free_port, start_daemon, write_config


def unknown_users_salt(server_secret: bytes, salt_key=None) -> bytes:
    """The salt a fresh exchange sends for an unknown user, in a process whose own key
    is ``server_secret``."""
    m = Scram(Session(), server_secret=server_secret, salt_key=salt_key)
    assert isinstance(m.start(b"n,,n=nobody,r=client-nonce"), Lookup)
    reply = m.resume(None)
    assert isinstance(reply, Reply)
    return dict(a.split("=", 1) for a in reply.payload_bytes().decode().split(","))["s"].encode()


def test_a_shared_salt_key_gives_every_process_the_same_salt() -> None:
    """Two processes (two per-process keys): the same salt with the same ``salt_key``,
    another one without; a ``salt_key`` that has none yet falls back to the process's."""
    assert unknown_users_salt(b"a" * 32) != unknown_users_salt(b"b" * 32)
    shared = lambda: b"k" * 32  # noqa: E731
    assert unknown_users_salt(b"a" * 32, shared) == unknown_users_salt(b"b" * 32, shared)
    assert unknown_users_salt(b"a" * 32, lambda: None) == unknown_users_salt(b"a" * 32)


def test_the_users_files_salt_key_is_the_same_for_every_reader(tmp_path: Path) -> None:
    """Two checkers on one file (two workers, or before and after a restart) have one
    key, once the file is read; a file without passwords gives none; a changed dummy
    password changes it."""
    path = tmp_path / "users"
    path.write_text("alice:{PLAIN}wonderland\nbob:{PLAIN}builder\n")
    one, two = FileChecker(str(path), SynchronousRunner()), FileChecker(str(path), SynchronousRunner())
    assert one.salt_key() is None  # not read yet
    one.users(), two.users()
    assert one.salt_key() is not None and one.salt_key() == two.salt_key()
    path.write_text("alice:{PLAIN}other\nbob:{PLAIN}builder\n")
    assert two.users() and two.salt_key() != one.salt_key()
    path.write_text("p:::::::nopassword allow_nets=127.0.0.1\n")
    assert two.users() and two.salt_key() is None


def _server_first(port: int, user: bytes) -> bytes:
    """The salt of the server-first message for ``user``."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO client.example\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        first = base64.b64encode(b"n,,n=" + user + b",r=client-nonce")
        s.sendall(b"AUTH SCRAM-SHA-256 " + first + b"\r\n")
        line = f.readline()
        assert line.startswith(b"334 "), line
        s.sendall(b"*\r\n")
        return base64.b64decode(line[4:]).split(b",")[1]


def test_salts_survive_a_restart_of_the_real_daemon(tmp_path: Path) -> None:
    """The daemon, started twice on one users file: an unknown user's salt, a ``{PLAIN}``
    entry's and a stored verifier's are each the same after the restart."""
    stored = make_hash("SCRAM-SHA-256", "stored-password")
    (tmp_path / "users").write_text(f"alice:{{PLAIN}}wonderland\ndave:{stored}\n")
    port = free_port()
    config = write_config(tmp_path, f'[backends.users]\ntype = "file"\npath = "{tmp_path / "users"}"\n',
                          mechanisms=["SCRAM-SHA-256"], listen=[f"tcp:{port}:interface=127.0.0.1"])
    seen = []
    for run in range(2):
        daemon = start_daemon(config, port, tmp_path / f"log{run}")
        try:
            seen.append({user: _server_first(port, user) for user in (b"nobody", b"alice", b"dave")})
        finally:
            daemon.stop()
    assert seen[0] == seen[1]
    assert seen[0][b"dave"] == b"s=" + stored.split(",")[1].encode()  # the stored salt
