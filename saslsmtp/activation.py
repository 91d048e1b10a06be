"""Sockets passed by systemd (socket activation, sd_listen_fds(3)).

A ``.socket`` unit binds the ports and keeps them while the service restarts: the
kernel queues the clients that connect meanwhile in the socket's backlog, and the new
process accepts them.  systemd passes the sockets as file descriptors 3, 4, ... and says
so in ``LISTEN_FDS`` (how many), ``LISTEN_PID`` (for which process: a child that
inherited the environment must not take them) and ``LISTEN_FDNAMES`` (the units'
``FileDescriptorName=``, ``:``-separated).  ``server.listen`` names them
``systemd:name=NAME`` or ``systemd:index=N`` (``listeners.parse``).

Twisted's ``systemd:`` endpoint parser removes ``LISTEN_PID`` and ``LISTEN_FDS`` from
``os.environ`` when ``twisted.internet.endpoints`` is imported, which twistd does before
saslsmtp runs; ``launch_environment`` therefore reads the environment the process was
started with (``/proc/self/environ``).  ``take`` reads it once per process and removes
the variables from ``os.environ``, so that no child (a worker, a script's subprocess)
takes the sockets again.
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

#: sd_listen_fds(3): the first passed descriptor (SD_LISTEN_FDS_START).
FIRST_FD = 3
VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
#: What sd_listen_fds_with_names(3) calls a socket whose unit gave no name.
UNNAMED = "unknown"


class ActivationError(Exception):
    """The ``LISTEN_*`` variables are there but malformed (the message says how)."""


@dataclass(frozen=True)
class Passed:
    """The sockets systemd passed to this process: ``fds[i]`` is named ``names[i]``."""

    fds: tuple[int, ...]
    names: tuple[str, ...]

    def describe(self) -> str:
        """``submission (fd 3), submissions (fd 4)``, for messages."""
        return ", ".join(f"{name} (fd {fd})" for fd, name in zip(self.fds, self.names)) or "none"


def parse_listen_fds(environ: Mapping[str, str], pid: int) -> Passed | None:
    """What ``environ`` passes to process ``pid``, as sd_listen_fds_with_names(3) reads
    it: ``None`` when ``LISTEN_PID`` or ``LISTEN_FDS`` is missing or ``LISTEN_PID`` is
    another process's; fds from 3 on; names split on ``:`` (``unknown`` each when
    ``LISTEN_FDNAMES`` is unset)."""
    if "LISTEN_PID" not in environ or "LISTEN_FDS" not in environ:
        return None
    listen_pid = environ["LISTEN_PID"].strip()
    if not listen_pid.isdigit():
        raise ActivationError(f"LISTEN_PID={environ['LISTEN_PID']!r} is not a process id")
    if int(listen_pid) != pid:
        return None
    count = environ["LISTEN_FDS"].strip()
    if not count.isdigit():
        raise ActivationError(f"LISTEN_FDS={environ['LISTEN_FDS']!r} is not a number")
    fds = tuple(range(FIRST_FD, FIRST_FD + int(count)))
    if "LISTEN_FDNAMES" not in environ:
        return Passed(fds, (UNNAMED,) * len(fds))
    names = tuple(environ["LISTEN_FDNAMES"].split(":")) if fds else ()
    if len(names) != len(fds):
        raise ActivationError(f"LISTEN_FDNAMES={environ['LISTEN_FDNAMES']!r} names"
                              f" {len(names)} sockets, LISTEN_FDS={count} passes {len(fds)}")
    return Passed(fds, names)


def launch_environment(path: str = "/proc/self/environ") -> dict[str, str]:
    """The ``LISTEN_*`` variables of the environment the process was started with
    (Linux keeps it in ``/proc/self/environ``), overlaid with ``os.environ``'s."""
    found: dict[str, str] = {}
    try:
        for entry in Path(path).read_bytes().split(b"\0"):
            key, _, value = entry.decode("utf-8", "replace").partition("=")
            if key in VARIABLES:
                found[key] = value
    except OSError:
        pass
    found.update({key: os.environ[key] for key in VARIABLES if key in os.environ})
    return found


_TAKEN: dict[int, Passed | None] = {}  # pid -> what it took (a fork takes nothing again)


def take(read: Callable[[], Mapping[str, str]] = launch_environment,
         getpid: Callable[[], int] = os.getpid) -> Passed | None:
    """The sockets systemd passed to this process (read once; later calls give the same
    answer), with close-on-exec set as sd_listen_fds(3) sets it, and the ``LISTEN_*``
    variables removed from ``os.environ``.  ``ActivationError``: malformed variables."""
    pid = getpid()
    if pid not in _TAKEN:
        environ = read()
        for key in VARIABLES:
            os.environ.pop(key, None)
        passed = parse_listen_fds(environ, pid)
        for fd in passed.fds if passed is not None else ():
            try:
                fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
            except OSError:
                pass  # not open: socket_problem says so
        _TAKEN[pid] = passed
    return _TAKEN[pid]


_HANDED_OVER: set[int] = set()  # pids whose passed sockets serve (their fds may be closed)


def hand_over(getpid: Callable[[], int] = os.getpid) -> None:
    """The passed sockets now serve: Twisted's adopting endpoint closes the fd it adopted,
    so a later check (a reload) must not look at those numbers again."""
    _HANDED_OVER.add(getpid())


def unserved(getpid: Callable[[], int] = os.getpid) -> Passed | None:
    """``take``'s sockets until they were handed over (``None`` after: a reload)."""
    passed = take()
    return None if getpid() in _HANDED_OVER else passed


