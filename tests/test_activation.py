"""``LISTEN_FDS`` as sd_listen_fds(3) reads it, and passed sockets matched to the
``systemd:`` listeners that name them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Iterator

import pytest

from saslsmtp.activation import (ActivationError, Passed, Wanted, launch_environment, match,
                                 parse_listen_fds, socket_problem)
from tests.activate import activated_command
from tests.support import ROOT


def test_fds_start_at_3_and_names_split_on_colons() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "submission:submissions"}
    assert parse_listen_fds(env, 42) == Passed((3, 4), ("submission", "submissions"))


def test_another_process_pid_or_no_variables_pass_nothing() -> None:
    """A child that inherited the environment (LISTEN_PID is its parent's) takes nothing."""
    assert parse_listen_fds({"LISTEN_PID": "41", "LISTEN_FDS": "1"}, 42) is None
    assert parse_listen_fds({"LISTEN_FDS": "1"}, 42) is None
    assert parse_listen_fds({"LISTEN_PID": "42"}, 42) is None
    assert parse_listen_fds({}, 42) is None


def test_without_names_each_is_unknown() -> None:
    """sd_listen_fds_with_names(3): no LISTEN_FDNAMES names every socket "unknown"."""
    assert parse_listen_fds({"LISTEN_PID": "7", "LISTEN_FDS": "2"}, 7) == Passed(
        (3, 4), ("unknown", "unknown"))
    assert parse_listen_fds({"LISTEN_PID": "7", "LISTEN_FDS": "0"}, 7) == Passed((), ())


@pytest.mark.parametrize("env, message", [
    ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, "LISTEN_PID='x' is not a process id"),
    ({"LISTEN_PID": "7", "LISTEN_FDS": "two"}, "LISTEN_FDS='two' is not a number"),
    ({"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "submission"},
     "LISTEN_FDNAMES='submission' names 1 sockets, LISTEN_FDS=2 passes 2"),
])
def test_malformed_variables_are_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ActivationError, match=message):
        parse_listen_fds(env, 7)


def test_launch_environment_reads_the_start_environment(tmp_path) -> None:
    """Twisted's endpoints module deletes LISTEN_PID/LISTEN_FDS from os.environ when
    imported; the environment the process started with still has them."""
    environ = tmp_path / "environ"
    environ.write_bytes(b"HOME=/root\0LISTEN_PID=9\0LISTEN_FDS=1\0LISTEN_FDNAMES=a=b\0")
    assert launch_environment(str(environ)) == {"LISTEN_PID": "9", "LISTEN_FDS": "1",
                                                "LISTEN_FDNAMES": "a=b"}
    assert launch_environment(str(tmp_path / "missing")) == {}


