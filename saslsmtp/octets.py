"""Credentials arrive as ``str`` or ``bytes`` (Twisted's ``IUsernamePassword`` allows both):
one conversion each way, UTF-8, so every backend agrees on what a name or password is."""

from __future__ import annotations

from typing import Iterator


def as_bytes(value: str | bytes | bytearray | memoryview) -> bytes:
    """``value`` as bytes; text is encoded as UTF-8."""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def as_text(value: str | bytes | bytearray | memoryview) -> str:
    """``value`` as text; bytes must be UTF-8 (``UnicodeDecodeError`` otherwise)."""
    return value if isinstance(value, str) else bytes(value).decode("utf-8")


def config_lines(data: bytes, problems: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """``(number, text)`` of each line of a line-based file (users file, sender map),
    skipping blank lines and ``#`` comments; a line that is not UTF-8 goes to
    ``problems`` by number (never its content) and is skipped."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip() or raw.lstrip().startswith(b"#"):
            continue
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError:
            problems.append((number, "not valid UTF-8"))
