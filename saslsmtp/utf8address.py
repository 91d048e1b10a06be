"""UTF-8 mail addresses (RFC 6531 3.3): the path of a MAIL or RCPT in an SMTPUTF8
transaction (how a domain compares, U-labels or A-labels: ``saslsmtp.domains``).

An all-ASCII path goes to Twisted's parser as it always did (``parsed_address`` keeps
the ones seen lately).  A path with 8-bit octets must be valid UTF-8 (else ``AddressError``:
501), must come in a transaction whose MAIL carried ``SMTPUTF8`` (else
``SMTPUTF8Undeclared``: 553 5.6.7, RFC 6531 3.4), and must be a mailbox of RFC 6531's
grammar: a dot-atom or quoted local part whose characters may be non-ASCII, ``@``, and a
domain of labels (letters, digits, hyphens or non-ASCII characters) or an address
literal.  Control, format and space characters (Unicode categories C and Z) never are.
No source route, and no ``postmaster`` without a domain, with 8-bit octets.
"""

from __future__ import annotations

import functools
import re
import unicodedata

from twisted.mail import smtp

_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   "!#$%&'*+-/=?^_`{|}~")
_LABEL_ASCII = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e]|[^\x00-\x7f])*"$')
_LITERAL = re.compile(r"^\[[\x21-\x5a\x5e-\x7e]+\]$")


class SMTPUTF8Undeclared(Exception):
    """A valid UTF-8 address in a transaction that did not say ``SMTPUTF8`` on MAIL."""


class UTF8Address(smtp.Address):
    """An ``smtp.Address`` whose ``local``/``domain`` are UTF-8 bytes; ``str()`` is the
    text (Twisted's decodes ASCII only)."""

    def __init__(self, local: str, domain: str) -> None:  # no tokenizer: parsed here
        self.addrstr = f"{local}@{domain}".encode("utf-8")
        self.local = local.encode("utf-8")
        self.domain = domain.encode("utf-8")

    def __str__(self) -> str:
        return self.__bytes__().decode("utf-8")


def _wide(c: str) -> bool:
    """A non-ASCII character an address may carry (not a control, format or space)."""
    return c > "\x7f" and unicodedata.category(c)[0] not in "CZ"


def _local_ok(local: str) -> bool:
    if local.startswith('"'):
        return bool(_QUOTED.match(local)) and all(c < "\x80" or _wide(c) for c in local)
    atoms = local.split(".")
    return all(atoms) and all(c in _ATEXT or _wide(c) for c in local if c != ".")


def _domain_ok(domain: str) -> bool:
    if domain.startswith("["):
        return bool(_LITERAL.match(domain))
    labels = domain.split(".")
    return all(label and label[0] != "-" and label[-1] != "-" and
               all(c in _LABEL_ASCII or _wide(c) for c in label) for label in labels)


def parsed_path(raw: bytes, smtputf8: bool) -> smtp.Address:
    """The address of ``<raw>`` (without the brackets); raises ``AddressError`` for a
    bad one and ``SMTPUTF8Undeclared`` for a good UTF-8 one without ``smtputf8``."""
    if raw.isascii():
        return parsed_address(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise smtp.AddressError("not UTF-8") from None
    if not smtputf8:
        raise SMTPUTF8Undeclared(text)
    local, at, domain = text.rpartition("@")
    if not at or not _local_ok(local) or not _domain_ok(domain):
        raise smtp.AddressError("not an RFC 6531 mailbox")
    return UTF8Address(local, domain)


@functools.lru_cache(maxsize=1024)
def parsed_address(address: bytes) -> smtp.Address:
    """``smtp.Address(address)``, kept for the addresses seen lately: a submission server
    sees the same senders and recipients again and again, and Twisted's tokenizer costs
    more than the rest of MAIL or RCPT.  A refused address raises ``AddressError`` each
    time (exceptions are not cached); the ``Address`` is shared, and nothing changes it."""
    return smtp.Address(address)
