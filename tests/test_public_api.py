"""The public surface stays: every name docs/library.md promises exists, and is documented.

Removing or renaming one of these is a breaking change: this test fails first.  Names
not listed here are internal (modules say so; ``_``-prefixed names are private)."""

from __future__ import annotations

import importlib
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Iterator

import pytest

import saslsmtp
from saslsmtp import embed

DOC = (Path(__file__).resolve().parent.parent / "docs" / "library.md").read_text()

PUBLIC: dict[str, tuple[str, ...]] = {
    "saslsmtp.embed": (
        "STOCK_MECHANISMS", "challengers", "portal", "exchange_checkers", "submission_auth",
        "SubmissionAuth", "Resolver", "auth_script", "script_password_checker",
        "checker", "file_checker", "ldap_checker", "smtp_checker", "http_checker",
        "dovecot_checker", "oauth2_checker", "thread_pool", "OptionsError", "ConfigError",
        "MechanismAdapter", "ScriptRunner", "ISecretSource", "ITokenValidator", "mechanism",
        "scram_keys"),
    "saslsmtp.script": ("Accept", "Reject", "Defer", "Reply", "Verdict", "load_script"),
    "saslsmtp.sasl.outcome": ("Accept", "Reject", "Defer", "Reply", "Verify", "Lookup",
                              "ValidateToken", "Secret", "Session", "Outcome"),
    "saslsmtp.sasl.mechanism": ("MechanismSpec", "Mechanism"),
    "saslsmtp.errors": ("AuthRejected", "TemporaryFailure"),
    "saslsmtp.testing": ("SMTPHarness", "MemoryRealm", "MemoryUsers", "TLSStringTransport"),
    "saslsmtp.protocol": ("SubmissionESMTP", "EngineSettings"),
}


@pytest.mark.parametrize("module, name", [(m, n) for m, names in PUBLIC.items() for n in names])
def test_public_name_exists_and_is_documented(module: str, name: str) -> None:
    """Each promised name imports, and the library page names it."""
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} disappeared"
    assert re.search(rf"[`. ]{re.escape(name)}\b", DOC), f"{module}.{name} is not in docs/library.md"


def test_embed_all_is_exactly_the_promise() -> None:
    """``saslsmtp.embed.__all__`` neither loses a name nor grows an undocumented one."""
    assert sorted(embed.__all__) == sorted(PUBLIC["saslsmtp.embed"])


def annotated(obj: Any) -> Iterator[Any]:
    """``obj`` and, for a class, every function its saslsmtp classes define (methods,
    ``__init__``, properties' getters): what ``typing.get_type_hints`` gets asked about."""
    if not inspect.isclass(obj):
        if inspect.isfunction(obj):
            yield obj
        return
    yield obj
    for cls in obj.__mro__:
        if not cls.__module__.startswith("saslsmtp"):
            continue
        for value in vars(cls).values():
            if isinstance(value, property):
                value = value.fget
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if inspect.isfunction(value):
                yield value


def returned_classes(builder: Any) -> list[type]:
    """The classes a builder is annotated to return (each member of a union)."""
    hint = typing.get_type_hints(builder)["return"]
    return [c for c in (typing.get_args(hint) or (hint,)) if inspect.isclass(c)]


def public_objects() -> list[tuple[str, Any]]:
    """Everything each public module's ``__all__`` names."""
    return [(f"{module}.{name}", getattr(importlib.import_module(module), name))
            for module in PUBLIC for name in importlib.import_module(module).__all__]


CHECKER_BUILDERS = ("file_checker", "ldap_checker", "smtp_checker", "http_checker",
                    "dovecot_checker", "oauth2_checker")


@pytest.mark.parametrize("name, obj", public_objects(), ids=[n for n, _ in public_objects()])
def test_public_annotations_resolve_at_run_time(name: str, obj: Any) -> None:
    """attrs, pydantic, dependency injectors and sphinx-autodoc call
    ``typing.get_type_hints``: a name only imported for type checkers, or a quoted alias
    evaluated in a module that never imported its parts, is a ``NameError`` there."""
    for target in annotated(obj):
        typing.get_type_hints(target)


@pytest.mark.parametrize("builder", CHECKER_BUILDERS)
def test_the_checker_classes_builders_return_resolve(builder: str) -> None:
    """The classes the per-kind builders are annotated to return (their ``stop()``,
    ``lookup_secret()``, ``validate_token()`` are documented) resolve, methods included."""
    classes = returned_classes(getattr(embed, builder))
    assert classes
    for cls in classes:
        for target in annotated(cls):
            typing.get_type_hints(target)


def test_the_checker_builders_name_their_classes() -> None:
    """The per-kind builders' return types are the classes themselves."""
    from saslsmtp.checkers.file import FileChecker
    from saslsmtp.checkers.ldap import LdapChecker
    from saslsmtp.checkers.ldaptwisted import TwistedLdapChecker
    assert returned_classes(embed.file_checker) == [FileChecker]
    assert returned_classes(embed.ldap_checker) == [TwistedLdapChecker, LdapChecker]


def test_harness_keeps_its_documented_parameters() -> None:
    """The SMTPHarness keywords and methods the docs and README use."""
    import inspect
    from saslsmtp.testing import SMTPHarness
    parameters = inspect.signature(SMTPHarness).parameters
    for keyword in ("users", "backends", "checkers", "script", "mechanisms", "mechanism_names",
                    "settings", "clock", "tls", "starttls"):
        assert keyword in parameters
    for method in ("send", "take", "login", "close", "connect"):
        assert callable(getattr(SMTPHarness, method))
    assert isinstance(SMTPHarness.tls_started_with, property)


def test_version() -> None:
    assert saslsmtp.__version__


def test_checker_kinds_import_on_first_access_only_real_ones() -> None:
    """``saslsmtp.checkers.KIND`` (what the builders' annotations name) imports that
    module; a name that is no module is an AttributeError, as for any module."""
    import sys
    import saslsmtp.checkers
    assert saslsmtp.checkers.http is sys.modules["saslsmtp.checkers.http"]
    assert not hasattr(saslsmtp.checkers, "nosuch")
    assert not hasattr(saslsmtp.checkers, "_private")
