"""``saslsmtp-authtest``: the server's own wiring decides, against a users file, a real
slapd and an AUTH script; exit codes 0/1/2 from the real command; ``--version``."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import pytest_twisted

from saslsmtp.authtest import run
from tests.slapd import ALICE, PEOPLE, SlapdServer, running_slapd
from tests.support import ROOT, free_port, twistd_command, write_config

USERS = "alice:{PLAIN}wonderland\nbob:{PLAIN}builder\n"
SCRIPT = """\
from saslsmtp.script import Accept, Defer, Reject

def auth(arguments, context):
    if arguments["username"] == "down":
        return Defer("directory unreachable")
    if arguments["password"] == "open-sesame":
        return Accept(username=arguments["username"] + "@scripted")
    return Reject()
"""


def file_backend(tmp_path: Path, name: str = "users", content: str = USERS) -> str:
    path = tmp_path / f"{name}.passwd"
    path.write_text(content)
    return f'[backends.{name}]\ntype = "file"\npath = "{path}"\n'


def ldap_backend(url: str, name: str = "directory") -> str:
    return (f'[backends.{name}]\ntype = "ldap"\nurl = "{url}"\n'
            f'user_dn = "uid={{username}},{PEOPLE}"\ntimeout = 1.0\n')


async def authtest(config: Path, user: str, password: str, mechanism: str = "PLAIN") -> tuple[int, str, str]:
    from twisted.internet import reactor
    out, err = io.StringIO(), io.StringIO()
    status = await run(reactor, str(config), mechanism, user, password, "127.0.0.1", False, out, err)
    return status, out.getvalue(), err.getvalue()


@pytest_twisted.ensureDeferred
async def test_file_backend_accept_and_reject(tmp_path: Path) -> None:
    """The chain decides: the second backend accepts bob; nobody accepts a wrong password."""
    backends = file_backend(tmp_path, "first", "alice:{PLAIN}wonderland\n") + file_backend(
        tmp_path, "second", "bob:{PLAIN}builder\n")
    config = write_config(tmp_path, backends, mechanisms=["PLAIN", "LOGIN"])
    status, out, err = await authtest(config, "bob", "builder", "LOGIN")
    assert status == 0, err
    assert "  first: reject (" in out
    assert "  second: accept (" in out
    assert out.splitlines()[-1].startswith("ACCEPT: bob via LOGIN by second in ")
    status, out, _ = await authtest(config, "alice", "wrong")
    assert status == 1
    assert out.splitlines()[-1].startswith("REJECT: alice via PLAIN (no backend accepted) in ")
    assert "wrong" not in out


@pytest_twisted.ensureDeferred
async def test_a_backends_own_reply_is_shown(tmp_path: Path) -> None:
    """A users file's nologin with a reason: the right password is refused with the
    525 5.7.13 and the reason the client would get (on the backend's line, as the
    script's reply is shown); a wrong password is the plain reject; allow_nets outside
    is the plain reject too (the client gets the wrong password's 535)."""
    backends = file_backend(tmp_path, content="bob:{PLAIN}builder::::::nologin reason=Moved-to-mx2\n"
                                              "eve:{PLAIN}x::::::allow_nets=192.0.2.0/24\n")
    config = write_config(tmp_path, backends)
    status, out, _ = await authtest(config, "bob", "builder")
    assert status == 1
    assert out.splitlines()[0].startswith("  users: reject (")
    assert out.splitlines()[0].endswith("): 525 5.7.13 Moved-to-mx2")
    assert out.splitlines()[-1].startswith("REJECT: bob via PLAIN (no backend accepted) in ")
    status, out, _ = await authtest(config, "bob", "wrong")
    assert status == 1 and out.splitlines()[0].endswith(" ms)")
    status, out, _ = await authtest(config, "eve", "x")
    assert status == 1 and out.splitlines()[0].endswith(" ms)")


@pytest_twisted.ensureDeferred
async def test_temporary_when_a_backend_is_down_and_none_accepts(tmp_path: Path) -> None:
    """An unreachable directory behind a rejecting file: exit 2, the directory decided."""
    backends = file_backend(tmp_path) + ldap_backend(f"ldap://127.0.0.1:{free_port()}")
    config = write_config(tmp_path, backends)
    status, out, _ = await authtest(config, "carol", "whatever")
    assert status == 2
    assert out.splitlines()[-1].startswith("TEMPORARY FAILURE: carol via PLAIN by directory in ")


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdServer]:
    yield from running_slapd()


@pytest_twisted.ensureDeferred
async def test_real_slapd(slapd: SlapdServer, tmp_path: Path) -> None:
    """A real directory: alice's password binds (exit 0), a wrong one does not (exit 1)."""
    config = write_config(tmp_path, ldap_backend(slapd.url))
    status, out, err = await authtest(config, ALICE.uid, ALICE.password)
    assert status == 0, out + err
    assert f"ACCEPT: {ALICE.uid} via PLAIN by directory" in out
    status, out, _ = await authtest(config, ALICE.uid, "not-" + ALICE.password)
    assert status == 1
    assert "  directory: reject (" in out


@pytest_twisted.ensureDeferred
async def test_script_decides(tmp_path: Path) -> None:
    """With a script, the script is the decider: accept (with its user name), defer, reject."""
    script = tmp_path / "auth.py"
    script.write_text(SCRIPT)
    config = write_config(tmp_path, backends=[], script=str(script))
    status, out, _ = await authtest(config, "zoe", "open-sesame")
    assert status == 0
    assert out.splitlines()[-1].startswith(f"ACCEPT: zoe@scripted via PLAIN by script {script} in ")
    status, out, _ = await authtest(config, "down", "x")
    assert status == 2
    assert f"  script {script}: temporary (" in out
    assert out.splitlines()[0].endswith("): 454 4.7.0 directory unreachable")  # the client's reply
    status, out, _ = await authtest(config, "zoe", "nope")
    assert status == 1
    assert out.splitlines()[0].endswith("): 535 5.7.8 Authentication credentials invalid")


@pytest_twisted.ensureDeferred
async def test_unannounced_mechanism_and_bad_config(tmp_path: Path) -> None:
    """LOGIN not configured: the server would 504, so a reject; a broken file: 78."""
    config = write_config(tmp_path, file_backend(tmp_path), mechanisms=["PLAIN"])
    status, _, err = await authtest(config, "alice", "wonderland", "LOGIN")
    assert status == 1 and "would answer 504" in err
    config.write_text(config.read_text() + "\n[bogus]\n")
    status, _, err = await authtest(config, "alice", "wonderland")
    assert status == 78 and "bogus: unknown section" in err


def command(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "saslsmtp.authtest", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


def test_command_exit_codes_and_version(tmp_path: Path) -> None:
    """The real command: password on stdin, 0 / 1 / 2, usage errors 64, --version."""
    script = tmp_path / "auth.py"
    script.write_text(SCRIPT)
    config = write_config(tmp_path, backends=[], script=str(script))
    assert command("--config", str(config), "zoe", stdin="open-sesame\n").returncode == 0
    assert command("--config", str(config), "zoe", stdin="wrong\n").returncode == 1
    result = command("--config", str(config), "down", stdin="x\n")
    assert result.returncode == 2, result.stderr
    assert command("--config", str(config), stdin="x\n").returncode == 64
    assert command("--config", str(config), "--mechanism", "CRAM-MD5", "zoe").returncode == 64
    version = command("--version")
    assert version.returncode == 0
    import twisted

    import saslsmtp
    assert version.stdout.strip().startswith(
        f"saslsmtp {saslsmtp.__version__} (Twisted {twisted.__version__}, Python ")


def test_twistd_saslsmtp_version(tmp_path: Path) -> None:
    """``twistd saslsmtp --version`` prints both versions and exits 0."""
    import twisted

    import saslsmtp
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(twistd_command(tmp_path / "unused.toml", "--version"),
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"saslsmtp {saslsmtp.__version__} (Twisted {twisted.__version__}" in result.stdout


def test_remote_ip_must_be_an_address(tmp_path: Path) -> None:
    """``--remote-ip`` is what ``allow_nets`` is matched against: a typo was checked as the
    client's address (a user limited to 192.0.2.0/24 quietly rejected, or a misleading
    accept).  Now it is a usage error, one line, exit 64, nothing checked; a real address
    (IPv6 too) is taken and decides ``allow_nets``."""
    config = write_config(tmp_path, file_backend(
        tmp_path, content="eve:{PLAIN}x::::::allow_nets=192.0.2.0/24,2001:db8::/32\n"))
    bad = command("--config", str(config), "--remote-ip", "192.0.2.700", "eve", stdin="x\n")
    assert bad.returncode == 64 and bad.stdout == ""
    assert bad.stderr.splitlines()[-1] == (
        "saslsmtp-authtest: error: argument --remote-ip: not an IP address: '192.0.2.700'")
    inside = command("--config", str(config), "--remote-ip", "2001:db8::7", "eve", stdin="x\n")
    assert inside.returncode == 0, inside.stdout + inside.stderr
    outside = command("--config", str(config), "--remote-ip", "198.51.100.7", "eve", stdin="x\n")
    assert outside.returncode == 1
