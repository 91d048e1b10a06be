"""The one log line per AUTH verdict that fail2ban (and people) read.

::

    auth failed: client=203.0.113.7 mechanism=PLAIN user="alice" reason="invalid credentials"
    auth succeeded: client=203.0.113.7 mechanism=PLAIN user="alice"

The format is stable (``etc/fail2ban/filter.d/saslsmtp.conf`` matches it) and safe:

* ``client`` comes first, right after the fixed words, and is a parsed IP address (the
  real client, after the PROXY protocol), so nothing a client sends can move or fake it;
* the username is a JSON string (ASCII only: quotes, backslashes, control characters,
  CR/LF and non-ASCII are escaped), so it is one token that cannot end the line, close
  its quotes early or pose as another field; it is cut to 256 characters;
* the mechanism is checked against the SASL name alphabet; the reason is our own text.

Passwords never appear.  ``log_auth_failure`` writes the line through a twisted Logger.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re

from saslsmtp.sessionlogger import Logger

log = Logger(namespace="saslsmtp.auth")

MAX_USER = 256
_MECHANISM = re.compile(r"[A-Z0-9_-]{1,20}")


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"{_OCTET}(\.{_OCTET}){{3}}")  # as str(IPv4Address) writes it


def _client(address: str) -> str:
    """``address`` as the log line carries it: a canonical IP literal or "unknown"."""
    if _IPV4.fullmatch(address):  # the common case, without an ipaddress parse
        return address
    try:
        return str(ipaddress.ip_address(address.split("%", 1)[0]))
    except ValueError:
        return "unknown"


@functools.lru_cache(maxsize=256)
def _mechanism(name: str) -> str:
    upper = name.upper()
    return upper if _MECHANISM.fullmatch(upper) else "unknown"


def _quoted(text: str) -> str:
    if len(text) > MAX_USER:
        text = text[:MAX_USER] + "..."
    return json.dumps(text, ensure_ascii=True)


def format_auth_failure(client: str, mechanism: str, username: str | None,
                        reason: str = "invalid credentials") -> str:
    """The failed-AUTH line; ``username`` is what the client tried (``None``: unknown,
    e.g. a mechanism that failed before naming anyone)."""
    return (f"auth failed: client={_client(client)} mechanism={_mechanism(mechanism)}"
            f" user={_quoted(username or '')} reason={_quoted(reason)}")


def format_auth_success(client: str, mechanism: str, username: str) -> str:
    """The successful-AUTH line (the fail2ban filter never matches it)."""
    return (f"auth succeeded: client={_client(client)} mechanism={_mechanism(mechanism)}"
            f" user={_quoted(username)}")


def log_auth_failure(client: str, mechanism: str, username: str | None,
                     reason: str = "invalid credentials", logger: Logger = log) -> None:
    logger.info("{line}", line=format_auth_failure(client, mechanism, username, reason))


def log_auth_success(client: str, mechanism: str, username: str, logger: Logger = log) -> None:
    logger.info("{line}", line=format_auth_success(client, mechanism, username))
