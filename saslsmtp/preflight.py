"""Startup checks that ``--check`` and a real start share, run before anything is built.

The configuration parser checks values; this module checks the world the values name,
as the user the server will run as (``server.user`` or twistd's ``--uid``): that every
endpoint string parses, that the certificate and key are PEM and belong together, that
the users files are readable, that the Maildir can be written, that the auth cache's
control socket can be made, that somebody can log in at all (``require_tls`` without
any TLS), and where twistd's pid file goes.  ``checked_config`` is the whole check a
start, ``--check`` and a SIGHUP reload share.

``preflight(config, reactor, identity)`` returns the warnings and raises ``ConfigError``
with every problem as ``file:line: key: message``; so ``--check`` and a real start refuse
the same configurations, before "ready" and without a traceback.
"""

from __future__ import annotations

import datetime
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from saslsmtp.config import (Config, ConfigError, ConfigProblem, DeliveryConfig, key_lines,
                             line_of)

READ, WRITE, SEARCH = 4, 2, 1
#: The longest path a UNIX socket can be bound to (Linux: 108 bytes with the final NUL).
UNIX_PATH_MAX = 107


@dataclass(frozen=True)
class RunAs:
    """Whose permissions the checks use: the user the server serves as."""

    uid: int
    groups: frozenset[int]
    name: str

    @classmethod
    def current(cls) -> "RunAs":
        import pwd
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(uid, frozenset([os.getegid(), *os.getgroups()]), name)

    @classmethod
    def of(cls, uid: int, gid: int) -> "RunAs":
        """The user ``uid`` with primary group ``gid`` and its supplementary groups."""
        import pwd
        try:
            name = pwd.getpwuid(uid).pw_name
            groups = os.getgrouplist(name, gid)
        except KeyError:
            name, groups = str(uid), [gid]
        return cls(uid, frozenset([gid, *groups]), name)


def run_as(config: Config, uid: int | None = None, gid: int | None = None) -> RunAs:
    """``server.user``/``group`` if set, else twistd's ``--uid``/``--gid``, else whoever runs."""
    from saslsmtp import privileges
    identity = privileges.resolve(config.ops.user, config.ops.group)
    if identity is not None:
        return RunAs.of(identity.uid, identity.gid)
    if uid is not None or gid is not None:
        import pwd
        uid = os.geteuid() if uid is None else uid
        if gid is None:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = os.getegid()
        return RunAs.of(uid, gid)
    return RunAs.current()


def allowed(path: Path, who: RunAs, want: int) -> bool:
    """Whether ``who`` may ``want`` (READ/WRITE/SEARCH bits) on ``path``, from its mode
    bits (ACLs are not read); root may read and write anything."""
    st = path.stat()
    if who.uid == 0:
        return not (want & SEARCH) or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
    if st.st_uid == who.uid:
        bits = st.st_mode >> 6
    elif st.st_gid in who.groups:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & want == want


def unreachable(path: Path, who: RunAs) -> Path | None:
    """The first folder above ``path`` that ``who`` cannot enter, if any."""
    for parent in reversed(path.parents):
        if parent.exists() and not allowed(parent, who, SEARCH):
            return parent
    return None


def readable_problem(path: str, who: RunAs) -> str | None:
    """Why ``who`` cannot read the file ``path``, or ``None``."""
    p = Path(path)
    if not p.is_file():
        return f"no such file: {path}"
    blocked = unreachable(p, who)
    if blocked is not None:
        return f"{path} is not readable by {who.name}: cannot enter {blocked}"
    if not allowed(p, who, READ):
        return f"{path} is not readable by {who.name} (mode {stat.S_IMODE(p.stat().st_mode):04o})"
    return None


