"""The one key a mail domain compares by, whether it is written with U-labels
(``exämple.de``) or A-labels (``xn--exmple-cua.de``).  No Twisted: the sender policy
(loaded with the configuration) uses it.
"""

from __future__ import annotations

import functools

import idna  # IDNA 2008; Twisted needs it too (through hyperlink)


@functools.lru_cache(maxsize=1024)
def domain_key(domain: str) -> str:
    """The form a domain compares by: its A-labels, lower case (IDNA 2008 with the UTS
    46 mapping, so ``EXÄMPLE.de``, ``exämple.de`` and ``xn--exmple-cua.de`` are one
    domain, and ``straße.de`` is not ``strasse.de``).  A domain IDNA refuses compares
    by its lower case: it can only equal itself."""
    if domain.isascii() and "xn--" not in domain.lower():
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        return domain.lower()
