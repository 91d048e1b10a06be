"""Edges of LOGIN and of the libcrypt binding that the main suites do not reach."""

from __future__ import annotations

import ctypes
from typing import Any, Iterator

import pytest

from saslsmtp import libcrypt
from saslsmtp.sasl.login import MALFORMED, PASSWORD_PROMPT, Login
from saslsmtp.sasl.outcome import MechanismStateError, Reply, Verify

# -- LOGIN ------------------------------------------------------------------------------


def test_login_started_twice_is_a_state_error() -> None:
    """``start`` is called once per exchange; a second call is the caller's bug."""
    mech = Login()
    assert mech.start(b"alice") == Reply(PASSWORD_PROMPT)
    with pytest.raises(MechanismStateError):
        mech.start(b"alice")


@pytest.mark.parametrize("username", [b"\xff\xfe", b"", b"a\0b"])
def test_login_username_that_is_not_a_name_is_malformed(username: bytes) -> None:
    """Not UTF-8, empty or with a NUL: 535 Malformed, and the exchange is over."""
    mech = Login()
    mech.start(None)
    assert mech.receive(username) == MALFORMED
    with pytest.raises(MechanismStateError):
        mech.receive(b"password")


def test_login_password_that_is_not_utf8_is_malformed() -> None:
    """The password must be UTF-8 text (it is compared as text by the backends)."""
    mech = Login()
    mech.start(b"alice")
    assert mech.receive(b"\xc3\x28") == MALFORMED


def test_login_with_an_initial_username() -> None:
    """smtplib sends the username as the initial response; only the password is asked."""
    mech = Login()
    assert mech.start(b"alice") == Reply(PASSWORD_PROMPT)
    assert mech.receive("pässword".encode()) == Verify("alice", "pässword")


# -- libcrypt: the crypt_r fallback ------------------------------------------------------

class WithoutCryptRn:
    """The real libcrypt with ``crypt_rn`` hidden, as on a glibc-only libcrypt."""

    def __init__(self, lib: Any) -> None:
        self.crypt_r = lib.crypt_r


@pytest.fixture
def crypt_r_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real_cdll = ctypes.CDLL
    monkeypatch.setattr(libcrypt.ctypes, "CDLL", lambda name: WithoutCryptRn(real_cdll(name)))
    libcrypt._load.cache_clear()
    yield
    libcrypt._load.cache_clear()


SETTING = b"$6$rounds=5000$saltsalt$"


def test_crypt_r_fallback_hashes_like_crypt_rn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``crypt_rn`` the same SHA512-CRYPT hash comes out of ``crypt_r``."""
    libcrypt._load.cache_clear()
    expected = libcrypt.crypt(b"password", SETTING)
    assert expected is not None and expected.startswith(SETTING)
    real_cdll = ctypes.CDLL
    monkeypatch.setattr(libcrypt.ctypes, "CDLL", lambda name: WithoutCryptRn(real_cdll(name)))
    libcrypt._load.cache_clear()
    try:
        assert libcrypt.crypt(b"password", SETTING) == expected
        assert libcrypt.crypt(b"password", expected) == expected  # the stored hash as setting
    finally:
        libcrypt._load.cache_clear()


def test_crypt_r_failure_token_is_none(crypt_r_only: None) -> None:
    """glibc's ``crypt_r`` answers ``*0`` for a setting it refuses: that is ``None``."""
    assert libcrypt.crypt(b"password", b"$99$nonsense") is None


def test_library_without_either_function_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A libcrypt with neither ``crypt_rn`` nor ``crypt_r`` is reported at startup."""
    monkeypatch.setattr(libcrypt.ctypes, "CDLL", lambda name: object())
    libcrypt._load.cache_clear()
    try:
        with pytest.raises(libcrypt.LibcryptMissing, match="neither crypt_rn nor crypt_r"):
            libcrypt.require()
    finally:
        libcrypt._load.cache_clear()