def writable_dir_problem(path: str, who: RunAs, subdirs: Iterable[str] = ()) -> str | None:
    """Why ``who`` cannot create or write the folder ``path`` (and its ``subdirs``)."""
    p = Path(path)
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{path} cannot be created: {existing} is not a folder"
    blocked = unreachable(existing / "x", who)
    if blocked is not None:
        return f"{path} is not writable by {who.name}: cannot enter {blocked}"
    if existing != p:  # created at start: the nearest existing folder must allow it
        if not allowed(existing, who, WRITE | SEARCH):
            return f"{path} cannot be created by {who.name}: {existing} is not writable by it"
        return None
    for sub in subdirs:
        target = p / sub
        if not target.exists():
            if not allowed(p, who, WRITE | SEARCH):
                return f"{path} is not writable by {who.name} (needed to create {sub}/)"
        elif not target.is_dir():
            return f"{target} is not a folder"
        elif not allowed(target, who, WRITE | SEARCH):
            return f"{target} is not writable by {who.name}"
    return None


class _Report:
    """Problems and warnings, placed at the key's line of the configuration file."""

    def __init__(self, config: Config) -> None:
        self.config = config
        try:
            self.lines = key_lines(Path(config.path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            self.lines = {}
        self.problems: list[ConfigProblem] = []
        self.warnings: list[str] = []

    def _line(self, key: str) -> int | None:
        return line_of(self.lines, key)

    def problem(self, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(self.config.path, key, self._line(key), message))

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(str(ConfigProblem(self.config.path, key, self._line(key),
                                               f"warning: {message}")))


def check_endpoints(config: Config, reactor: Any, report: _Report, workers: int = 1) -> None:
    """Every ``server.listen`` (and ``metrics.listen``) entry is an endpoint Twisted can
    build, on a port that exists and an interface that resolves to an address of this
    machine (nothing is bound here); with ``workers`` > 1, every
    ``server.listen`` entry is one the master can bind and share."""
    from twisted.internet import endpoints

    from saslsmtp.listeners import ListenError, interface_problem, parse
    from saslsmtp.options import endpoint_port_problem
    entries = [("server.listen", d) for d in config.server.listen]
    if config.ops.metrics is not None:
        entries.append(("metrics.listen", config.ops.metrics.listen))
    activated = []
    for key, description in entries:
        prefix = "haproxy:" if description.startswith("haproxy:") else ""
        inner = description[len(prefix):]
        if key == "server.listen" and inner.startswith("systemd:"):
            try:
                activated.append(parse(description))
            except ListenError as e:
                report.problem(key, str(e))
            continue
        built = description
        if key == "server.listen" and inner.startswith("ssl:") and "privateKey=" not in inner \
                and config.tls is not None:  # implicit TLS with [tls], as service.listener does
            built = prefix + "tcp:" + inner[len("ssl:"):]
        try:
            endpoints.serverFromString(reactor, built)
        except Exception as e:
            if key == "metrics.listen" and inner.startswith("systemd:"):
                report.problem(key, f"{description!r}: socket activation is for server.listen"
                                    " entries only; [metrics] listen binds its own port (like"
                                    ' "tcp:9125:interface=127.0.0.1")')
            elif isinstance(e, IndexError) and inner.startswith("systemd:"):
                report.problem(key, f"{description!r}: systemd passed no socket at that index"
                                    " (socket activation: a .socket unit passes them; a start"
                                    " or --check outside it has none)")
            else:
                report.problem(key, f"{description!r} is not a usable endpoint: {e}")
            continue
        why = endpoint_port_problem(description, client=False) or interface_problem(
            description, master=key == "server.listen" and workers > 1)
        if why is not None:
            report.problem(key, f"{description!r} is not a usable endpoint: {why}")
        elif key == "server.listen" and workers > 1:
            try:
                parse(description)
            except ListenError as e:
                report.problem(key, str(e))
    check_activated(activated, report)


def check_activated(specs: list[Any], report: _Report) -> None:
    """The ``systemd:`` listeners against the sockets systemd passed, when it passed
    some: a start does the same.  Without (``--check`` run by hand or by ExecStartPre,
    to which systemd passes none; a reload, whose sockets already serve) only their
    syntax is checked; a start without them stops (``listeners.not_passed``)."""
    from saslsmtp import activation
    try:
        passed = activation.unserved()
    except activation.ActivationError as e:
        report.problem("server.listen", f"socket activation: {e}")
        return
    if passed is None:
        return
    matched = activation.match([spec.wanted() for spec in specs], passed)
    for description, message in matched.problems:
        report.problem("server.listen", f"{description!r}: {message}")
    if matched.unused:
        report.warn("server.listen", activation.unused_warning(matched.unused))


def check_worker_timeout(config: Config, workers: int, report: _Report) -> None:
    """``worker_timeout`` set for one process, where no master watches: a warning."""
    from saslsmtp.opsconfig import WORKER_TIMEOUT
    if workers == 1 and config.ops.worker_timeout != WORKER_TIMEOUT:
        report.warn("server.worker_timeout", "has no effect with one process (workers = 1): no"
                    " master watches it; under systemd, WatchdogSec= restarts a stuck process")


def check_proxy_trust(config: Config, report: _Report) -> None:
    """A ``haproxy:`` listener without ``proxy_trusted_networks`` believes whoever
    connects; the setting without such a listener does nothing.  Warnings: a listener
    that worked before the setting existed keeps working."""
    proxied = [entry for entry in config.server.listen if entry.startswith("haproxy:")]
    trusted = config.server.proxy_trusted_networks
    if proxied and trusted is None:
        report.warn("server.listen", f"{proxied[0]!r} believes the PROXY header of every peer"
                    " that can connect, so anyone who reaches it directly can claim any client"
                    " address (allow_nets, [limits] trusted_networks and the per-address limits"
                    " judge that address): set [server] proxy_trusted_networks to the proxies'"
                    " addresses")
    elif trusted is not None and not proxied:
        report.warn("server.proxy_trusted_networks", "has no effect: no server.listen entry"
                    " starts with haproxy:")


def _as(error: OSError) -> str:
    """For a file this process may not read: as whom it read, and the usual fix."""
    if not isinstance(error, PermissionError):
        return ""
    return (f" (read as {RunAs.current().name}; a reload reads as the server's user: give the"
            " file the server's group and chmod 0640)")


def check_tls(config: Config, who: RunAs, report: _Report,
              now: datetime.datetime | None = None) -> None:
    """The certificate and key are PEM, the key is a key, and they belong together;
    warnings for a certificate expired, not yet valid, ending within 14 days, or not
    naming ``server.hostname`` (``tlscert``: clients would fail, the server would not)."""
    tls = config.tls
    if tls is None:
        return
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from saslsmtp import tlscert
    certs: list[Any] = []
    key: Any = None
    try:
        data = Path(tls.certificate).read_bytes()
        certs = x509.load_pem_x509_certificates(data)
    except OSError as e:
        report.problem("tls.certificate", f"cannot read {tls.certificate}: {e.strerror}{_as(e)}")
    except ValueError:
        report.problem("tls.certificate", tlscert.certificate_file_problem(tls.certificate, data))
    try:
        data = Path(tls.private_key).read_bytes()
        key = load_pem_private_key(data, password=None)
    except OSError as e:
        report.problem("tls.private_key", f"cannot read {tls.private_key}: {e.strerror}{_as(e)}")
    except TypeError:
        report.problem("tls.private_key", tlscert.encrypted_key_problem(tls.private_key))
    except Exception:  # ValueError, or a key type cryptography does not support
        report.problem("tls.private_key", tlscert.key_file_problem(tls.private_key, data))
    if certs and key is not None:
        mismatch = tlscert.mismatch_problem(certs, key, tls.certificate, tls.private_key)
        if mismatch is not None:
            report.problem("tls.private_key", mismatch)
        else:
            order = tlscert.chain_order_warning(certs, tls.certificate)
            if order is not None:
                report.warn("tls.certificate", order)
    if certs:
        for warning in tlscert.certificate_warnings(certs[0], tls.certificate, config.server.hostname,
                                                    now or datetime.datetime.now(datetime.timezone.utc)):
            report.warn("tls.certificate", warning)
    if tls.client_ca is not None:
        try:
            x509.load_pem_x509_certificates(Path(tls.client_ca).read_bytes())
        except OSError as e:
            report.problem("tls.client_ca", f"cannot read {tls.client_ca}: {e.strerror}")
        except ValueError:
            report.problem("tls.client_ca", f"{tls.client_ca} holds no PEM certificate")
    if who.uid != os.geteuid():  # read now, as root; a SIGHUP reload reads them as `who`
        for key_name in ("certificate", "private_key"):
            why = readable_problem(getattr(tls, key_name), who)
            if why is not None:
                report.warn(f"tls.{key_name}", f"{why}: it is read at start, but a SIGHUP"
                            " reload will be refused")


def check_paths(config: Config, who: RunAs, report: _Report) -> None:
    """Users files readable and the Maildir writable by the user the server runs as."""
    for name, backend in config.backends.items():
        if backend.type == "file" and name in config.auth.backends:
            why = readable_problem(backend.options.path, who)
            if why is not None:
                report.problem(f"backends.{name}.path", why)
    if isinstance(config.delivery, DeliveryConfig):
        why = writable_dir_problem(config.delivery.path, who, ("tmp", "new", "cur"))
        if why is not None:
            report.problem("delivery.path", why)


def check_control_socket(config: Config, who: RunAs, workers: int, report: _Report) -> None:
    """``[server] control_socket`` can be bound by ``who``: its folder exists and is
    writable (the lock file is made beside it), the path (``<path>.<slot>`` with
    workers) fits in a socket address, and nothing but a socket is there already.  The
    older ``[auth.cache] control_socket`` still works, with a warning; both set is a
    problem (which one would the command ask?)."""
    from saslsmtp.control import control_setting
    old = config.section("auth.cache").control_socket
    setting = control_setting(config)
    if setting is None:
        return
    path, key = setting
    if old and key != "auth.cache.control_socket":
        report.problem("auth.cache.control_socket", "is replaced by [server] control_socket,"
                       " which is set too: remove this one")
        return
    if old:
        report.warn(key, "is deprecated: move it to [server] control_socket (the same socket,"
                    " which also serves saslsmtp-ctl who and kick)")
    longest = path if workers <= 1 else f"{path}.{workers - 1}"
    size = len(os.fsencode(longest))
    if size > UNIX_PATH_MAX:
        report.problem(key, f"{longest} is {size} bytes long; a UNIX socket path can have at"
                       f" most {UNIX_PATH_MAX}: choose a shorter one (e.g. /run/saslsmtp/control.sock)")
        return
    folder = Path(path).parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        report.problem(key, f"cannot create {path}: the folder {folder} {what} (create it"
                       " for the server's user, e.g. with systemd's RuntimeDirectory=saslsmtp)")
        return
    if unreachable(folder / "x", who) is not None or not allowed(folder, who, WRITE | SEARCH):
        report.problem(key, f"cannot create {path}: the folder {folder} is not writable by {who.name}")
        return
    for candidate in {path, longest}:
        there = Path(candidate)
        if there.exists() and not stat.S_ISSOCK(there.stat().st_mode):
            report.problem(key, f"{candidate} exists and is not a socket")


def served_mechanisms(config: Config) -> dict[str, Any]:
    """The ``MechanismSpec`` of each configured mechanism as it will be served: the
    built-ins, and what the AUTH script serves with the TLS needs it declares (a
    custom mechanism is plaintext unless declared otherwise).  A script that does not
    load leaves its names out: the wiring reports why."""
    from saslsmtp.mechanisms import builtin_mechanisms
    builtins = builtin_mechanisms(config.auth.mechanisms)
    script, scripted = _script_served(config, builtins)
    specs = {m: builtins[m] for m in config.auth.mechanisms if m in builtins and m not in scripted}
    for name in scripted:
        specs[name] = script.spec(name, None, builtins.get(name))
    return specs


def builtin_served(config: Config) -> list[str]:
    """The configured mechanisms the built-in code serves (not taken over by the script)."""
    from saslsmtp.mechanisms import builtin_mechanisms
    builtins = builtin_mechanisms(config.auth.mechanisms)
    _, scripted = _script_served(config, builtins)
    return [m for m in config.auth.mechanisms if m in builtins and m not in scripted]


def _script_served(config: Config, builtins: Mapping[str, Any]) -> tuple[Any, list[str]]:
    """The loaded AUTH script and the configured names it serves: every custom one (or
    those its ``MECHANISMS`` lists), and a built-in only when ``MECHANISMS`` names it."""
    if config.auth.script is None:
        return None, []
    script = _loaded_script(config.auth.script, config.path)
    if script is None:
        return None, []
    declared = script.mechanisms
    return script, [m for m in config.auth.mechanisms
                    if (m in declared if declared is not None else m not in builtins)]


_LAST_SCRIPT: dict[tuple[str, int, int], Any] = {}


def _loaded_script(path: str, config_path: str) -> Any:
    """The AUTH script, imported once for all the checks of one file as it is now (the
    require-TLS rule and the users files both ask; importing runs the user's code),
    ``None`` if it does not load (the wiring says why)."""
    from saslsmtp.script import load_script
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.path.abspath(path), st.st_mtime_ns, st.st_size)
    if key not in _LAST_SCRIPT:
        try:
            script = load_script(path, config_path)
        except ConfigError:
            return None
        _LAST_SCRIPT.clear()  # one entry: the file a start, --check or reload reads
        _LAST_SCRIPT[key] = script
    return _LAST_SCRIPT[key]


def check_login_possible(config: Config, report: _Report) -> None:
    """``require_tls`` with no ``[tls]`` and no TLS listener: plaintext mechanisms are never
    offered, and TLS-only ones never work."""
    if not config.auth.require_tls or config.tls is not None:
        return
    specs = served_mechanisms(config)
    hidden = [m for m in config.auth.mechanisms
              if m in specs and (specs[m].plaintext or specs[m].needs_tls)]
    if not hidden:
        report.warn("auth.require_tls", "is true but there is no [tls] section: no session is"
                    f" ever encrypted ({', '.join(config.auth.mechanisms)} work without TLS,"
                    " but the mail and the user names cross the network in clear)")
        return
    if len(hidden) == len(config.auth.mechanisms):
        report.problem("auth.require_tls", "is true but there is no [tls] section, so"
                       f" {', '.join(hidden)} can never be used and nobody can log in: add"
                       " [tls] (certificate, private_key) or set require_tls = false")
    else:
        usable = [m for m in config.auth.mechanisms if m not in hidden]
        report.warn("auth.require_tls", f"is true but there is no [tls] section: only"
                    f" {', '.join(usable)} can be used; {', '.join(hidden)} never will")


def secret_keys(config: Config) -> list[str]:
    """The keys of ``config`` that hold a secret: a bind password, an OAuth2 client
    secret, HTTP headers (an API token), a Redis URL's password."""
    keys = []
    for name, backend in config.backends.items():
        for key in ("search_password", "client_secret", "headers"):
            if getattr(backend.options, key, None):
                keys.append(f"backends.{name}.{key}")
    limits = config.sections.get("limits")
    store = getattr(limits, "store", "") or ""
    if store.startswith(("redis://", "rediss://")):
        from saslsmtp.limits.redisurl import parse_redis_url
        if parse_redis_url(store).password:
            keys.append("limits.store")
    return keys


def check_secrets_readable(config: Config, report: _Report) -> None:
    """A configuration that holds secrets and that every local user can read gives them
    away (Postfix's ``postfix check`` and ssh warn the same way)."""
    try:
        mode = Path(config.path).stat().st_mode
    except OSError:
        return
    keys = secret_keys(config)
    if keys and mode & stat.S_IROTH:
        report.warn(keys[0], f"{config.path} holds secrets ({', '.join(keys)}) and every user"
                             f" can read it (mode {stat.S_IMODE(mode):o}): chmod o-r it"
                             " (0640, group the server's)")


def check_pidfile(pidfile: str | None, who: RunAs, report: _Report) -> None:
    """twistd removes its pid file at stop, after the drop: the folder must let it."""
    if not pidfile or who.uid == os.geteuid():
        return
    folder = Path(pidfile).resolve().parent
    if not folder.is_dir() or unreachable(folder / "x", who) is not None \
            or not allowed(folder, who, WRITE | SEARCH):
        report.warn("server.user", f"twistd's pid file {pidfile} cannot be removed at stop by"
                    f" {who.name} ({folder} is not writable by it): use --pidfile in a folder"
                    f" {who.name} owns (e.g. /run/saslsmtp/), or --pidfile= for none")


def twistd_problems(options: Any) -> list[str]:
    """What would make twistd itself fail after saslsmtp is built, with a traceback or
    only later: a ``--rundir`` that is not a folder, a ``--pidfile`` whose folder is
    missing or not writable (twistd writes it before any privilege drop, as the user
    starting it) or that is a folder, ``--logfile=-`` for a daemon (its standard output
    is closed), ``--uid``/``--gid`` of another user without root (twistd fails to switch
    after binding)."""
    problems = []
    rundir = options.get("rundir") or "."
    if not os.path.isdir(rundir):
        problems.append(f"--rundir {rundir}: no such folder")
    pidfile = options.get("pidfile")
    if pidfile:
        folder = os.path.dirname(os.path.abspath(pidfile))
        if not os.path.isdir(folder):
            problems.append(f"--pidfile {pidfile}: no such folder {folder}")
        elif os.path.isdir(pidfile):
            problems.append(f"--pidfile {pidfile}: is a folder; name a file in it")
        elif not os.access(folder, os.W_OK | os.X_OK):
            problems.append(f"--pidfile {pidfile}: {folder} is not writable")
    if options.get("logfile") == "-" and not options.get("nodaemon"):
        problems.append("--logfile=- writes to standard output, which a daemon closes: add"
                        " --nodaemon (-n), or give a file")
    uid, gid = options.get("uid"), options.get("gid")
    if os.geteuid() != 0 and ((uid is not None and uid != os.getuid())
                              or (gid is not None and gid != os.getgid())):
        problems.append(f"--uid/--gid {uid}/{gid}: switching user needs root (this is uid"
                        f" {os.getuid()}); start as root, or leave them out")
    elif uid is not None and (gid is None or uid != os.getuid()) and not _has_passwd_entry(uid):
        problems.append(f"--uid {uid}: no such user (twistd looks up its groups"
                        + (")" if gid is not None else " and its primary group)")
                        + "; name an existing user, or use [server] user")
    return problems


def pidfile_unwritable(pidfile: str | None) -> str | None:
    """A start's try at writing ``--pidfile``: why it cannot be, or ``None``.

    twistd writes it after saslsmtp is built, and a failure there is a traceback.
    ``twistd_problems`` checks the folder's mode, but root passes every mode check where
    the file system itself refuses (``/proc``, ``/sys``, a root-squashed NFS export, a
    security module's rule).  So a start creates the file and removes it at once (one
    that exists is opened for writing, not changed); ``--check`` writes nothing."""
    if not pidfile:
        return None
    try:
        if os.path.lexists(pidfile):
            os.close(os.open(pidfile, os.O_WRONLY | os.O_APPEND))
        else:
            os.close(os.open(pidfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.unlink(pidfile)
    except OSError as e:
        return f"--pidfile {pidfile}: cannot be written: {e.strerror}"
    return None


def _has_passwd_entry(uid: int) -> bool:
    """twistd needs one to switch to ``uid`` (initgroups; without ``--gid``, the primary
    group): without it, it failed after binding, with a ``KeyError`` traceback."""
    import pwd
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def twistd_warnings(options: Any, syslog_socket: str = "/dev/log") -> list[str]:
    """twistd options that work, but not as one may think: ``--syslog`` ignores
    ``--logfile``, and without a syslog daemon (``/dev/log``, often so in a container)
    every line is dropped without a word."""
    if not options.get("syslog"):
        return []
    notes = []
    if options.get("logfile"):
        notes.append(f"saslsmtp: warning: --logfile {options['logfile']} is ignored: --syslog wins")
    if not os.path.exists(syslog_socket):
        notes.append(f"saslsmtp: warning: --syslog, but no syslog daemon listens ({syslog_socket}"
                     " does not exist): every log line will be lost")
    return notes


def pidfile_in_the_way(pidfile: str | None, pid: int | None = None,
                       command: Callable[[int], str | None] | None = None) -> tuple[str | None, str | None]:
    """A start's look at an existing ``--pidfile``: ``(problem, warning)``.

    twistd refuses to start while the file names a live process, in five lines, or with
    a traceback when it cannot read the file.  A process that is twistd (a second start
    of the same server) is one line here.  A file naming this very process (a container,
    whose server is PID 1 at every start) or a process that is no twistd at all (its pid
    was reused after a crash) is stale: removed, with a warning.  ``command``: the
    command line of a pid (``None``: gone), for tests."""
    if not pidfile or not os.path.lexists(pidfile) or os.path.isdir(pidfile):
        return None, None
    pid = os.getpid() if pid is None else pid
    command = command or _command_line
    try:
        with open(pidfile) as f:
            text = f.read().strip()
    except OSError as e:
        return f"--pidfile {pidfile}: cannot read it: {e.strerror}", None
    if not text.isdigit():
        return None, None  # twistd's own line: "Pidfile ... contains non-numeric value"
    other = int(text)
    running = command(other) if other != pid else None
    if other != pid and running is None:
        return None, None  # twistd removes it, and says so
    if running is not None and "twistd" in running:
        return (f"--pidfile {pidfile}: twistd is running as PID {other}: stop it first, or"
                " give this server another --pidfile"), None
    try:
        os.unlink(pidfile)
    except OSError as e:
        return f"--pidfile {pidfile}: stale (PID {other} is not twistd) but cannot be removed: {e.strerror}", None
    now = "this process" if other == pid else f"{running!r}, not twistd"
    return None, f"saslsmtp: warning: removed the stale pid file {pidfile}: PID {other} is {now}"


def _command_line(pid: int) -> str | None:
    """The command line of process ``pid`` ("" if unknown), ``None`` if there is none."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # someone else's: it exists
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "twistd?"  # no /proc: assume the worst, as twistd does


def preflight(config: Config, reactor: Any, who: RunAs | None = None,
              pidfile: str | None = None, workers: int | None = None) -> list[str]:
    """Run every check; raise ``ConfigError`` with all problems, else return warnings.
    ``workers``: ``--workers``, if given."""
    who = who or RunAs.current()
    report = _Report(config)
    count = config.ops.worker_count(workers)
    check_endpoints(config, reactor, report, count)
    check_tls(config, who, report)
    check_paths(config, who, report)
    check_control_socket(config, who, count, report)
    check_worker_timeout(config, count, report)
    check_proxy_trust(config, report)
    check_login_possible(config, report)
    check_secrets_readable(config, report)
    check_pidfile(pidfile, who, report)
    if report.problems:
        raise ConfigError(report.problems)
    return report.warnings


def checked_config(path: str, reactor: Any, who: RunAs | None = None, pidfile: str | None = None,
                   load: Callable[[str], Config] | None = None,
                   workers: int | None = None) -> tuple[Config, list[str]]:
    """What a start, ``--check`` and a SIGHUP reload all accept, so the three refuse the
    same files with the same words: the file parses, the world it names passes
    ``preflight``, the users files and the sender map read cleanly.  Returns the
    configuration and the warnings; raises ``ConfigError``."""
    from saslsmtp.service import check_users_files, load as load_file
    config = (load or load_file)(path)
    warnings = preflight(config, reactor, who or run_as(config), pidfile, workers)
    check_users_files(config, warnings.append)
    return config, warnings
