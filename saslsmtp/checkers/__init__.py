"""One ``ICredentialsChecker`` per backend, and the chain that tries them in order.

Contract for every backend checker:

* ``credentialInterfaces = (IUsernamePassword,)``; ``requestAvatarId(credentials)``
  returns a Deferred firing with the username as bytes on success.
* wrong credentials (unknown user included): fail with ``UnauthorizedLogin``;
* anything else (server down, timeout, bad answer): fail with
  ``saslsmtp.errors.TemporaryFailure`` (any other exception is treated the same);
* never block the reactor: blocking libraries run through a ``BlockingRunner``;
* never put a password in a log line, exception message or repr.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if not TYPE_CHECKING:  # mypy sees the real submodules, not a catch-all attribute
    def __getattr__(name: str) -> object:
        """``saslsmtp.checkers.ldap`` imports the backend's module on first access (PEP 562).

        ``saslsmtp.embed`` names each builder's return type as
        ``saslsmtp.checkers.KIND.Class`` without importing every backend (and its client
        library) up front; ``typing.get_type_hints`` resolves the name through here."""
        if name.startswith("_"):
            raise AttributeError(name)
        full = f"{__name__}.{name}"
        try:
            return importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name != full:
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
