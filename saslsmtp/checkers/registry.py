"""Backend types: ``type`` -> its options class and its checker factory.

Each backend module ``saslsmtp.checkers.<type>`` defines a frozen ``Options`` subclass
(every option, its default and its rules: ``saslsmtp.options``) and
``from_config(name: str, options, deps: BackendDeps) -> ICredentialsChecker``.
Add a backend type: such a module and a line in ``BACKEND_TYPES``.  Modules are imported
on first use, so a configuration without an LDAP backend never imports ldap3.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from twisted.cred.checkers import ICredentialsChecker

from saslsmtp.options import Options
from saslsmtp.threads import BlockingRunner

if TYPE_CHECKING:
    from saslsmtp.config import BackendConfig


@dataclass(frozen=True)
class BackendType:
    """Where a backend type lives: its module and the name of its options class."""

    module: str
    options: str

    def options_class(self) -> type[Options]:
        cls: type[Options] = getattr(importlib.import_module(self.module), self.options)
        return cls

    def factory(self) -> Callable[..., ICredentialsChecker]:
        factory: Callable[..., ICredentialsChecker] = \
            importlib.import_module(self.module).from_config
        return factory


BACKEND_TYPES: dict[str, BackendType] = {
    "file": BackendType("saslsmtp.checkers.file", "FileOptions"),
    "ldap": BackendType("saslsmtp.checkers.ldap", "LdapOptions"),
    "smtp": BackendType("saslsmtp.checkers.smtp", "SmtpOptions"),
    "http": BackendType("saslsmtp.checkers.http", "HttpOptions"),
    "dovecot": BackendType("saslsmtp.checkers.dovecot", "DovecotOptions"),
    "oauth2": BackendType("saslsmtp.checkers.oauth2", "OAuth2Options"),
}


def options_class(kind: str) -> type[Options]:
    """The options class of backend type ``kind`` (``KeyError`` if there is none)."""
    return BACKEND_TYPES[kind].options_class()


@dataclass(frozen=True)
class BackendDeps:
    """What backends may use; nothing else (no global reactor).

    ``reactor``: the reactor (time, TCP/UNIX connections, threads).
    ``hash_runner``: the shared bounded pool for password hashing.
    ``make_runner(name, max_threads)``: a dedicated bounded pool (e.g. for ldap3);
    the caller starts and stops it with the service (the daemon's start all
    ``max_threads`` threads then, so ``run`` never starts one on the reactor thread).
    """

    reactor: Any
    hash_runner: BlockingRunner
    make_runner: Callable[[str, int], BlockingRunner]


def build_checker(backend: "BackendConfig", deps: BackendDeps) -> ICredentialsChecker:
    """The checker for one ``[backends.NAME]`` table."""
    return BACKEND_TYPES[backend.type].factory()(backend.name, backend.options, deps)


def checker_from_options(kind: str, name: str, deps: BackendDeps,
                         **options: Any) -> ICredentialsChecker:
    """A checker built from keyword arguments, checked by the same rules as the file:
    ``OptionsError`` (its ``key`` names the option) when they are wrong."""
    return BACKEND_TYPES[kind].factory()(name, options_class(kind).from_table(options), deps)
