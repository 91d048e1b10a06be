"""Credentials arrive as ``str`` or ``bytes`` (Twisted's ``IUsernamePassword`` allows both):
one conversion each way, UTF-8, so every backend agrees on what a name or password is."""

from __future__ import annotations


def as_bytes(value: str | bytes | bytearray | memoryview) -> bytes:
    """``value`` as bytes; text is encoded as UTF-8."""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def as_text(value: str | bytes | bytearray | memoryview) -> str:
    """``value`` as text; bytes must be UTF-8 (``UnicodeDecodeError`` otherwise)."""
    return value if isinstance(value, str) else bytes(value).decode("utf-8")
