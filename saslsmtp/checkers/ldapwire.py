"""The few LDAPv3 messages a login needs, as BER bytes (RFC 4511), and the answers decoded.

Requests are encoded here, by hand: ``BindRequest`` (simple), ``SearchRequest`` (a filter
from ``compile_filter``), ``ExtendedRequest`` (StartTLS) and ``UnbindRequest``; each is a
handful of definite-length TLVs, built with ``bytes`` concatenation.  The five kinds of
answer a login gets (BindResponse, SearchResultEntry/Reference/Done, ExtendedResponse) are
read by ``decode``, a small reader of definite-length BER.

Why not a library: measured per simple bind (request encoded, response decoded) on this
machine with benchmarks/ldap_ber_cpu.py: 3.5 us here, 29 us with ldaptor's
``pureldap``/``pureber``, 86 us with ldap3's pyasn1 encoder; the search request 3.3 us
against 27 us with ldaptor.  The 1.2x-Dovecot target leaves well under 100 us of CPU per
login for the whole LDAP client (socket calls and Deferreds included), and every request
and answer here is fixed by RFC 4511, so a page of encoder is the cheaper dependency.
(ldap3's own fast reader, ``decode_message_fast``, takes 4 us for a BindResponse before
any conversion; this one 2.4 us.)

Filters (``search_filter``, ``require_filter``) are parsed once, at startup, by
``compile_filter`` (RFC 4515: ``& | !``, equality, ``~= >= <=``, presence, substrings,
extensible match); ``{username}`` may stand in assertion values only and is replaced per
login by the username's UTF-8 bytes (exactly what the RFC 4515 escaping of it denotes).
"""

from __future__ import annotations

from dataclasses import dataclass

from ldap3.core.results import RESULT_CODES

PLACEHOLDER = "{username}"
START_TLS_OID = b"1.3.6.1.4.1.1466.20037"
NOTICE_OF_DISCONNECTION_OID = b"1.3.6.1.4.1.1466.20036"
SCOPE_BASE = 0
SCOPE_SUBTREE = 2
NO_ATTRIBUTES = "1.1"

# protocolOp tags of the answers (APPLICATION n)
BIND_RESPONSE = 1
SEARCH_ENTRY = 4
SEARCH_DONE = 5
SEARCH_REFERENCE = 19
EXTENDED_RESPONSE = 24


class FilterError(ValueError):
    """A filter string that is not RFC 4515 (the message says where)."""


class ProtocolError(Exception):
    """The server sent something that is not an LDAP message we can read."""


# ---- encoding ---------------------------------------------------------------


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, value: bytes) -> bytes:
    """One definite-length BER element."""
    n = len(value)
    if n < 0x80:
        return bytes((tag, n)) + value
    return bytes((tag,)) + _length(n) + value


