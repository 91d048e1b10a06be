"""Typed option sets that validate themselves, from TOML or from keyword arguments.

An option set is a frozen dataclass deriving from ``Options``.  Building one, whether
``LdapOptions(url="ldap://x", user_dn=...)`` in Python or ``LdapOptions.from_table(table)``
from a TOML table, checks every field against its type hint (normalising the harmless
differences: one string for an array of strings, an integer for a number) and then the
class's own rules (``check()``).  Anything wrong raises ``OptionsError``, which lists
every ``OptionProblem`` with the key it is about; the configuration file reader turns
each into ``file:line: section.key: message``.  So the rules live in one place, beside the
code that uses the options, and mean the same from every entry point.

No Twisted here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, TypeVar
from urllib.parse import urlsplit

#: Field metadata: a path, resolved relative to the configuration file's folder.
PATH = {"path": True}

O = TypeVar("O", bound="Options")


@dataclass(frozen=True)
class OptionProblem:
    """One thing wrong with one option (``key`` empty: the option set as a whole)."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class OptionsError(ValueError):
    """The options are unusable; ``problems`` names each key and what is wrong with it."""

    def __init__(self, problems: Iterable[OptionProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))

    @property
    def key(self) -> str:
        """The key of the first problem (``""``: the option set as a whole)."""
        return self.problems[0].key if self.problems else ""


class Options:
    """Base for frozen option dataclasses: type checks in ``__post_init__``, then ``check()``.

    A subclass is ``@dataclass(frozen=True)`` with typed fields and defaults, and yields
    ``OptionProblem``s from ``check()`` for the rules a type cannot say (required keys,
    exclusive choices, URL shapes, files that must exist).
    """

    # what @dataclass gives every subclass (declared so ``dataclasses.fields`` type-checks)
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        problems: list[OptionProblem] = []
        bad: set[str] = set()
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            ok, converted, expected = coerce(value, hints[f.name])
            if ok:
                object.__setattr__(self, f.name, converted)
                continue
            problems.append(OptionProblem(f.name, f"must be {expected}, not {type_words(value)}"))
            bad.add(f.name)
            # check the rest against the default, so one mistake is reported once
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            object.__setattr__(self, f.name, coerce(default, hints[f.name])[1])
        problems += [p for p in self.check() if p.key not in bad]
        if problems:
            raise OptionsError(problems)

    def check(self) -> Iterable[OptionProblem]:
        """The rules beyond types; nothing by default."""
        return ()

    @classmethod
    def from_table(cls: type[O], table: Mapping[str, Any], base: Path | None = None,
                   skip: Iterable[str] = ()) -> O:
        """Build from a TOML table: unknown keys are problems too; paths (``PATH``
        metadata) are resolved relative to ``base``.  Raises ``OptionsError``."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        skipped = set(skip)
        problems: list[OptionProblem] = []
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key in skipped:
                continue
            if key not in known:
                problems.append(OptionProblem(  # (skipped keys are read elsewhere: known)
                    key, f"unknown key (known: {', '.join(sorted({*known, *skipped}))})"))
                continue
            if known[key].metadata.get("path") and base is not None and isinstance(value, str) \
                    and value and not value.startswith(("tcp:", "unix:")):
                value = str((base / value).resolve())
            values[key] = value
        try:
            options = cls(**values)
        except OptionsError as e:
            problems += e.problems
        if problems:
            raise OptionsError(problems)
        return options


def type_words(value: Any) -> str:
    """``"a string"``, ``"an integer"``...: a value's TOML type, for messages."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # TOML's nan and inf
    if isinstance(value, int) and not isinstance(value, bool) and not finite_number(value):
        return "an integer beyond any float"
    if isinstance(value, (list, tuple)) and value:
        return f"an array of {_plural(value[0])}"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", tuple: "an array", dict: "a table",
            types.NoneType: "nothing"}.get(type(value), type(value).__name__)


def _plural(item: Any) -> str:
    """``"integers"``, ``"strings"``...: what an array holds, by its first item."""
    return {bool: "booleans", int: "integers", float: "numbers", str: "strings", list: "arrays",
            tuple: "arrays", dict: "tables"}.get(type(item), type(item).__name__)


