"""``redis://[user:password@]host[:port][/db]``, ``rediss://...[?ca_file=PEM]`` and
``unix:///path[?db=N]`` -> ``RedisURL``.  No Twisted here (the config check uses it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

from saslsmtp.options import pem_problem
from saslsmtp.redact import url_for_humans


@dataclass(frozen=True)
class RedisURL:
    """Where the Redis server is; ``password`` is a secret and stays out of ``repr``."""

    host: str | None = None
    port: int = 6379
    path: str | None = None  # a UNIX socket instead of host/port
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None  # rediss://: trust this CA instead of the system's

    def describe(self) -> str:
        """For logs: no credentials."""
        if self.path:
            return f"unix://{self.path} db {self.db}"
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisURL:
    """Parse a Redis URL; ``ValueError`` with a readable message when it is not one (the
    URL it repeats has its password masked: the message goes to ``--check`` and the log)."""
    shown = url_for_humans(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"{shown!r}: unix:// needs a socket path (unix:///run/redis.sock)")
        db = parse_qs(parts.query).get("db", ["0"])[0]
        if not db.isdigit():
            raise ValueError(f"{shown!r}: db must be a number")
        return RedisURL(path=parts.path, db=int(db))
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"{shown!r}: the scheme must be redis, rediss or unix")
    if not parts.hostname:
        raise ValueError(f"{shown!r}: no host")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"{shown!r}: the port is not a number from 1 to 65535") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"{shown!r}: the path must be a database number (/0)")
    query = parse_qs(parts.query)
    unknown = set(query) - {"ca_file"}
    if unknown or (query and scheme != "rediss"):
        raise ValueError(f"{shown!r}: the only query parameter is ca_file, for rediss://")
    return RedisURL(host=parts.hostname, port=port, db=int(path or 0), tls=scheme == "rediss",
                    username=unquote(parts.username) if parts.username else None,
                    password=unquote(parts.password) if parts.password else None,
                    ca_file=query.get("ca_file", [None])[0])


def checked_store_url(url: str, base: Path | None = None) -> str:
    """``url`` as the store will use it: parsed, and a ``rediss://`` ``ca_file`` made
    absolute against ``base`` (the configuration file's folder, like every other path)
    and loaded once, so a missing or non-PEM file is a configuration problem, not a
    traceback when the store connects.  ``ValueError`` with a readable message."""
    parsed = parse_redis_url(url)
    if parsed.ca_file is None:
        return url
    ca_file = str((base / parsed.ca_file).resolve()) if base is not None else parsed.ca_file
    why = pem_problem(ca_file)
    if why is not None:
        raise ValueError(f"ca_file {ca_file}: {why}")
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=urlencode({"ca_file": ca_file})))