def integer(n: int) -> bytes:
    """A non-negative INTEGER (message IDs, limits)."""
    return tlv(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def message(message_id: int, op: bytes) -> bytes:
    """An ``LDAPMessage`` without controls."""
    return tlv(0x30, integer(message_id) + op)


def bind_request(dn: bytes, password: bytes) -> bytes:
    """``[APPLICATION 0]`` version 3, ``name``, ``simple [0]`` password."""
    return tlv(0x60, b"\x02\x01\x03" + tlv(0x04, dn) + tlv(0x80, password))


UNBIND_REQUEST = b"\x42\x00"
START_TLS_REQUEST = tlv(0x77, tlv(0x80, START_TLS_OID))


@dataclass(frozen=True)
class SearchShape:
    """The constant bytes of a SearchRequest around its base DN and filter: ``scope``,
    derefAliases never, ``size_limit``, no time limit (``timeout`` bounds it on our side),
    typesOnly false, ``attributes``."""

    middle: bytes
    tail: bytes

    @classmethod
    def of(cls, scope: int, size_limit: int, attributes: tuple[str, ...]) -> "SearchShape":
        middle = (bytes((0x0A, 1, scope)) + b"\x0a\x01\x00" + integer(size_limit) + integer(0)
                  + b"\x01\x01\x00")
        tail = tlv(0x30, b"".join(tlv(0x04, a.encode("utf-8")) for a in attributes))
        return cls(middle, tail)

    def request(self, base: bytes, filter_bytes: bytes) -> bytes:
        """``[APPLICATION 3]`` for ``base`` and an encoded filter."""
        return tlv(0x63, tlv(0x04, base) + self.middle + filter_bytes + self.tail)


def message_end(data: bytes | bytearray, start: int = 0) -> int:
    """The index just after the BER element starting at ``start``; -1 if incomplete."""
    if len(data) < start + 2:
        return -1
    first = data[start + 1]
    if first < 0x80:
        end = start + 2 + first
    else:
        count = first & 0x7F
        if count > 4:
            raise ProtocolError(f"BER length of {count} octets")
        if len(data) < start + 2 + count:
            return -1
        end = start + 2 + count + int.from_bytes(data[start + 2:start + 2 + count], "big")
    return end if end <= len(data) else -1


# ---- filters (RFC 4515) --------------------------------------------------------------


@dataclass(frozen=True)
class _Leaf:
    """A primitive element; ``pieces`` joined by the username is its value (one piece:
    constant).  ``tag`` -1: ``pieces[0]`` is already encoded."""

    tag: int
    pieces: tuple[bytes, ...]


@dataclass(frozen=True)
class _Node:
    """A constructed element (``&``, ``|``, ``!``, an assertion) and its children."""

    tag: int
    children: tuple["_Leaf | _Node", ...]


def _raw(encoded: bytes) -> _Leaf:
    return _Leaf(-1, (encoded,))


@dataclass(frozen=True)
class CompiledFilter:
    """A parsed filter; ``encode(username_bytes)`` is its BER with the username put in."""

    root: "_Leaf | _Node"
    constant: bytes | None  # the encoding when the filter has no placeholder

    def encode(self, username: bytes = b"") -> bytes:
        if self.constant is not None:
            return self.constant
        return _encode(self.root, username)


def _encode(part: "_Leaf | _Node", username: bytes) -> bytes:
    if type(part) is _Leaf:
        if part.tag < 0:
            return part.pieces[0]
        return tlv(part.tag, username.join(part.pieces))
    assert isinstance(part, _Node)
    return tlv(part.tag, b"".join([_encode(c, username) for c in part.children]))


def _templated(part: "_Leaf | _Node") -> bool:
    if isinstance(part, _Leaf):
        return len(part.pieces) > 1
    return any(_templated(c) for c in part.children)


def compile_filter(text: str, placeholder: bool = False) -> CompiledFilter:
    """Parse ``text`` (RFC 4515); with ``placeholder``, ``{username}`` may stand in values
    (``FilterError`` if it stands anywhere else)."""
    if "\x00" in text:
        raise FilterError("NUL in filter")
    parser = _Parser(text.replace(PLACEHOLDER, "\x00") if placeholder else text)
    root = parser.filter()
    if parser.pos != len(parser.text):
        raise FilterError(f"unexpected {parser.text[parser.pos:]!r} after the filter")
    return CompiledFilter(root, None if _templated(root) else _encode(root, b""))


class _Parser:
    """Recursive descent over one filter string; ``\x00`` marks the username."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def _expect(self, ch: str) -> None:
        if self.text[self.pos:self.pos + 1] != ch:
            raise FilterError(f"expected {ch!r} at position {self.pos}")
        self.pos += 1

    def filter(self) -> "_Leaf | _Node":
        self._expect("(")
        ch = self.text[self.pos:self.pos + 1]
        node: _Leaf | _Node
        if ch in ("&", "|"):
            self.pos += 1
            children = []
            while self.text[self.pos:self.pos + 1] == "(":
                children.append(self.filter())
            if not children:
                raise FilterError(f"empty {ch} at position {self.pos}")
            node = _Node(0xA0 if ch == "&" else 0xA1, tuple(children))
        elif ch == "!":
            self.pos += 1
            node = _Node(0xA2, (self.filter(),))
        else:
            node = self._item()
        self._expect(")")
        return node

    def _item(self) -> "_Leaf | _Node":
        end = self.text.find(")", self.pos)
        if end < 0:
            raise FilterError("missing ')'")
        item = self.text[self.pos:end]
        self.pos = end
        if "(" in item:
            raise FilterError(f"unescaped '(' in {item!r}")
        eq = item.find("=")
        if eq < 0:
            raise FilterError(f"not an attribute assertion: {item!r}")
        left, value = item[:eq], item[eq + 1:]
        if left.endswith(":"):
            return self._extensible(left[:-1], value)
        kind = {"~": 0xA8, ">": 0xA5, "<": 0xA6}.get(left[-1:])
        attribute = left[:-1] if kind else left
        description = _raw(tlv(0x04, _attribute(attribute)))
        if kind:
            return _Node(kind, (description, _Leaf(0x04, _value(value))))
        if value == "*":
            return _Leaf(0x87, (_attribute(attribute),))
        if "*" in value:
            pieces = value.split("*")
            subs: list[_Leaf | _Node] = []
            if pieces[0]:
                subs.append(_Leaf(0x80, _value(pieces[0])))
            for middle in pieces[1:-1]:
                if not middle:
                    raise FilterError(f"empty substring in {item!r}")
                subs.append(_Leaf(0x81, _value(middle)))
            if pieces[-1]:
                subs.append(_Leaf(0x82, _value(pieces[-1])))
            return _Node(0xA4, (description, _Node(0x30, tuple(subs))))
        return _Node(0xA3, (description, _Leaf(0x04, _value(value))))

    def _extensible(self, left: str, value: str) -> _Node:
        attribute, *rest = left.split(":")
        dn = any(p.lower() == "dn" for p in rest)
        rules = [p for p in rest if p.lower() != "dn"]
        if len(rules) > 1 or (not attribute and not rules):
            raise FilterError(f"bad extensible match {left!r}")
        children: list[_Leaf | _Node] = []
        if rules:
            children.append(_Leaf(0x81, (_attribute(rules[0]),)))
        if attribute:
            children.append(_Leaf(0x82, (_attribute(attribute),)))
        children.append(_Leaf(0x83, _value(value)))
        if dn:
            children.append(_raw(b"\x84\x01\xff"))
        return _Node(0xA9, tuple(children))


def _attribute(text: str) -> bytes:
    """An attribute description (or an OID): letters, digits, ``-.;``."""
    if "\x00" in text:
        raise FilterError("{username} may only stand in an assertion value")
    if not text or not all(c.isascii() and (c.isalnum() or c in "-.;") for c in text):
        raise FilterError(f"bad attribute description {text!r}")
    return text.encode("ascii")


def _value(text: str) -> tuple[bytes, ...]:
    """An assertion value, split at the username: ``\\XX`` escapes undone, the rest UTF-8."""
    return tuple(_unescape(piece) for piece in text.split("\x00"))


def _unescape(text: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\\" not in raw:
        return raw
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C:
            pair = raw[i + 1:i + 3]
            if len(pair) != 2 or not all(c in b"0123456789abcdefABCDEF" for c in pair):
                raise FilterError(f"bad escape in value {text!r}")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


# ---- decoding ---------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """An ``LDAPResult``: ``code`` (0 success, 49 invalidCredentials, ...) and the texts."""

    code: int
    matched_dn: str = ""
    message: str = ""
    oid: bytes | None = None  # an ExtendedResponse's responseName

    @property
    def description(self) -> str:
        """The result's RFC 4511 name (``invalidCredentials``), as ldap3 reports it."""
        return str(RESULT_CODES.get(self.code, f"result {self.code}"))


@dataclass(frozen=True)
class Entry:
    """A ``SearchResultEntry``: its DN and ``{attribute type: [values]}`` as sent."""

    dn: str
    attributes: dict[str, list[bytes]]


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _element(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """``(tag, value start, value end)`` of the element at ``pos`` (within ``end``)."""
    tag = data[pos]
    first = data[pos + 1]
    if first < 0x80:
        start, size = pos + 2, first
    elif 0x80 < first <= 0x84:  # LDAP uses definite lengths only (RFC 4511 5.1)
        start = pos + 2 + (first & 0x7F)
        size = int.from_bytes(data[pos + 2:start], "big")
    else:
        raise ProtocolError("indefinite or over-long BER length")
    if start + size > end:
        raise ProtocolError("BER element overruns its container")
    return tag, start, start + size


def decode(data: bytes) -> tuple[int, int, Result | Entry | None]:
    """One complete LDAPMessage -> ``(message_id, protocolOp tag, Result | Entry | None)``
    (``None`` for a search reference, which a login ignores); ``ProtocolError`` if it is
    not an LDAP answer."""
    try:
        tag, pos, end = _element(data, 0, len(data))
        if tag != 0x30:
            raise ProtocolError("not an LDAPMessage")
        tag, start, stop = _element(data, pos, end)
        if tag != 0x02:
            raise ProtocolError("no message ID")
        message_id = int.from_bytes(data[start:stop], "big", signed=True)
        tag, pos, end = _element(data, stop, end)
        op = tag & 0x1F
        if tag == 0x64:  # SearchResultEntry
            _, start, stop = _element(data, pos, end)
            dn = _text(data[start:stop])
            attributes: dict[str, list[bytes]] = {}
            _, pos, end = _element(data, stop, end)
            while pos < end:
                _, apos, aend = _element(data, pos, end)
                _, start, stop = _element(data, apos, aend)
                values = attributes.setdefault(_text(data[start:stop]), [])
                _, vpos, vend = _element(data, stop, aend)
                while vpos < vend:
                    _, start, stop = _element(data, vpos, vend)
                    values.append(data[start:stop])
                    vpos = stop
                pos = aend
            return message_id, op, Entry(dn, attributes)
        if tag == 0x73:  # SearchResultReference
            return message_id, op, None
        if tag not in (0x61, 0x65, 0x78):
            raise ProtocolError(f"unexpected protocolOp {op}")
        _, start, stop = _element(data, pos, end)
        code = int.from_bytes(data[start:stop], "big", signed=True)
        _, start, stop = _element(data, stop, end)
        matched = _text(data[start:stop])
        _, start, pos = _element(data, stop, end)
        text = _text(data[start:pos])
        oid = None
        while pos < end:  # referral [3], serverSaslCreds [7], responseName [10], value [11]
            tag, start, pos = _element(data, pos, end)
            if tag == 0x8A:
                oid = data[start:pos]
        return message_id, op, Result(code, matched, text, oid)
    except IndexError:
        raise ProtocolError("truncated LDAP message") from None
