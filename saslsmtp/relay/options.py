"""``[delivery]`` for ``type = "smtp"`` and ``"lmtp"``: frozen options and their parser.

No Twisted here.  ``parse_delivery(table, problem, base)`` takes the TOML table and a
``problem(key, message)`` callback (``config.py`` adds file and line) and returns
``MaildirDelivery`` or ``UpstreamDelivery``; it reports every problem it finds and
returns ``None`` when there was one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from saslsmtp.options import ca_file_problem, finite_number, hostname_problem

Problem = Callable[[str, str], None]

_ENDPOINT = re.compile(r"^(tcp:(?P<host>\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):(?P<port>[0-9]{1,5})"
                       r"|unix:(?P<path>.+))$")
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,64}$")  # RFC 5322 ftext
#: transactions per upstream connection by default (so at most 99 RSETs), below the 100
#: junk commands Postfix's smtpd_junk_command_limit and saslsmtp's junk_command_limit
#: allow; ``[delivery] reuse_limit`` sets it
REUSE_LIMIT = 100


@dataclass(frozen=True)
class MaildirDelivery:
    """``type = "maildir"``: as before, every message fsynced into ``path``."""

    type: str = "maildir"
    path: str = "var/mail"


@dataclass(frozen=True)
class UpstreamDelivery:
    """``type = "smtp"`` or ``"lmtp"``: every message goes on to ``endpoint``."""

    type: str = "smtp"
    endpoint: str = ""            # "tcp:host:port" or "unix:/path"
    starttls: bool = False
    tls: bool = False             # implicit TLS
    ca_file: str | None = None
    tls_hostname: str | None = None  # the name the certificate must carry (default: host)
    xclient: bool = False
    trace_header: str = ""        # without XCLIENT: a header naming login and client
    auth_param: bool = False      # MAIL FROM:<..> AUTH=<login> when the upstream has AUTH
    helo: str | None = None       # our EHLO/LHLO name (default: [server] hostname)
    timeout: float = 60.0         # connect, each command, a stalled DATA phase
    final_timeout: float = 600.0  # the reply to the final dot (RFC 5321 4.5.3.2.6)
    pool_size: int = 4
    reuse_limit: int = REUSE_LIMIT  # transactions one connection carries, then QUIT

    @property
    def lmtp(self) -> bool:
        return self.type == "lmtp"

    @property
    def host(self) -> str | None:
        """The TCP host name (no brackets), or ``None`` for a UNIX socket."""
        match = _ENDPOINT.match(self.endpoint)
        return match.group("host").strip("[]") if match and match.group("host") else None


_UPSTREAM_KEYS: dict[str, tuple[type, ...]] = {
    "type": (str,), "endpoint": (str,), "starttls": (bool,), "tls": (bool,),
    "ca_file": (str,), "tls_hostname": (str,), "xclient": (bool,), "trace_header": (str,),
    "auth_param": (bool,), "helo": (str,), "timeout": (int, float), "final_timeout": (int, float),
    "pool_size": (int,), "reuse_limit": (int,),
    "path": (str,)}


def parse_delivery(table: Any, problem: Problem, base: Path | None = None
                   ) -> MaildirDelivery | UpstreamDelivery | None:
    """The ``[delivery]`` table; relative paths resolve against ``base``."""
    if not isinstance(table, dict):
        problem("delivery", "must be a table")
        return None
    kind = table.get("type", "maildir")
    if kind not in ("maildir", "smtp", "lmtp"):
        problem("delivery.type", 'must be "maildir", "smtp" or "lmtp"')
        return None
    ok = True
    values: dict[str, Any] = {}
    allowed = {"type", "path"} if kind == "maildir" else set(_UPSTREAM_KEYS) - {"path"}
    for key, value in table.items():
        if key not in allowed:
            problem(f"delivery.{key}", f"unknown key for type {kind!r} "
                                       f"(known: {', '.join(sorted(allowed))})")
            ok = False
            continue
        types_ = _UPSTREAM_KEYS[key]
        if isinstance(value, bool) and bool not in types_ or not isinstance(value, types_):
            want = " or ".join({bool: "a boolean", int: "an integer", float: "a number",
                                str: "a string"}[t] for t in types_ if t is not int
                               or float not in types_)
            problem(f"delivery.{key}", f"must be {want}")
            ok = False
            continue
        values[key] = float(value) if key in ("timeout", "final_timeout") \
            and isinstance(value, (int, float)) else value
    for key in ("path", "ca_file"):
        if isinstance(values.get(key), str) and base is not None:
            values[key] = str((base / values[key]).resolve())
    if kind == "maildir":
        return MaildirDelivery(**values) if ok else None
    options = UpstreamDelivery(**values)
    if not options.endpoint:
        problem("delivery.endpoint", f'is required for type "{kind}"')
        ok = False
    elif not _ENDPOINT.match(options.endpoint):
        problem("delivery.endpoint", 'must be "tcp:HOST:PORT" or "unix:/PATH"')
        ok = False
    else:
        match = _ENDPOINT.match(options.endpoint)
        assert match is not None
        if match.group("port") and not 0 < int(match.group("port")) < 65536:
            problem("delivery.endpoint", "port must be 1-65535")
            ok = False
        if (options.tls or options.starttls) and match.group("path"):
            problem("delivery.tls" if options.tls else "delivery.starttls",
                    "TLS to a UNIX socket is not supported")
            ok = False
    if options.helo is not None:
        for found in hostname_problem("helo", options.helo):  # it is sent as EHLO's argument
            problem("delivery.helo", found.message)
            ok = False
    if options.tls and options.starttls:
        problem("delivery.starttls", "tls (implicit) and starttls exclude each other")
        ok = False
    for found in ca_file_problem("ca_file", options.ca_file):  # PEM: as the backends check it
        problem("delivery.ca_file", found.message)
        ok = False
    for key in ("timeout", "final_timeout"):
        value = getattr(options, key)
        if not finite_number(value):
            problem(f"delivery.{key}", f"must be a finite number, not {value}")
            ok = False
        elif value <= 0:
            problem(f"delivery.{key}", "must be positive")
            ok = False
    if options.pool_size < 0:
        problem("delivery.pool_size", "must not be negative (0: no idle connections kept)")
        ok = False
    if options.reuse_limit < 1:
        problem("delivery.reuse_limit", "must be at least 1 (1: a new connection for every"
                                        " message)")
        ok = False
    if options.trace_header and not _HEADER_NAME.match(options.trace_header):
        problem("delivery.trace_header", "is not a header field name")
        ok = False
    return options if ok else None