def test_take_survives_twisted_unsets_the_variables_and_sets_close_on_exec() -> None:
    """In a process started as systemd starts one (fd 3, LISTEN_PID its own): Twisted's
    endpoints module already took LISTEN_FDS from os.environ; ``take`` still finds the
    socket, removes every LISTEN_* variable (no child takes it again), marks the fd
    close-on-exec, and answers the same the second time."""
    probe = ("import os, fcntl, twisted.internet.endpoints\n"
             "from saslsmtp import activation\n"
             "first = activation.take()\n"
             "print(first, activation.take() == first,"
             " sorted(k for k in os.environ if k.startswith('LISTEN_')),"
             " bool(fcntl.fcntl(3, fcntl.F_GETFD) & fcntl.FD_CLOEXEC))\n")
    with listening() as sock:
        command, fds = activated_command([sys.executable, "-c", probe], [sock], ["submission"])
        out = subprocess.run(command, pass_fds=fds, capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip() == "Passed(fds=(3,), names=('submission',)) True [] True", out.stderr


@pytest.fixture
def sockets() -> Iterator[dict[str, socket.socket]]:
    """A listening TCP socket, a datagram one and a stream one that does not listen."""
    made = {"tcp": socket.socket(), "udp": socket.socket(type=socket.SOCK_DGRAM),
            "idle": socket.socket(), "six": socket.socket(socket.AF_INET6)}
    made["tcp"].bind(("127.0.0.1", 0))
    made["tcp"].listen()
    made["six"].bind(("::1", 0))
    made["six"].listen()
    yield made
    for sock in made.values():
        sock.close()


class listening:
    """A listening loopback socket, closed at the end."""

    def __enter__(self) -> socket.socket:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        return self.sock

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_match_by_name_port_and_index(sockets: dict[str, socket.socket]) -> None:
    """One .socket unit with two ListenStream= names both sockets alike: port= picks."""
    tcp, six = sockets["tcp"].fileno(), sockets["six"].fileno()
    six_port = sockets["six"].getsockname()[1]
    passed = Passed((tcp, six), ("saslsmtp", "saslsmtp"))
    matched = match([Wanted("systemd:name=saslsmtp:port=N", "saslsmtp", port=six_port),
                     Wanted("systemd:index=0", None, 0, "INET")], passed)
    assert matched.fds == {"systemd:name=saslsmtp:port=N": six, "systemd:index=0": tcp}
    assert matched.problems == () and matched.unused == ()
    assert match([Wanted("by-port", port=six_port)], passed).fds == {"by-port": six}


def test_match_says_what_is_wrong(sockets: dict[str, socket.socket]) -> None:
    """Each problem names what systemd did pass; a socket nobody names is listed."""
    tcp, udp, idle, six = (sockets[k].fileno() for k in ("tcp", "udp", "idle", "six"))
    ports = {k: sockets[k].getsockname()[1] for k in sockets}
    passed = Passed((tcp, udp, idle, six), ("submission", "dgram", "idle", "submission6"))
    matched = match([
        Wanted("systemd:name=smtp", "smtp"),
        Wanted("systemd:index=9", None, 9),
        Wanted("systemd:name=submission:port=1", "submission", port=1),
        Wanted("systemd:name=dgram", "dgram"),
        Wanted("systemd:name=idle", "idle"),
        Wanted("systemd:name=submission6:domain=INET", "submission6", None, "INET"),
        Wanted("systemd:name=submission", "submission"),
        Wanted("systemd:index=0", None, 0),
    ], passed)
    listed = (f"submission (fd {tcp}, port {ports['tcp']}), dgram (fd {udp}, port"
              f" {ports['udp']}), idle (fd {idle}, port {ports['idle']}), submission6 (fd {six},"
              f" port {ports['six']})")
    units = "ListenStream= and FileDescriptorName= in the .socket unit make them"
    assert dict(matched.problems) == {
        "systemd:name=smtp": f"systemd passed no socket named 'smtp' (it passed {listed}; {units})",
        "systemd:index=9": f"systemd passed no socket at index 9 (it passed {listed}; {units})",
        "systemd:name=submission:port=1": f"systemd passed no socket named 'submission' on port 1"
                                          f" (it passed {listed}; {units})",
        "systemd:name=dgram": f"fd {udp} is a SOCK_DGRAM socket, not a stream one"
                              " (ListenStream= in the .socket unit)",
        "systemd:name=idle": f"fd {idle} is not listening (the .socket unit must not say"
                             " Accept=yes)",
        "systemd:name=submission6:domain=INET": f"fd {six} is an AF_INET6 socket, not AF_INET"
                                                " (leave domain= out: saslsmtp asks the socket)",
        "systemd:index=0": f"names the same socket (fd {tcp}) as 'systemd:name=submission'",
    }
    assert matched.fds == {"systemd:name=submission": tcp}
    assert matched.unused == (f"dgram (fd {udp}, port {ports['udp']})",
                              f"idle (fd {idle}, port {ports['idle']})",
                              f"submission6 (fd {six}, port {ports['six']})")


def test_two_sockets_of_one_name_need_a_port(sockets: dict[str, socket.socket]) -> None:
    tcp, six = sockets["tcp"].fileno(), sockets["six"].fileno()
    matched = match([Wanted("systemd:name=saslsmtp", "saslsmtp")],
                    Passed((tcp, six), ("saslsmtp", "saslsmtp")))
    assert matched.problems == (("systemd:name=saslsmtp", f"systemd passed 2 sockets named"
                                 f" 'saslsmtp' (fds {tcp}, {six}): add port= to pick one"),)


def test_a_closed_fd_is_no_socket() -> None:
    read, write = os.pipe()
    os.close(write)
    try:
        assert socket_problem(read).startswith(f"fd {read} is no socket (")
    finally:
        os.close(read)
