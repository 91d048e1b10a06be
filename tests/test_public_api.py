"""The public surface stays: every name docs/library.md promises exists, and is documented.

Removing or renaming one of these is a breaking change: this test fails first.  Names
not listed here are internal (modules say so; ``_``-prefixed names are private)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import saslsmtp
from saslsmtp import embed

DOC = (Path(__file__).resolve().parent.parent / "docs" / "library.md").read_text()

PUBLIC: dict[str, tuple[str, ...]] = {
    "saslsmtp.embed": (
        "STOCK_MECHANISMS", "challengers", "portal", "auth_script", "script_password_checker",
        "checker", "file_checker", "ldap_checker", "smtp_checker", "http_checker",
        "dovecot_checker", "oauth2_checker", "thread_pool", "OptionsError", "MechanismAdapter",
        "ScriptRunner"),
    "saslsmtp.script": ("Accept", "Reject", "Defer", "Reply", "Verdict", "load_script"),
    "saslsmtp.sasl.outcome": ("Accept", "Reject", "Defer", "Reply", "Verify", "Lookup",
                              "Secret", "Session"),
    "saslsmtp.sasl.mechanism": ("MechanismSpec",),
    "saslsmtp.errors": ("AuthRejected", "TemporaryFailure"),
    "saslsmtp.testing": ("SMTPHarness", "MemoryRealm", "TLSStringTransport"),
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


def test_version() -> None:
    assert saslsmtp.__version__
