"""Building backend checkers from their configuration.

Each backend module ``saslsmtp.checkers.<type>`` exposes
``from_config(name: str, options, deps: BackendDeps) -> ICredentialsChecker``.
Add a backend type: a frozen options class in ``saslsmtp.config.BACKEND_TYPES``,
a module here with ``from_config``, and a line in ``BACKEND_MODULES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from twisted.cred.checkers import ICredentialsChecker

from saslsmtp.config import BackendConfig
from saslsmtp.threads import BlockingRunner

BACKEND_MODULES: dict[str, str] = {
    "file": "saslsmtp.checkers.file",
    "ldap": "saslsmtp.checkers.ldap",
    "smtp": "saslsmtp.checkers.smtp",
    "http": "saslsmtp.checkers.http",
    "dovecot": "saslsmtp.checkers.dovecot",
    "oauth2": "saslsmtp.checkers.oauth2",
}


@dataclass(frozen=True)
class BackendDeps:
    """What backends may use; nothing else (no global reactor).

    ``reactor``: the reactor (time, TCP/UNIX connections, threads).
    ``hash_runner``: the shared bounded pool for password hashing.
    ``make_runner(name, max_threads)``: a dedicated bounded pool (e.g. for ldap3);
    the caller starts and stops it with the service.
    """

    reactor: Any
    hash_runner: BlockingRunner
    make_runner: Callable[[str, int], BlockingRunner]


def build_checker(backend: BackendConfig, deps: BackendDeps) -> ICredentialsChecker:
    """The checker for one ``[backends.NAME]`` table."""
    module = importlib.import_module(BACKEND_MODULES[backend.type])
    return module.from_config(backend.name, backend.options, deps)
