"""Secrets kept out of text meant for people: log lines, tracebacks, ``--check`` output.

Two tools:

* ``url_for_humans(url)``: a URL as a message may show it, with the password of a
  ``scheme://user:password@host`` part and the values of its query replaced by ``***``
  (the user name stays: it says which account).  Used for every URL a configuration
  problem or a log line repeats (Redis stores, LDAP servers, HTTP APIs, key sets).
* ``scrubbed_failure(failure, secrets)``: the same failure with every form of the
  ``secrets`` (the text, its ``repr``, its base64) replaced by ``<redacted>`` in the
  exception's message, for the tracebacks of code we do not write (an AUTH script
  raising ``ValueError: invalid literal for int() with base 10: 'the password'``, a
  third-party checker).  The frames stay: the traceback still says where it went wrong.

No Twisted at import time: the configuration check uses ``url_for_humans``.
"""

from __future__ import annotations

import base64
import re
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from twisted.python.failure import Failure

__all__ = ["MASK", "REDACTED", "scrub", "scrubbed_failure", "secret_forms", "url_for_humans"]

MASK = "***"
REDACTED = "<redacted>"

_QUERY_VALUE = re.compile(r"([?&][^=&#]*=)[^&#]*")


def url_for_humans(url: str) -> str:
    """``url`` with its userinfo password (or a userinfo without ``:``, which may be a
    token) and its query values masked; anything else as written.

    The userinfo ends at the last ``@`` before the query: a password holding an
    unescaped ``/`` or ``@`` (which a URL parser would misread) is still masked."""
    start = url.find("//")
    if start < 0:
        return _QUERY_VALUE.sub(r"\1" + MASK, url)
    start += 2
    end = min([i for i in (url.find("?", start), url.find("#", start)) if i >= 0],
              default=len(url))
    at = url.rfind("@", start, end)
    if at >= 0:
        user, colon, _ = url[start:at].partition(":")
        shown = f"{user}:{MASK}" if colon else MASK
        url = url[:start] + shown + url[at:]
        end += len(shown) - (at - start)
    return url[:end] + _QUERY_VALUE.sub(r"\1" + MASK, url[end:])


def secret_forms(secret: str | bytes) -> list[str]:
    """The ways ``secret`` shows up in a message, longest first: its text (UTF-8, or
    Latin-1 for other bytes), the inside of its ``str`` and ``bytes`` ``repr`` (what
    ``int('...')`` or ``f"{x!r}"`` print), and its base64 (standard and URL-safe, with
    and without padding)."""
    if isinstance(secret, str):
        text, raw = secret, secret.encode("utf-8", "surrogatepass")
    else:
        raw = bytes(secret)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    forms = {text, repr(text)[1:-1], repr(raw)[2:-1]}
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        forms.update((encoded.decode("ascii"), encoded.rstrip(b"=").decode("ascii")))
    return sorted((f for f in forms if f), key=len, reverse=True)


def scrub(text: str, secrets: Iterable[str | bytes | None]) -> str:
    """``text`` with every form (``secret_forms``) of each non-empty secret replaced by
    ``<redacted>``."""
    forms = sorted({f for s in secrets if s for f in secret_forms(s)}, key=len, reverse=True)
    for form in forms:
        text = text.replace(form, REDACTED)
    return text


class RedactedError(Exception):
    """Stands in for an exception whose message held a secret: ``str()`` is the
    scrubbed message; the failure keeps the original type and frames."""


def scrubbed_failure(failure: "Failure", secrets: Iterable[str | bytes | None]) -> "Failure":
    """``failure`` itself when its message holds none of ``secrets``; otherwise a failure
    of the same type and traceback whose message has them replaced by ``<redacted>``
    (``failure.check(TheType)`` still answers as before)."""
    from twisted.python import reflect
    from twisted.python.failure import Failure

    message = reflect.safe_str(failure.value)
    clean = scrub(message, list(secrets))
    if clean == message:
        return failure
    return Failure(RedactedError(clean), failure.type, failure.getTracebackObject())
