"""The TOML configuration file -> one frozen ``Config`` (CONTRACT.md section 2).

No Twisted here.  ``load_config(path)`` parses once; every problem becomes a
``ConfigError`` naming the file, the dotted key and its line, never a traceback.
Each backend type has its own frozen options class, registered in ``BACKEND_TYPES``;
add a backend type by adding a class there (and a checker in ``saslsmtp.checkers``).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from saslsmtp.opsconfig import SERVER_KEYS, OpsConfig, check_identity, parse_ops

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

PATH = {"path": True}  # field metadata: resolve relative to the config file's folder


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: identity, listeners and limits."""

    hostname: str = "localhost"
    listen: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    max_message_size: int = 26214400
    max_recipients: int = 100
    idle_timeout: float = 300.0


@dataclass(frozen=True)
class TLSConfig:
    """``[tls]``: its presence turns STARTTLS on for plain listeners."""

    certificate: str = field(default="", metadata=PATH)
    private_key: str = field(default="", metadata=PATH)
    client_ca: str | None = field(default=None, metadata=PATH)  # verify client certs (EXTERNAL)
    client_identity: str = "cn"  # EXTERNAL identity: the certificate's "cn" or first "email" SAN


@dataclass(frozen=True)
class AuthConfig:
    """``[auth]``: mechanisms, TLS policy, script, backends and abuse limits."""

    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    require_tls: bool = True
    script: str | None = field(default=None, metadata=PATH)
    script_timeout: float = 10.0
    script_max_steps: int = 16
    backends: tuple[str, ...] = ()
    failure_delay: float = 1.0
    max_failures: int = 3
    hash_threads: int = 4


@dataclass(frozen=True)
class DeliveryConfig:
    """``[delivery]``: where accepted mail goes."""

    type: str = "maildir"
    path: str = field(default="var/mail", metadata=PATH)


# ---- backends: one frozen class per ``type`` ------------------------------


@dataclass(frozen=True)
class FileBackendConfig:
    """``type = "file"``: a Dovecot passwd-file."""

    path: str = field(default="", metadata=PATH)
    default_scheme: str = "CRYPT"


@dataclass(frozen=True)
class LdapBackendConfig:
    """``type = "ldap"``: bind as the user (DN template or search-then-bind)."""

    url: tuple[str, ...] = ()
    user_dn: str | None = None
    search_base: str | None = None
    search_filter: str | None = None
    search_dn: str | None = None
    search_password: str | None = field(default=None, repr=False)  # a secret: not in repr
    require_filter: str | None = None
    start_tls: bool = False
    ca_file: str | None = field(default=None, metadata=PATH)
    verify_hostname: bool = True
    timeout: float = 5.0
    threads: int = 4  # measured: more threads only add GIL contention (README, LDAP)


@dataclass(frozen=True)
class SmtpBackendConfig:
    """``type = "smtp"``: forward the AUTH to another SMTP server."""

    host: str = "127.0.0.1"
    port: int = 587
    endpoint: str | None = None
    starttls: bool = True
    tls: bool = False  # implicit TLS (port 465 style)
    ca_file: str | None = field(default=None, metadata=PATH)
    tls_hostname: str | None = None
    helo: str | None = None
    timeout: float = 10.0


@dataclass(frozen=True)
class HttpBackendConfig:
    """``type = "http"``: POST JSON to an API."""

    url: str = ""
    timeout: float = 5.0
    headers: Mapping[str, str] = field(default_factory=dict)
    ca_file: str | None = field(default=None, metadata=PATH)


@dataclass(frozen=True)
class DovecotBackendConfig:
    """``type = "dovecot"``: Dovecot's auth client protocol."""

    socket: str = field(default="", metadata=PATH)  # a UNIX socket path, or "tcp:HOST:PORT"
    timeout: float = 5.0
    service: str = "smtp"


