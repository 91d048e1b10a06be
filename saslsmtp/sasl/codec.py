"""Strict base64 for SMTP AUTH (RFC 4954 section 4): no lenient decoding."""

from __future__ import annotations

import base64
import binascii


class DecodeError(ValueError):
    """The client's line is not valid base64."""


def decode_response(line: bytes, *, initial: bool = False) -> bytes:
    """Decode one client response.

    ``=`` alone on the AUTH line is an empty initial response; an empty continuation
    line is an empty response.  Everything else must be canonical base64.
    """
    if initial and line == b"=":
        return b""
    if not line:
        if initial:
            raise DecodeError("empty initial response")
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise DecodeError("invalid base64") from None

