"""A real Dovecot auth server for tests: auth only, in its own temporary folder.

``DovecotServer(root).start()`` writes ``dovecot.conf`` (Dovecot 2.3 syntax: Debian 12's
``dovecot-core``), a passwd-file with a ``{PLAIN}`` user and a hashed one, and runs
``dovecot -F -c dovecot.conf`` with its own ``base_dir``/``state_dir``/log.  The auth
client listener is a UNIX socket (``unix_socket``) and a TCP port on 127.0.0.1 (``port``).
``stop()``/``start()`` take it down and up; ``pause()``/``resume()`` SIGSTOP/SIGCONT the
whole process tree to make it hang.

Two settings keep tests fast and deterministic: ``auth_failure_delay = 0`` (Dovecot still
answers a FAIL on its next 0.5 s failure-flush tick) and the auth penalty switched off
(``anvil-auth-penalty`` listener disabled), which would otherwise delay every later
failure from the same ``rip`` by 2-15 s.  ``DovecotServer(stock_penalty=True)`` keeps
Dovecot's defaults instead (penalty on, ``auth_failure_delay = 2 secs``).
``users`` replaces the two default users with ``{PLAIN}`` ones, ``mechanisms`` the
``auth_mechanisms`` line and ``verbose=False`` turns ``auth_verbose`` off (the benchmark's
Postfix peer uses all three).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

DOVECOT = "/usr/sbin/dovecot"
PLAIN_USER = ("alice", "wonderland")
HASHED_USER = ("bob", "hashed secret")
# doveadm pw -s SHA512-CRYPT -p 'hashed secret'
HASHED_PASSWORD = ("{SHA512-CRYPT}$6$EH.O1h5cCKN0kUgg$TCUstG9DeStRS4tcfIxx71MncvPsyYqCWii9Nt"
                   "KFeDrYKlqG/QiDTeQDYbka8y2YV7k.9mVGvAVw./LdEN7uN/")
MISSING_MESSAGE = ("Dovecot is not installed (need /usr/sbin/dovecot from the Debian package "
                   "dovecot-core: apt-get install dovecot-core)")


def dovecot_version() -> str:
    """``dovecot --version`` (e.g. ``2.3.19.1 (9b53102964)``); raises if not installed."""
    if not os.access(DOVECOT, os.X_OK):
        raise FileNotFoundError(MISSING_MESSAGE)
    return subprocess.run([DOVECOT, "--version"], capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()


def require_dovecot() -> str:
    """The Dovecot version; skip the caller when missing, except in CI where it fails."""
    import pytest

    try:
        version = dovecot_version()
    except (FileNotFoundError, subprocess.SubprocessError) as e:
        from tests.conftest import require
        require(False, str(e))
    if not version.startswith("2.3."):
        pytest.fail(f"tests/dovecot.py writes a Dovecot 2.3 configuration; found {version}",
                    pytrace=False)
    return version


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class DovecotServer:
    """One Dovecot instance under ``root`` (a fresh folder, removed by ``cleanup()``)."""

    def __init__(self, root: Path | None = None, *, stock_penalty: bool = False,
                 users: Sequence[tuple[str, str]] = (),
                 mechanisms: str = "plain login", verbose: bool = True) -> None:
        self.stock_penalty = stock_penalty
        self.verbose = verbose
        self.users = tuple(users)
        self.mechanisms = mechanisms
        self.root = Path(root or tempfile.mkdtemp(prefix="saslsmtp-dovecot-"))
        # the auth process runs as the unprivileged internal user: it must reach the files
        self.root.chmod(0o755)
        self.unix_socket = str(self.root / "auth-client")
        self.port = free_port()
        self.config_path = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.passwd_path = self.root / "passwd"
        self.process: subprocess.Popen[bytes] | None = None
        self.paused: list[int] = []
        self._write_files()

    @property
    def tcp(self) -> str:
        """The TCP listener in the backend's ``socket`` syntax."""
        return f"tcp:127.0.0.1:{self.port}"

    def _write_files(self) -> None:
        if self.users:
            self.passwd_path.write_text("".join(f"{user}:{{PLAIN}}{password}\n"
                                                for user, password in self.users))
        else:
            self.passwd_path.write_text(
                f"{PLAIN_USER[0]}:{{PLAIN}}{PLAIN_USER[1]}\n"
                f"{HASHED_USER[0]}:{HASHED_PASSWORD}\n")
        self.passwd_path.chmod(0o644)
        if os.geteuid() == 0:
            internal, login = "dovecot", "dovenull"
        else:  # an unprivileged Dovecot runs everything as the invoking user
            internal = login = pwd.getpwuid(os.geteuid()).pw_name
        # no auth penalty (2-15 s extra per failure from one rip): disable its anvil listener
        no_penalty = ("service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n"
                      "  }\n}\n")
        self.config_path.write_text(f"""\
# Written by tests/dovecot.py: an auth-only Dovecot 2.3 for saslsmtp's tests.
base_dir = {self.root}/run
state_dir = {self.root}/state
instance_name = saslsmtp-test-{self.port}
log_path = {self.log_path}
protocols =
ssl = no
default_internal_user = {internal}
default_login_user = {login}
auth_mechanisms = {self.mechanisms}
auth_failure_delay = {"2 secs" if self.stock_penalty else "0"}
auth_verbose = {"yes" if self.verbose else "no"}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.passwd_path}
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth {{
  unix_listener {self.unix_socket} {{
    mode = 0666
  }}
  inet_listener {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
{"" if self.stock_penalty else no_penalty}""")

    # ---- lifecycle (blocking: call from fixtures, or briefly from a test) ------------

    def start(self, timeout: float = 15.0) -> None:
        """Run Dovecot in the foreground and wait until both listeners complete a handshake."""
        assert self.process is None, "already running"
        stderr = open(self.root / "stderr.log", "ab")
        self.process = subprocess.Popen([DOVECOT, "-F", "-c", str(self.config_path)],
                                        stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
        stderr.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"dovecot exited with {code}:\n{self.logs()}")
            if self._handshakes():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dovecot not ready within {timeout}s:\n{self.logs()}")
            time.sleep(0.05)

    def _handshakes(self) -> bool:
        """True when both listeners answer the auth client handshake up to DONE."""
        for family, address in ((socket.AF_UNIX, self.unix_socket),
                                (socket.AF_INET, ("127.0.0.1", self.port))):
            try:
                with socket.socket(family) as s:
                    s.settimeout(2)
                    s.connect(address)
                    s.sendall(b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid())
                    data = b""
                    while not data.endswith(b"DONE\n"):
                        chunk = s.recv(4096)
                        if not chunk:
                            return False
                        data += chunk
            except OSError:
                return False
        return True

    def stop(self) -> None:
        """Stop the whole instance, as systemd does: SIGTERM to every process, then wait.

        Signalling only the master is not enough: its auth process keeps serving the
        connections it already has until they close.
        """
        if self.process is None:
            return
        self.resume()
        tree = self._tree()
        for pid in tree:
            _signal(pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        deadline = time.monotonic() + 5
        rest = [pid for pid in tree[1:] if _alive(pid)]
        while rest and time.monotonic() < deadline:
            time.sleep(0.02)
            rest = [pid for pid in rest if _alive(pid)]
        for pid in rest:
            _signal(pid, signal.SIGKILL)

    def restart(self) -> None:
        """``stop()`` then ``start()``: same sockets, same port, same users."""
        self.stop()
        self.start()

    def _tree(self) -> list[int]:
        """The master and all its descendants, parents first."""
        assert self.process is not None
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        tree, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop(0)
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree

    def pause(self) -> None:
        """SIGSTOP every process of the instance: connections hang, nothing answers."""
        self.paused = self._tree()
        for pid in self.paused:
            _signal(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT what ``pause()`` stopped."""
        for pid in self.paused:
            _signal(pid, signal.SIGCONT)
        self.paused = []

    def logs(self) -> str:
        """Dovecot's log and stderr, for failure messages."""
        parts = []
        for path in (self.log_path, self.root / "stderr.log"):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def cleanup(self) -> None:
        """Stop and remove the folder."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def running_dovecot() -> Iterator[DovecotServer]:
    """The body of a ``dovecot`` fixture: a started Dovecot (skipped, or a failure in CI,
    where it is missing), cleaned up once its tests are done."""
    require_dovecot()
    server = DovecotServer()
    server.start()
    yield server
    server.cleanup()
