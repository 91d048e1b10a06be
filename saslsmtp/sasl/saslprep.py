"""SASLprep (RFC 4013) and the SCRAM/GS2 ``saslname`` encoding (RFC 5801, RFC 5802).

The one copy both SCRAM (passwords, usernames) and OAUTHBEARER (the GS2 ``a=`` authzid)
use.  Stdlib only.

SASLprep is a stringprep profile, and stringprep (RFC 3454) is pinned to Unicode 3.2: its
tables (Python's ``stringprep`` module) and its NFKC step both use that version, so the
normalization here is ``unicodedata.ucd_3_2_0``'s, not the running Python's newer one.
"""

from __future__ import annotations

import re
import stringprep
import unicodedata

__all__ = ["saslprep", "decode_saslname"]

_PROHIBITED = (
    stringprep.in_table_c12, stringprep.in_table_c21, stringprep.in_table_c22,
    stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
    stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
    stringprep.in_table_c9,
)

_SASLNAME = re.compile(r"(?:[^\x00=,]|=2C|=3D)+")


def saslprep(text: str, *, allow_unassigned: bool = False) -> str:
    """SASLprep ``text``; ``ValueError`` for a string the profile prohibits.

    RFC 5802 treats SCRAM's passwords and names as *stored strings*, in which code points
    unassigned in Unicode 3.2 (stringprep table A.1) are prohibited: that is the default.
    ``allow_unassigned=True`` applies the *query* rules instead.
    """
    # 2.1 mapping: non-ASCII spaces (C.1.2) to SPACE, "commonly mapped to nothing" (B.1) out
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )
    # 2.2 normalization: NFKC as of Unicode 3.2
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    # 2.3 prohibited output, 2.5 unassigned code points
    for ch in prepared:
        if any(table(ch) for table in _PROHIBITED):
            raise ValueError("SASLprep: prohibited character")
        if not allow_unassigned and stringprep.in_table_a1(ch):
            raise ValueError("SASLprep: unassigned code point")
    # 2.4 bidirectional characters (RFC 3454 section 6)
    if any(stringprep.in_table_d1(ch) for ch in prepared):
        if any(stringprep.in_table_d2(ch) for ch in prepared):
            raise ValueError("SASLprep: mixed bidi text")
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            raise ValueError("SASLprep: bidi text must start and end with RandALCat")
    return prepared


def decode_saslname(value: str) -> str | None:
    """``=2C`` -> ``,`` and ``=3D`` -> ``=``; ``None`` for an invalid (or empty) saslname."""
    if not _SASLNAME.fullmatch(value):
        return None
    return value.replace("=2C", ",").replace("=3D", "=")
