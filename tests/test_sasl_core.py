"""The sans-I/O core: PLAIN and LOGIN state machines and strict base64 (that nothing
under saslsmtp/sasl/ imports Twisted is tests/test_layering.py's rule)."""

from __future__ import annotations

import pytest

from saslsmtp.sasl import Accept, MechanismStateError, Reject, Reply, Verify
from saslsmtp.sasl.codec import DecodeError, decode_response
from saslsmtp.sasl.login import Login
from saslsmtp.sasl.plain import Plain


@pytest.mark.parametrize("line, initial, expected", [
    (b"=", True, b""),
    (b"", False, b""),
    (b"dGVzdA==", False, b"test"),
    (b"AHRpbQB0YW5zdGFhZnRhbnN0YWFm", True, b"\0tim\0tanstaaftanstaaf"),
])
def test_decode_ok(line: bytes, initial: bool, expected: bytes) -> None:
    assert decode_response(line, initial=initial) == expected


@pytest.mark.parametrize("line", [b"dG!VzdA==", b"=AAA", b"AAA=BBB", b"dGVzdA", b"==", b"a"])
def test_decode_strict(line: bytes) -> None:
    """RFC 4954 section 4: characters outside the alphabet and misplaced '=' are errors."""
    with pytest.raises(DecodeError):
        decode_response(line)


def test_equals_only_on_the_auth_line() -> None:
    with pytest.raises(DecodeError):
        decode_response(b"=")


def test_plain_vectors() -> None:
    assert Plain().start(b"\0tim\0tanstaaftanstaaf") == Verify("tim", "tanstaaftanstaaf", "")
    assert Plain().start(b"test\0test\x001234") == Verify("test", "1234", "test")
    assert Plain().start(b"Ursel\0Kurt\0xipj3plmq") == Reject(
        "Not authorized to requested authorization identity")


@pytest.mark.parametrize("blob", [b"", b"a\0b", b"a\0b\0c\0d", b"\0\0pw", b"\0\xff\0pw",
                                  b"\0" + b"u" * 2000 + b"\0pw"])
def test_plain_malformed(blob: bytes) -> None:
    assert Plain().start(blob) == Reject("Malformed PLAIN response")


def test_plain_order() -> None:
    p = Plain()
    assert p.start(None) == Reply(b"")
    assert p.receive(b"\0u\0p") == Verify("u", "p")
    with pytest.raises(MechanismStateError):
        p.receive(b"\0u\0p")
    with pytest.raises(MechanismStateError):
        Plain().receive(b"x")


def test_login_flow_and_order() -> None:
    m = Login()
    assert m.start(None) == Reply(b"Username:")
    assert m.receive(b"tim") == Reply(b"Password:")
    assert m.receive(b"pw") == Verify("tim", "pw")
    with pytest.raises(MechanismStateError):
        m.receive(b"more")
    m2 = Login()
    assert m2.start(b"tim") == Reply(b"Password:")
    assert Login().start(b"") == Reject("Malformed LOGIN response")
    with pytest.raises(MechanismStateError):
        Login().resume(None)


def test_verify_repr_hides_password() -> None:
    assert "secret" not in repr(Verify("u", "secret"))
    assert Accept(username="u") != Accept(username="v")