def finite_number(value: Any) -> bool:
    """An integer or a finite float (TOML also has ``nan`` and ``inf``, and no timeout,
    delay or size makes sense as either: ``nan`` compares false with everything)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float (TOML has no bound on digits)
        return False


def coerce(value: Any, hint: Any) -> tuple[bool, Any, str]:
    """Check ``value`` against a type hint; return (ok, normalised value, expected words)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None, ""
        inner = [a for a in args if a is not type(None)]
        for candidate in inner:
            ok, converted, _ = coerce(value, candidate)
            if ok:
                return True, converted, ""
        return False, None, " or ".join(coerce(None, a)[2] for a in inner)
    if hint is bool:
        return isinstance(value, bool), value, "a boolean"
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if hint is float:
        ok = finite_number(value)
        nan_or_inf = isinstance(value, (int, float)) and not isinstance(value, bool) and not ok
        return ok, float(value) if ok else None, "a finite number" if nan_or_inf else "a number"
    if hint is str:
        return isinstance(value, str), value, "a string"
    if origin is tuple:
        # tuple[str, ...]: an array of strings; a single string is accepted as one item
        if isinstance(value, str):
            return True, (value,), "an array of strings"
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        return ok, tuple(value) if ok else None, "an array of strings"
    if hint is Mapping or origin in (dict, Mapping) or (
            origin is not None and getattr(origin, "__name__", "") == "Mapping"):
        ok = isinstance(value, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        return ok, types.MappingProxyType(dict(value)) if ok else None, "a table of strings"
    return False, None, str(hint)


#: What the greeting, EHLO and a Received header can carry: a domain (RFC 5321 allows only
#: ASCII on the wire without SMTPUTF8) or an address literal such as ``[192.0.2.1]``; never
#: CR, LF or a space, since the name is sent as part of a command line.
HOSTNAME = re.compile(r"\A(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                      r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?"
                      r"|\[[0-9A-Fa-f.:]+\]|\[IPv6:[0-9A-Fa-f.:]+\])\Z")


def hostname_problem(key: str, name: str | None) -> list[OptionProblem]:
    """A problem when ``name`` is set and not a domain name or address literal."""
    return problem_if(name is not None and not HOSTNAME.match(name), key,
                      f"{name!r} is not a domain name or address literal (ASCII letters,"
                      " digits, '-', '_' and '.'; write IDN names in punycode)")


def problem_if(condition: bool, key: str, message: str) -> list[OptionProblem]:
    """``[OptionProblem(key, message)]`` when ``condition``, else ``[]`` (for ``check()``)."""
    return [OptionProblem(key, message)] if condition else []


def file_problem(key: str, path: str | None) -> list[OptionProblem]:
    """A problem when ``path`` is set and names no file."""
    return problem_if(bool(path) and not Path(path or "").is_file(), key, f"no such file: {path}")


def pem_problem(path: str) -> str | None:
    """Why the file ``path`` is no usable CA file (``"no such file"``, ``"cannot read:
    ..."``, ``"holds no PEM certificate"``), or ``None``: a check at load, where using
    it later (at start, or at the first connection) would fail with a traceback."""
    from cryptography import x509
    if Path(path).is_dir():
        return "is a folder, not a file"
    if not Path(path).is_file():
        return "no such file"
    try:
        x509.load_pem_x509_certificates(Path(path).read_bytes())
    except OSError as e:
        return f"cannot read: {e.strerror}"
    except ValueError:
        return "holds no PEM certificate"
    return None


def ca_file_problem(key: str, path: str | None) -> list[OptionProblem]:
    """A problem when ``path`` is set and is not a readable file of PEM certificates."""
    why = pem_problem(path) if path else None
    if why is None:
        return []
    return [OptionProblem(key, f"no such file: {path}" if why == "no such file" else f"{path}: {why}")]


def http_url_problem(key: str, url: str | None) -> list[OptionProblem]:
    """A problem when ``url`` is set and not ``http://`` or ``https://``."""
    return problem_if(bool(url) and not (url or "").startswith(("http://", "https://")), key,
                      "must be an http:// or https:// URL")


def url_port_problem(key: str, url: str | None) -> list[OptionProblem]:
    """A problem when ``url`` is set and names a port no connection can use (beyond
    65535, or 0), or one that is no number: every request would fail instead.  The URL
    is repeated with its password masked."""
    from saslsmtp.redact import url_for_humans
    if not url:
        return []
    try:
        port = urlsplit(url).port
    except ValueError as e:  # "Port out of range 0-65535", "Invalid IPv6 URL"
        return [OptionProblem(key, f"{url_for_humans(url)!r} is not a usable URL: {e}")]
    return problem_if(port == 0, key, f"{url_for_humans(url)!r} is not a usable URL: port 0")


#: Twisted endpoint kinds whose strings carry a TCP port.
_PORTED = ("tcp", "tcp6", "ssl", "tls")


def split_endpoint(description: str) -> list[str]:
    """Split a Twisted endpoint string on ``:`` not escaped by ``\\`` (its quoting)."""
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def endpoint_port_problem(description: str, *, client: bool) -> str | None:
    """Why the port in the endpoint string ``description`` (``tcp:``, ``tcp6:``, ``ssl:``,
    ``tls:``; ``haproxy:`` in front is skipped) is no TCP port, or ``None``.  Twisted
    parses ``tcp:99999`` happily and fails only when it binds or connects (a traceback
    at start, or every login failing later).  A listener may ask for port 0 (any free
    port); a client must name a real one.  A port that is not a number is Twisted's
    own parse error, reported where the string is parsed."""
    parts = split_endpoint(description.removeprefix("haproxy:"))
    if parts[0] not in _PORTED:
        return None
    keywords = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    positional = [p for p in parts[1:] if "=" not in p]
    where = 1 if client else 0  # a client's first positional argument is the host
    port = keywords.get("port", positional[where] if len(positional) > where else None)
    if port is None or not port.strip().lstrip("+-").isdigit():
        return None
    lowest = 1 if client else 0
    if not lowest <= int(port) <= 65535:
        return f"port {port.strip()} is out of range ({lowest} to 65535)"
    return None
