"""The system's crypt(3) (libxcrypt's ``crypt_rn``) through ctypes.

Why: SHA512-CRYPT at its default cost (100000 rounds) is ~30-50 ms of CPU.  A Python
implementation (libpass) holds the GIL for all of it, so a thread pool of hashing logins
starves the reactor thread.  A ctypes foreign call through ``ctypes.CDLL`` releases the GIL
for its whole duration, so here the hashing really runs beside the reactor, on every core.

``crypt_rn`` is reentrant (the caller passes the scratch area), so any number of threads
may call ``crypt`` at once.  Without ``crypt_rn`` (a non-libxcrypt libcrypt), ``crypt_r``
is used with a scratch area larger than any known ``struct crypt_data``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Callable

__all__ = ["LibcryptMissing", "crypt", "gensalt", "require"]

#: ``sizeof(struct crypt_data)`` is 32768 in libxcrypt and 131232 in old glibc.
_SCRATCH_SIZE = 262144

class LibcryptMissing(RuntimeError):
    """The system's libcrypt (``libcrypt.so.1``, Debian package ``libcrypt1``) is missing."""


_Crypt = Callable[[bytes, bytes], "bytes | None"]


def _library() -> ctypes.CDLL:
    names = ["libcrypt.so.1"]
    found = ctypes.util.find_library("crypt")
    if found and found not in names:
        names.append(found)
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)  # CDLL (not PyDLL): calls release the GIL
            break
        except OSError:
            continue
    if lib is None:
        raise LibcryptMissing(
            "the system crypt library libcrypt.so.1 (libxcrypt; Debian/Ubuntu package"
            " libcrypt1, Fedora libxcrypt) cannot be loaded; it computes the crypt(3)"
            " schemes {SHA512-CRYPT}, {SHA256-CRYPT}, {MD5-CRYPT} and {CRYPT}")
    return lib


@functools.lru_cache(maxsize=None)
def _load() -> _Crypt:
    lib = _library()
    crypt_rn = getattr(lib, "crypt_rn", None)
    if crypt_rn is not None:
        crypt_rn.restype = ctypes.c_char_p
        crypt_rn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]

        def call(phrase: bytes, setting: bytes) -> bytes | None:
            scratch = ctypes.create_string_buffer(32768)
            result: bytes | None = crypt_rn(phrase, setting, scratch, 32768)  # restype c_char_p
            return result
        return call
    crypt_r = getattr(lib, "crypt_r", None)
    if crypt_r is None:
        raise LibcryptMissing("the system libcrypt has neither crypt_rn nor crypt_r")
    crypt_r.restype = ctypes.c_char_p
    crypt_r.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]

    def call_r(phrase: bytes, setting: bytes) -> bytes | None:
        scratch = ctypes.create_string_buffer(_SCRATCH_SIZE)
        result: bytes | None = crypt_r(phrase, setting, scratch)  # restype c_char_p
        # glibc's crypt_r returns a "*0"/"*1" failure token instead of NULL
        return None if not result or result.startswith(b"*") else result
    return call_r


def require() -> None:
    """Raise ``LibcryptMissing`` (with what to install) unless libcrypt can be used.

    Call it at startup, so a missing library is a clear error and not a 454 per login."""
    _load()


def crypt(phrase: bytes, setting: bytes) -> bytes | None:
    """crypt(3) of ``phrase`` with ``setting`` (a full stored hash works as the setting).

    ``None`` when libcrypt refuses: unknown or invalid setting, a phrase with a NUL byte
    (C strings would cut it short) or longer than libcrypt accepts (512 bytes).
    Releases the GIL while it computes."""
    if b"\0" in phrase or b"\0" in setting:
        return None
    result = _load()(phrase, setting)
    if not result or result.startswith(b"*"):
        return None
    return result


def gensalt(prefix: bytes, count: int, random: bytes) -> bytes | None:
    """libxcrypt's ``crypt_gensalt_rn``: a new setting for the hash method ``prefix``
    (``$y$`` yescrypt, ``$7$`` scrypt ...) at cost ``count`` (0: the library's default),
    salted from ``random``.  ``None`` when the library refuses (an unknown method, a cost
    out of its range, or a libcrypt without ``crypt_gensalt_rn``)."""
    function = getattr(_library(), "crypt_gensalt_rn", None)
    if function is None:
        return None
    function.restype = ctypes.c_char_p
    function.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int,
                         ctypes.c_void_p, ctypes.c_int]
    output = ctypes.create_string_buffer(256)
    result: bytes | None = function(prefix, count, random, len(random), output, 256)
    if not result or result.startswith(b"*"):
        return None
    return result