#: JWS algorithms a token may use: asymmetric only (a JWKS is public, so an HMAC "key"
#: from it would let anyone sign), never "none".  The default leaves out "EdDSA"
#: (deprecated by RFC 9864 for "Ed25519"; joserfc warns on each use).
OAUTH2_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                     "ES256", "ES384", "ES512", "Ed25519", "EdDSA")
OAUTH2_DEFAULT_ALGORITHMS = OAUTH2_ALGORITHMS[:-1]


@dataclass(frozen=True)
class OAuth2BackendConfig:
    """``type = "oauth2"``: validate bearer tokens (OAUTHBEARER, XOAUTH2) as JWTs against a
    JWKS (``jwks_file`` or ``jwks_url``) or at an RFC 7662 ``introspection_url``."""

    jwks_file: str | None = field(default=None, metadata=PATH)
    jwks_url: str | None = None
    introspection_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)  # a secret: not in repr
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    username_claim: str = "sub"
    scope: tuple[str, ...] = ()  # scopes the token must carry (all of them)
    algorithms: tuple[str, ...] = OAUTH2_DEFAULT_ALGORITHMS
    leeway: float = 60.0
    timeout: float = 5.0
    jwks_cache_time: float = 3600.0
    jwks_min_refresh: float = 30.0
    ca_file: str | None = field(default=None, metadata=PATH)


BACKEND_TYPES: dict[str, type] = {
    "file": FileBackendConfig,
    "ldap": LdapBackendConfig,
    "smtp": SmtpBackendConfig,
    "http": HttpBackendConfig,
    "dovecot": DovecotBackendConfig,
    "oauth2": OAuth2BackendConfig,
}


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
    delivery: DeliveryConfig
    ops: OpsConfig = OpsConfig()  # [server] workers/user/group/log_*, [metrics]

    def line_of(self, key: str) -> int | None:  # pragma: no cover - convenience
        return None


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------

MECHANISM_NAME = re.compile(r"^[A-Z0-9_-]{1,20}$")
_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_KEY = re.compile(r'^\s*("?)([A-Za-z0-9_-]+)\1\s*=')


def key_lines(text: str) -> dict[str, int]:
    """Map dotted keys (``auth.backends``) and tables (``backends.users``) to line numbers."""
    lines: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), start=1):
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


class _Parser:
    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.lines = key_lines(text)
        self.problems: list[ConfigProblem] = []
        self.base = Path(file).resolve().parent

    def problem(self, key: str, message: str) -> None:
        line = self.lines.get(key)
        probe = key
        while line is None and "." in probe:
            probe = probe.rsplit(".", 1)[0]
            line = self.lines.get(probe)
        self.problems.append(ConfigProblem(self.file, key, line, message))

    def table(self, cls: type, data: Any, prefix: str, skip: tuple[str, ...] = ()) -> Any:
        """Build the frozen ``cls`` from a TOML table, checking keys and types."""
        if not isinstance(data, dict):
            self.problem(prefix, "must be a table")
            return cls()
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            dotted = f"{prefix}.{key}"
            if key in skip:
                continue
            if key not in known:
                self.problem(dotted, f"unknown key (known: {', '.join(sorted(known))})")
                continue
            ok, converted, expected = _coerce(value, hints[key])
            if not ok:
                self.problem(dotted, f"must be {expected}, not {_toml_type(value)}")
                continue
            if known[key].metadata.get("path") and isinstance(converted, str) and converted:
                converted = str((self.base / converted).resolve()) if not converted.startswith(
                    ("tcp:", "unix:")) else converted
            values[key] = converted
        return cls(**values)