#: ``domain=`` values (Twisted's spelling: the family without ``AF_``).
DOMAINS = {"INET": socket.AF_INET, "INET6": socket.AF_INET6, "UNIX": socket.AF_UNIX}


def socket_family(fd: int) -> socket.AddressFamily:
    """The address family of the socket ``fd`` (the kernel's word, not the unit's)."""
    probe = socket.socket(fileno=fd)
    try:
        return probe.family
    finally:
        probe.detach()


def socket_problem(fd: int, domain: str | None = None) -> str | None:
    """Why ``fd`` is no socket saslsmtp can accept SMTP connections on, or ``None``: a
    listening stream socket of the family ``domain`` (when given) among INET, INET6,
    UNIX.  ``Accept=yes`` units pass a connected socket instead; ``ListenDatagram=`` a
    datagram one."""
    try:
        probe = socket.socket(fileno=fd)
    except OSError as e:
        return f"fd {fd} is no socket ({e.strerror})"
    try:
        if probe.family not in DOMAINS.values():
            return f"fd {fd} is an {probe.family.name} socket, not an INET, INET6 or UNIX one"
        if probe.type != socket.SOCK_STREAM:
            return (f"fd {fd} is a {probe.type.name} socket, not a stream one"
                    " (ListenStream= in the .socket unit)")
        if not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return f"fd {fd} is not listening (the .socket unit must not say Accept=yes)"
        if domain is not None and DOMAINS.get(domain) != probe.family:
            return (f"fd {fd} is an {probe.family.name} socket, not AF_{domain}"
                    " (leave domain= out: saslsmtp asks the socket)")
        return None
    finally:
        probe.detach()


@dataclass(frozen=True)
class Wanted:
    """One ``systemd:`` listener: the entry, and how it picks its socket among the passed
    ones: by position (``index``), or by name and/or local port (one ``.socket`` unit
    with two ``ListenStream=`` gives both its one ``FileDescriptorName=``)."""

    description: str
    name: str | None = None  # FileDescriptorName=
    index: int | None = None  # the position among the passed sockets
    domain: str | None = None  # domain=, checked against the socket when given
    port: int | None = None  # the socket's local port


def local_port(fd: int) -> int | None:
    """The TCP port ``fd`` is bound to (``None``: a UNIX socket, or no socket)."""
    try:
        probe = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        address = probe.getsockname()
        return address[1] if isinstance(address, tuple) else None
    finally:
        probe.detach()


@dataclass(frozen=True)
class Matched:
    """``systemd:`` listeners matched to passed sockets: ``fds`` (entry -> fd), what is
    wrong (``problems``: entry, message) and the passed sockets nobody serves."""

    fds: Mapping[str, int]
    problems: tuple[tuple[str, str], ...]
    unused: tuple[str, ...]


def _listing(passed: Passed, ports: Mapping[int, int | None]) -> str:
    """``submission (fd 3, port 587), ...``: what systemd passed, for messages."""
    return ", ".join(f"{name} (fd {fd}" + (f", port {ports[fd]})" if ports[fd] is not None else ")")
                     for fd, name in zip(passed.fds, passed.names)) or "none"


def _wanted_words(want: Wanted) -> str:
    """``named 'submission' on port 587``, ``at index 2``."""
    if want.index is not None:
        return f"at index {want.index}"
    words = [f"named {want.name!r}"] if want.name is not None else []
    if want.port is not None:
        words.append(f"on port {want.port}")
    return " ".join(words)


def pick(want: Wanted, passed: Passed, ports: Mapping[int, int | None]) -> int | str:
    """The fd ``want`` names among ``passed``, or why there is none (one line)."""
    if want.index is not None:
        found = [passed.fds[want.index]] if want.index < len(passed.fds) else []
    else:
        found = [fd for fd, name in zip(passed.fds, passed.names)
                 if (want.name is None or name == want.name)
                 and (want.port is None or ports[fd] == want.port)]
    if not found:
        return (f"systemd passed no socket {_wanted_words(want)} (it passed"
                f" {_listing(passed, ports)}; ListenStream= and FileDescriptorName= in the"
                " .socket unit make them)")
    if len(found) > 1:
        return (f"systemd passed {len(found)} sockets {_wanted_words(want)} (fds"
                f" {', '.join(map(str, found))}): add port= to pick one")
    return found[0]


def match(wanted: Sequence[Wanted], passed: Passed) -> Matched:
    """Each wanted listener's socket among ``passed``."""
    ports = {fd: local_port(fd) for fd in passed.fds}
    fds: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    taken: dict[int, str] = {}
    for want in wanted:
        fd = pick(want, passed, ports)
        if isinstance(fd, str):
            problems.append((want.description, fd))
            continue
        if fd in taken:
            problems.append((want.description, f"names the same socket (fd {fd}) as"
                             f" {taken[fd]!r}"))
            continue
        why = socket_problem(fd, want.domain)
        if why is not None:
            problems.append((want.description, why))
            continue
        taken[fd] = want.description
        fds[want.description] = fd
    unused = tuple(f"{name} (fd {fd}" + (f", port {ports[fd]})" if ports[fd] is not None else ")")
                   for fd, name in zip(passed.fds, passed.names) if fd not in taken)
    return Matched(fds, tuple(problems), unused)


def unused_warning(unused: Sequence[str]) -> str:
    """The warning for passed sockets no ``server.listen`` entry names."""
    return (f"systemd passed {', '.join(unused)}, which no server.listen entry names:"
            " connections to it wait unanswered (add systemd:name=... to server.listen or"
            " remove it from the .socket unit)")
