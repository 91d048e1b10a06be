"""The TOML configuration file -> one frozen ``Config``.

``load_config(path)`` parses once; every problem becomes a ``ConfigProblem`` naming the
file, the dotted key and its line, never a traceback.  This module knows TOML, line
numbers and the sections; what a section's or a backend's options mean and which values
are allowed lives in its ``Options`` class (``saslsmtp.options``): backends' beside their
checkers (``saslsmtp.checkers.<type>``, found through ``saslsmtp.checkers.registry``),
sections' in ``SECTIONS`` below.

Adding a section: write a frozen ``Options`` subclass (fields, defaults, ``check()``),
add one ``Section`` line to ``SECTIONS`` (a dotted name such as ``"auth.cache"`` is a
sub-table), and read it as ``config.section("name")``.  Rules that involve several
sections go into the section's ``cross_check``.
"""

from __future__ import annotations

import functools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from saslsmtp.options import (PATH, OptionProblem, Options, OptionsError, hostname_problem,
                              problem_if)

from saslsmtp.relay.options import MaildirDelivery, UpstreamDelivery, parse_delivery
from saslsmtp.senders import SubmissionOptions, parse_submission
from saslsmtp.opsconfig import SERVER_KEYS, OpsConfig, check_identity, parse_ops
from saslsmtp.limits.settings import parse_auth_cache, parse_limits

#: A UTF-8 byte order mark, as Notepad saves a file: skipped before the TOML.
BOM = "\ufeff"

# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with the file."""

    file: str
    key: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` lists every reason found."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --------------------------------------------------------------------------
# The frozen configuration
# --------------------------------------------------------------------------

MECHANISM_NAME = re.compile(r"^[A-Z0-9_-]{1,20}$")


@dataclass(frozen=True)
class ServerConfig(Options):
    """``[server]``: identity, listeners and limits."""

    hostname: str = "localhost"
    listen: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    max_message_size: int = 26214400
    max_recipients: int = 100
    idle_timeout: float = 300.0
    junk_command_limit: int = 100  # NOOP/RSET/VRFY/HELP/unknown per session before 421
    max_unauthenticated_time: float = 300.0  # seconds a session may last before AUTH
    tls_handshake_timeout: float = 30.0  # seconds for a TLS handshake (ssl: or STARTTLS)
    #: the proxies whose PROXY header a haproxy: listener believes; None: every peer
    proxy_trusted_networks: tuple[str, ...] | None = None

    def check(self) -> Iterable[OptionProblem]:
        from saslsmtp.proxytrust import network_problem
        trusted = self.proxy_trusted_networks
        return [*problem_if(trusted == (), "proxy_trusted_networks",
                            "is empty: every haproxy: connection would be refused (leave it"
                            " out to believe every peer)"),
                *[OptionProblem("proxy_trusted_networks", why) for why in
                  map(network_problem, trusted or ()) if why is not None],
                *problem_if(self.max_message_size <= 0, "max_message_size", "must be positive"),
                *problem_if(not self.listen, "listen", "needs at least one endpoint"),
                *hostname_problem("hostname", self.hostname),
                *problem_if(self.max_recipients < 1, "max_recipients", "must be at least 1"),
                *problem_if(self.idle_timeout <= 0, "idle_timeout", "must be positive"),
                *problem_if(self.junk_command_limit < 0, "junk_command_limit", "must not be negative"),
                *problem_if(self.max_unauthenticated_time <= 0, "max_unauthenticated_time",
                            "must be positive"),
                *problem_if(self.tls_handshake_timeout <= 0, "tls_handshake_timeout",
                            "must be positive")]


@dataclass(frozen=True)
class TLSConfig(Options):
    """``[tls]``: its presence turns STARTTLS on for plain listeners."""

    certificate: str = field(default="", metadata=PATH)
    private_key: str = field(default="", metadata=PATH)
    client_ca: str | None = field(default=None, metadata=PATH)  # verify client certs (EXTERNAL)
    client_identity: str = "cn"  # EXTERNAL identity: the certificate's "cn" or first "email" SAN

    def check(self) -> Iterable[OptionProblem]:
        problems = problem_if(self.client_identity not in ("cn", "email"), "client_identity",
                              'must be "cn" or "email"')
        if self.client_ca is not None and not Path(self.client_ca).is_file():
            problems.append(OptionProblem("client_ca", f"no such file: {self.client_ca}"))
        for key in ("certificate", "private_key"):
            value = getattr(self, key)
            if not value:
                problems.append(OptionProblem(key, "is required in [tls]"))
            elif not Path(value).is_file():
                problems.append(OptionProblem(key, f"no such file: {value}"))
        return problems


@dataclass(frozen=True)
class AuthConfig(Options):
    """``[auth]``: mechanisms, TLS policy, script, backends and abuse limits.

    ``mechanisms`` are upper-cased here (names are case-insensitive)."""

    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    require_tls: bool = True
    script: str | None = field(default=None, metadata=PATH)
    script_timeout: float = 10.0
    script_max_steps: int = 16
    backends: tuple[str, ...] = ()
    failure_delay: float = 1.0
    max_failures: int = 3
    hash_threads: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.mechanisms, (list, tuple)) and all(
                isinstance(m, str) for m in self.mechanisms):
            object.__setattr__(self, "mechanisms", tuple(m.upper() for m in self.mechanisms))
        super().__post_init__()

    def check(self) -> Iterable[OptionProblem]:
        problems = [OptionProblem("mechanisms", f"{m!r} is not a SASL mechanism name"
                                  " (A-Z 0-9 - _, 1-20)")
                    for m in self.mechanisms if not MECHANISM_NAME.match(m)]
        problems += problem_if(len(set(self.mechanisms)) != len(self.mechanisms),
                               "mechanisms", "lists a mechanism twice")
        if self.script is not None and not Path(self.script).is_file():
            problems.append(OptionProblem("script", f"no such file: {self.script}"))
        problems += problem_if(self.failure_delay < 0, "failure_delay", "must not be negative")
        problems += problem_if(self.max_failures < 1, "max_failures", "must be at least 1")
        problems += problem_if(self.script_timeout <= 0, "script_timeout", "must be positive")
        problems += problem_if(self.script_max_steps < 1, "script_max_steps",
                               "must be at least 1")
        problems += problem_if(self.hash_threads < 1, "hash_threads", "must be at least 1")
        return problems


@dataclass(frozen=True)
class DeliveryConfig(Options):
    """``[delivery]``: where accepted mail goes."""

    type: str = "maildir"
    path: str = field(default="var/mail", metadata=PATH)

    def check(self) -> Iterable[OptionProblem]:
        return problem_if(self.type != "maildir", "type", 'must be "maildir"')


@dataclass(frozen=True)
class BackendConfig:
    """One ``[backends.NAME]`` table: its ``name``, ``type`` and typed ``options``."""

    name: str
    type: str
    options: Any


@dataclass(frozen=True)
class Config:
    """The whole configuration, parsed once at startup."""

    path: str
    server: ServerConfig
    tls: TLSConfig | None
    auth: AuthConfig
    backends: Mapping[str, BackendConfig]
    delivery: DeliveryConfig | UpstreamDelivery
    submission: SubmissionOptions = SubmissionOptions()
    ops: OpsConfig = OpsConfig()  # [server] workers/user/group/log_*, [metrics]

    sections: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def section(self, name: str) -> Any:
        """A section registered in ``SECTIONS`` (``None``: an optional one that is absent)."""
        return self.sections[name]


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(r'^\s*("?)([A-Za-z0-9_-]+)\1\s*=')


def file_key_line(path: str, key: str) -> int | None:
    """The line of ``key`` in the configuration file at ``path``, else of the nearest
    table holding it (``backends.users`` for ``backends.users.url``); ``None`` when the
    file cannot be read.  For problems found after parsing (preflight, the wiring)."""
    try:
        lines = key_lines(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
    return line_of(lines, key)


def line_of(lines: dict[str, int], key: str) -> int | None:
    """``key``'s line in a ``key_lines`` map, else its nearest table's."""
    probe = key
    while probe and probe not in lines:
        probe = probe.rpartition(".")[0]
    return lines.get(probe)


def key_lines(text: str) -> dict[str, int]:
    """Map dotted keys (``auth.backends``) and tables (``backends.users``) to line numbers."""
    lines: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.removeprefix(BOM).splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            table = ".".join(part.strip().strip('"') for part in header.group(1).split("."))
            lines.setdefault(table, number)
            continue
        key = _KEY.match(line)
        if key:
            dotted = f"{table}.{key.group(2)}" if table else key.group(2)
            lines.setdefault(dotted, number)
    return lines




def _delivery(table: Any, problem: Callable[[str, str], None], base: Path
              ) -> DeliveryConfig | UpstreamDelivery | None:
    """``[delivery]``: a Maildir, or an upstream SMTP/LMTP server (``saslsmtp.relay``)."""
    parsed = parse_delivery(table, problem, base)
    if isinstance(parsed, MaildirDelivery):
        return DeliveryConfig(path=parsed.path)
    return parsed


# --------------------------------------------------------------------------
# Sections: the hook for new tables
# --------------------------------------------------------------------------

#: ``cross_check(sections)`` -> problems whose keys are dotted from the file's top level.
CrossCheck = Callable[[Mapping[str, Any]], Iterable[OptionProblem]]


#: ``parser(table, problem, base)`` for a section whose keys depend on each other (e.g.
#: ``[delivery]``'s ``type``): reports through ``problem(dotted_key, message)`` and returns
#: the parsed value, or ``None`` when it cannot be used.
SectionParser = Callable[[Any, Callable[[str, str], None], Path], Any]


@dataclass(frozen=True)
class Section:
    """One table of the file: its ``Options`` class, whether an absent table means
    ``None`` (``optional``: its presence switches a feature on, like ``[tls]``) or the
    defaults, and an optional ``cross_check`` over all parsed sections."""

    options: type[Options] | None = None
    optional: bool = False
    cross_check: CrossCheck | None = None
    parser: "SectionParser | None" = None
    skip: tuple[str, ...] = ()  # keys another module reads from this table


def _implicit_tls(entry: str) -> bool:
    """``ssl:...`` or ``systemd:...:ssl=yes`` (``haproxy:`` in front or not)."""
    inner = entry.removeprefix("haproxy:")
    return inner.split(":", 1)[0] == "ssl" or inner.startswith("systemd:") and ":ssl=yes" in inner


def _listen_needs_tls(sections: Mapping[str, Any]) -> Iterable[OptionProblem]:
    listen = sections["server"].listen
    needs_tls = any(_implicit_tls(e) for e in listen)
    return problem_if(needs_tls and sections["tls"] is None, "server.listen",
                      "an ssl: endpoint (or systemd:...:ssl=yes) needs a [tls] section")


#: Every section but ``[backends.*]``, in the order they are checked.  ``Config.section(name)``
#: returns the parsed value; the core ones are also ``Config`` attributes.
SECTIONS: dict[str, Section] = {
    "server": Section(ServerConfig, cross_check=_listen_needs_tls, skip=SERVER_KEYS),
    "tls": Section(TLSConfig, optional=True),
    "auth": Section(AuthConfig),
    "delivery": Section(parser=lambda table, problem, base: _delivery(table, problem, base)),
    "submission": Section(parser=parse_submission),
    "limits": Section(parser=lambda table, problem, base: _limits_table(
        functools.partial(parse_limits, base=base), "limits", table, problem)),
    "auth.cache": Section(parser=lambda table, problem, base: _limits_table(parse_auth_cache, "auth.cache", table, problem)),
}


def _limits_table(parse: Callable[..., Any], name: str, table: Any,
                  problem: Callable[[str, str], None]) -> Any:
    """``[limits]`` / ``[auth.cache]`` (``saslsmtp.limits.settings``)."""
    if not isinstance(table, dict):
        problem(name, "must be a table")
        return None
    return parse(table, problem)


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------


class _Problems:
    """Collects problems as ``file:line: key: message`` (the line of the key, else of its
    closest enclosing table)."""

    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.lines = key_lines(text)
        self.found: list[ConfigProblem] = []

    def add(self, key: str, message: str) -> None:
        line = self.lines.get(key)
        probe = key
        while line is None and "." in probe:
            probe = probe.rsplit(".", 1)[0]
            line = self.lines.get(probe)
        self.found.append(ConfigProblem(self.file, key, line, message))

    def add_all(self, prefix: str, problems: Iterable[OptionProblem]) -> None:
        for p in problems:
            self.add(f"{prefix}.{p.key}" if p.key and prefix else p.key or prefix, p.message)


def _table(report: _Problems, cls: type[Options], data: Any, prefix: str, base: Path,
           skip: Iterable[str] = ()) -> Any:
    """``cls.from_table`` with every problem reported under ``prefix``; ``None`` if unusable."""
    if not isinstance(data, dict):
        report.add(prefix, "must be a table")
        return None
    try:
        return cls.from_table(data, base, skip=skip)
    except OptionsError as e:
        report.add_all(prefix, e.problems)
        bad = {p.key for p in e.problems}
    try:  # without the bad keys, for the checks across sections (not reported again)
        return cls.from_table({k: v for k, v in data.items() if k not in bad}, base, skip=skip)
    except OptionsError:
        return None


def _subtable(name: str, data: Mapping[str, Any]) -> tuple[bool, Any]:
    """(present, value) of a dotted table name in the parsed TOML."""
    node: Any = data
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def parse_config(text: str, file: str = "<config>", *,
                 known_mechanisms: frozenset[str] = frozenset()) -> Config:
    """Parse and validate the configuration text; raise ``ConfigError`` listing every problem.

    ``known_mechanisms`` are the names built-in mechanisms serve; a mechanism outside it
    is legal only when an AUTH script is configured (the script then serves it).
    """
    from saslsmtp.checkers.registry import options_class, BACKEND_TYPES

    text = text.removeprefix(BOM)  # what Windows editors write first; TOML parsers refuse it
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        match = re.search(r"line (\d+)", str(e))
        raise ConfigError([ConfigProblem(file, "", int(match.group(1)) if match else None,
                                         f"not valid TOML: {e}")]) from None
    report = _Problems(file, text)
    base = Path(file).resolve().parent
    known_top = {name.split(".")[0] for name in SECTIONS} | {"backends", "metrics"}
    for key in data:
        if key not in known_top:
            report.add(key, f"unknown section (known: {', '.join(sorted(known_top))})")

    sections: dict[str, Any] = {}
    broken = False  # a section too wrong to build: skip the rules across sections
    for name, section in SECTIONS.items():
        present, raw = _subtable(name, data)
        children = [n.split(".")[-1] for n in SECTIONS if n.startswith(name + ".")
                    and n.count(".") == name.count(".") + 1]
        if not present and section.optional:
            sections[name] = None
            continue
        if section.parser is not None:
            sections[name] = section.parser(raw if present else {}, report.add, base)
        else:
            assert section.options is not None, name
            sections[name] = _table(report, section.options, raw if present else {}, name,
                                    base, [*children, *section.skip])
        broken = broken or sections[name] is None
    # [server]'s operations keys and [metrics] (saslsmtp.opsconfig)
    ops = parse_ops(data.get("server", {}), data.get("metrics"), report.add)
    check_identity(ops, report.add)

    backends: dict[str, BackendConfig] = {}
    raw_backends = data.get("backends", {})
    if not isinstance(raw_backends, dict):
        report.add("backends", "must be a table of backend tables")
        raw_backends = {}
    for name, table in raw_backends.items():
        prefix = f"backends.{name}"
        if not isinstance(table, dict):
            report.add(prefix, "must be a table")
            continue
        kind = table.get("type")
        if kind not in BACKEND_TYPES:
            report.add(f"{prefix}.type" if "type" in table else prefix,
                       f"type must be one of {', '.join(sorted(BACKEND_TYPES))}")
            continue
        options = _table(report, options_class(kind), table, prefix, base, skip=("type",))
        if options is not None:
            backends[name] = BackendConfig(name, kind, options)

    if not broken:
        for section in SECTIONS.values():
            if section.cross_check is not None:
                report.add_all("", section.cross_check(sections))
    auth = sections["auth"]
    if auth is not None:
        # a script set but refused (a missing file) is reported once, at auth.script:
        # the checks below must not say that none is set
        raw_auth = data.get("auth")
        scripted = auth.script is not None or isinstance(raw_auth, dict) and "script" in raw_auth
        if known_mechanisms and not scripted:
            for m in auth.mechanisms:
                if m not in known_mechanisms:
                    report.add("auth.mechanisms",
                               f"{m} is not built in and no auth.script is set to serve it")
        for name in auth.backends:
            if name not in raw_backends:
                report.add("auth.backends",
                           f"backend {name!r} is not defined (no [backends.{name}])")
        if not auth.mechanisms:  # and MAIL needs AUTH: the server could take no mail
            report.add("auth.mechanisms", "is empty: nobody could log in")
        elif not auth.backends and not scripted:
            report.add("auth.backends", "is empty and no auth.script is set: nobody could log in")
    if report.found:
        raise ConfigError(report.found)
    return Config(path=file, server=sections["server"], tls=sections["tls"], auth=auth,
                  backends=backends, delivery=sections["delivery"],
                  submission=sections["submission"] or SubmissionOptions(), ops=ops,
                  sections=sections)


def config_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be the configuration although something is there: standard
    input, a pipe or a device cannot be read again (each worker and every SIGHUP reload
    reads the file anew), a folder is not the file in it."""
    import stat
    if path == "-":
        return ("standard input cannot be the configuration: each worker and every SIGHUP"
                " reload read the file again; give its path")
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None  # reading it says why
    if stat.S_ISDIR(mode):
        return f"is a folder; give the configuration file (e.g. {Path(path) / 'saslsmtp.toml'})"
    if not stat.S_ISREG(mode):
        return ("is not a regular file (a pipe or a device): each worker and every SIGHUP"
                " reload read the file again; give a file")
    return None


def load_config(path: str, *, known_mechanisms: frozenset[str] = frozenset()) -> Config:
    """Read and parse the file at ``path``."""
    why = config_file_problem(path)
    if why is not None:
        raise ConfigError([ConfigProblem(path, "", None, why)])
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([ConfigProblem(path, "", None, f"cannot read: {e.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem(path, "", None, "is not UTF-8 text")]) from None
    return parse_config(text, path, known_mechanisms=known_mechanisms)


#: The option classes' former names, for code written before they moved beside their
#: checkers (``saslsmtp.checkers.<type>``).
_MOVED = {"FileBackendConfig": "file", "LdapBackendConfig": "ldap", "SmtpBackendConfig": "smtp",
          "HttpBackendConfig": "http", "DovecotBackendConfig": "dovecot",
          "OAuth2BackendConfig": "oauth2"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from saslsmtp.checkers.registry import options_class
        return options_class(_MOVED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