def _toml_type(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _coerce(value: Any, hint: Any) -> tuple[bool, Any, str]:
    """Check ``value`` against a type hint; return (ok, converted value, expected words)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        for candidate in inner:
            ok, converted, _ = _coerce(value, candidate)
            if ok:
                return True, converted, ""
        return False, None, " or ".join(_coerce(None, a)[2] for a in inner)
    if hint is bool:
        return isinstance(value, bool), value, "a boolean"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None, "a number"
    if hint is str:
        return isinstance(value, str), value, "a string"
    if origin is tuple:
        # tuple[str, ...]: an array of strings; a single string is accepted as one item
        if isinstance(value, str):
            return True, (value,), "an array of strings"
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return ok, tuple(value) if ok else None, "an array of strings"
    if origin in (dict, Mapping) or hint is Mapping or origin is typing.Mapping or (
            origin is not None and getattr(origin, "__name__", "") == "Mapping"):
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        return ok, types.MappingProxyType(dict(value)) if ok else None, "a table of strings"
    return False, None, str(hint)


def parse_config(text: str, file: str = "<config>", *, known_mechanisms: frozenset[str] = frozenset()) -> Config:
    """Parse and validate the configuration text; raise ``ConfigError`` listing every problem.

    ``known_mechanisms`` are the names built-in mechanisms serve; a mechanism outside it
    is legal only when an AUTH script is configured (the script then serves it).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        match = re.search(r"line (\d+)", str(e))
        raise ConfigError([ConfigProblem(file, "", int(match.group(1)) if match else None,
                                         f"not valid TOML: {e}")]) from None
    p = _Parser(file, text)
    known_top = {"server", "tls", "auth", "backends", "delivery", "metrics"}
    for key in data:
        if key not in known_top:
            p.problem(key, f"unknown section (known: {', '.join(sorted(known_top))})")
    server = p.table(ServerConfig, data.get("server", {}), "server", skip=SERVER_KEYS)
    ops = parse_ops(data.get("server", {}), data.get("metrics"), p.problem)
    check_identity(ops, p.problem)
    tls = p.table(TLSConfig, data["tls"], "tls") if "tls" in data else None
    auth = p.table(AuthConfig, data.get("auth", {}), "auth")
    delivery = p.table(DeliveryConfig, data.get("delivery", {}), "delivery")

    backends: dict[str, BackendConfig] = {}
    raw_backends = data.get("backends", {})
    if not isinstance(raw_backends, dict):
        p.problem("backends", "must be a table of backend tables")
        raw_backends = {}
    for name, table in raw_backends.items():
        prefix = f"backends.{name}"
        if not isinstance(table, dict):
            p.problem(prefix, "must be a table")
            continue
        kind = table.get("type")
        if kind not in BACKEND_TYPES:
            p.problem(f"{prefix}.type" if "type" in table else prefix,
                      f"type must be one of {', '.join(sorted(BACKEND_TYPES))}")
            continue
        options = p.table(BACKEND_TYPES[kind], table, prefix, skip=("type",))
        backends[name] = BackendConfig(name, kind, options)
        _check_backend(p, prefix, kind, options)

    # cross-checks
    if server.max_message_size <= 0:
        p.problem("server.max_message_size", "must be positive")
    if not server.listen:
        p.problem("server.listen", "needs at least one endpoint")
    if tls is not None:
        if tls.client_identity not in ("cn", "email"):
            p.problem("tls.client_identity", 'must be "cn" or "email"')
        if tls.client_ca is not None and not Path(tls.client_ca).is_file():
            p.problem("tls.client_ca", f"no such file: {tls.client_ca}")
        for key in ("certificate", "private_key"):
            value = getattr(tls, key)
            if not value:
                p.problem(f"tls.{key}", "is required in [tls]")
            elif not Path(value).is_file():
                p.problem(f"tls.{key}", f"no such file: {value}")
    needs_tls = [e for e in server.listen if e.split(":", 1)[0] == "ssl"
                 or e.startswith("haproxy:ssl:")]
    if needs_tls and tls is None:
        p.problem("server.listen", "an ssl: endpoint needs a [tls] section")
    mechanisms = tuple(m.upper() for m in auth.mechanisms)
    for m in mechanisms:
        if not MECHANISM_NAME.match(m):
            p.problem("auth.mechanisms", f"{m!r} is not a SASL mechanism name (A-Z 0-9 - _, 1-20)")
    if len(set(mechanisms)) != len(mechanisms):
        p.problem("auth.mechanisms", "lists a mechanism twice")
    if known_mechanisms and auth.script is None:
        for m in mechanisms:
            if m not in known_mechanisms:
                p.problem("auth.mechanisms",
                          f"{m} is not built in and no auth.script is set to serve it")
    if auth.script is not None and not Path(auth.script).is_file():
        p.problem("auth.script", f"no such file: {auth.script}")
    for name in auth.backends:
        if name not in raw_backends:
            p.problem("auth.backends", f"backend {name!r} is not defined (no [backends.{name}])")
    if not auth.backends and auth.script is None and mechanisms:
        p.problem("auth.backends", "is empty and no auth.script is set: nobody could log in")
    if auth.failure_delay < 0:
        p.problem("auth.failure_delay", "must not be negative")
    if auth.max_failures < 1:
        p.problem("auth.max_failures", "must be at least 1")
    if auth.script_timeout <= 0:
        p.problem("auth.script_timeout", "must be positive")
    if auth.script_max_steps < 1:
        p.problem("auth.script_max_steps", "must be at least 1")
    if delivery.type != "maildir":
        p.problem("delivery.type", "must be \"maildir\"")
    if p.problems:
        raise ConfigError(p.problems)
    auth = dataclasses.replace(auth, mechanisms=mechanisms)
    return Config(path=file, server=server, tls=tls, auth=auth, backends=backends,
                  delivery=delivery, ops=ops)


def _check_backend(p: _Parser, prefix: str, kind: str, o: Any) -> None:
    """Per-type checks that need more than a type: required keys, exclusive choices."""
    if kind == "file":
        if not o.path:
            p.problem(f"{prefix}.path", "is required")
        elif not Path(o.path).is_file():
            p.problem(f"{prefix}.path", f"no such file: {o.path}")
    elif kind == "ldap":
        if not o.url:
            p.problem(f"{prefix}.url", "is required")
        if bool(o.user_dn) == bool(o.search_base):
            p.problem(prefix, "needs exactly one of user_dn (DN template) or search_base"
                      " (search-then-bind)")
        if o.user_dn and "{username}" not in o.user_dn:
            p.problem(f"{prefix}.user_dn", "must contain {username}")
        if o.search_base and (not o.search_filter or "{username}" not in o.search_filter):
            p.problem(f"{prefix}.search_filter", "must be set and contain {username}")
        if o.timeout <= 0:
            p.problem(f"{prefix}.timeout", "must be positive")
        _check_ldap(p, prefix, o)
    elif kind == "http":
        if not o.url.startswith(("http://", "https://")):
            p.problem(f"{prefix}.url", "must be an http:// or https:// URL")
    elif kind == "dovecot":
        if not o.socket:
            p.problem(f"{prefix}.socket", "is required")
        elif o.socket.startswith("tcp:"):
            tcp = re.fullmatch(r"tcp:(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):([0-9]{1,5})", o.socket)
            if not tcp or not 0 < int(tcp.group(2)) < 65536:
                p.problem(f"{prefix}.socket", "must be a UNIX socket path or tcp:HOST:PORT")
    elif kind == "oauth2":
        _check_oauth2(p, prefix, o)
    if kind in ("smtp", "http") and o.ca_file and not Path(o.ca_file).is_file():
        p.problem(f"{prefix}.ca_file", f"no such file: {o.ca_file}")
    for attr in ("timeout",):
        if hasattr(o, attr) and getattr(o, attr) <= 0:
            p.problem(f"{prefix}.{attr}", "must be positive")


def _check_oauth2(p: _Parser, prefix: str, o: Any) -> None:
    """``type = "oauth2"``: one key source, URLs, the claims a JWT must be checked against."""
    sources = [k for k in ("jwks_file", "jwks_url", "introspection_url") if getattr(o, k)]
    if len(sources) != 1:
        p.problem(prefix, "needs exactly one of jwks_file, jwks_url or introspection_url")
    if o.jwks_file and not Path(o.jwks_file).is_file():
        p.problem(f"{prefix}.jwks_file", f"no such file: {o.jwks_file}")
    for key in ("jwks_url", "introspection_url"):
        value = getattr(o, key)
        if value and not value.startswith(("http://", "https://")):
            p.problem(f"{prefix}.{key}", "must be an http:// or https:// URL")
    if (o.client_id is None) != (o.client_secret is None):
        p.problem(f"{prefix}.client_secret" if o.client_id is not None else f"{prefix}.client_id",
                  "client_id and client_secret go together")
    if o.client_id is not None and not o.introspection_url:
        p.problem(f"{prefix}.client_id", "is only used with introspection_url")
    if o.jwks_file or o.jwks_url:  # a JWT signed by the same IdP for another app must not pass
        if not o.issuer:
            p.problem(f"{prefix}.issuer", "is required with jwks_file / jwks_url")
        if not o.audience:
            p.problem(f"{prefix}.audience", "is required with jwks_file / jwks_url")
    if not o.username_claim:
        p.problem(f"{prefix}.username_claim", "must not be empty")
    if not o.algorithms:
        p.problem(f"{prefix}.algorithms", "must name at least one algorithm")
    for alg in o.algorithms:
        if alg not in OAUTH2_ALGORITHMS:
            p.problem(f"{prefix}.algorithms", f"{alg!r} is not allowed (choose from"
                      f" {', '.join(OAUTH2_ALGORITHMS)})")
    if o.leeway < 0:
        p.problem(f"{prefix}.leeway", "must not be negative")
    for key in ("jwks_cache_time", "jwks_min_refresh"):
        if getattr(o, key) < 0:
            p.problem(f"{prefix}.{key}", "must not be negative")
    if o.ca_file and not Path(o.ca_file).is_file():
        p.problem(f"{prefix}.ca_file", f"no such file: {o.ca_file}")


def _check_ldap(p: _Parser, prefix: str, o: Any) -> None:
    """``type = "ldap"``: server URLs, TLS, service account and filter shape."""
    from urllib.parse import urlsplit
    for url in o.url:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("ldap", "ldaps") or not parts.hostname \
                or parts.path not in ("", "/") or parts.query or parts.username:
            p.problem(f"{prefix}.url", f"{url!r} is not ldap://host[:port] or ldaps://host[:port]")
        elif o.start_tls and parts.scheme.lower() == "ldaps":
            p.problem(f"{prefix}.start_tls", f"cannot be used with {url!r} (ldaps:// is TLS"
                      " already)")
    if o.threads < 1:
        p.problem(f"{prefix}.threads", "must be at least 1")
    if (o.search_dn is None) != (o.search_password is None):
        p.problem(f"{prefix}.search_password" if o.search_dn else f"{prefix}.search_dn",
                  "search_dn and search_password go together")
    if o.search_dn is not None and not o.search_base:
        p.problem(f"{prefix}.search_dn", "is only used with search_base (search-then-bind)")
    if o.ca_file and not Path(o.ca_file).is_file():
        p.problem(f"{prefix}.ca_file", f"no such file: {o.ca_file}")
    if o.require_filter is not None and not (o.require_filter.startswith("(")
                                             and o.require_filter.endswith(")")):
        p.problem(f"{prefix}.require_filter", "must be an LDAP filter in parentheses")


def load_config(path: str, *, known_mechanisms: frozenset[str] = frozenset()) -> Config:
    """Read and parse the file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([ConfigProblem(path, "", None, f"cannot read: {e.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem(path, "", None, "is not UTF-8 text")]) from None
    return parse_config(text, path, known_mechanisms=known_mechanisms)
