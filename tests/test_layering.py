"""Import direction inside saslsmtp, read from the source (AST), not from a running import.

Layers, bottom to top: ``saslsmtp.sasl`` (stdlib only) -> ``config``/``passwords``/
``replies``/``lines`` (no Twisted) -> errors, credentials, checkers, script, adapter,
delivery, envelope -> ``auth``/``transaction`` -> ``smtpauth`` -> ``protocol`` ->
``service`` -> ``tap`` (only the twistd plugin names it).  A lower layer never imports a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "saslsmtp"

TWISTED = ("twisted", "zope")
ENGINE = ("saslsmtp.protocol", "saslsmtp.smtpauth", "saslsmtp.auth", "saslsmtp.transaction",
          "saslsmtp.service", "saslsmtp.tap")

# (modules the rule applies to, by name prefix; import prefixes they must not use; why)
RULES: tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...] = (
    (("saslsmtp.sasl",), TWISTED, "the SASL core is sans-I/O"),
    (("saslsmtp.sasl",), ("saslsmtp.",), "the SASL core is the bottom layer"),
    (("saslsmtp.config", "saslsmtp.passwords", "saslsmtp.replies", "saslsmtp.lines"), TWISTED,
     "configuration, password schemes, the reply table and line framing need no Twisted"),
    (("saslsmtp.checkers",), ENGINE + ("saslsmtp.adapter", "saslsmtp.testing"),
     "backends know credentials, not the protocol"),
    (("saslsmtp.errors", "saslsmtp.credentials", "saslsmtp.script", "saslsmtp.adapter",
      "saslsmtp.delivery", "saslsmtp.mechanisms", "saslsmtp.tlsinfo", "saslsmtp.threads",
      "saslsmtp.envelope", "saslsmtp.guards", "saslsmtp.engine_settings"),
     ENGINE, "shared parts sit below the engine"),
    (("saslsmtp.auth", "saslsmtp.transaction", "saslsmtp.resolver"),
     ("saslsmtp.protocol", "saslsmtp.smtpauth", "saslsmtp.lines", "saslsmtp.service", "saslsmtp.tap"),
     "the AUTH engine and the mail transaction know nothing of lines or listeners"),
    (("saslsmtp.smtpauth",), ("saslsmtp.protocol", "saslsmtp.service", "saslsmtp.tap"),
     "the AUTH command talks to its connection through AuthHost"),
    (("saslsmtp.peer", "saslsmtp.admission"),
     ("saslsmtp.protocol", "saslsmtp.smtpauth", "saslsmtp.service", "saslsmtp.tap"),
     "the client's facts and the limits' verdicts sit below the protocol"),
    (("saslsmtp.protocol",), ("saslsmtp.service", "saslsmtp.tap"),
     "one connection knows nothing of the daemon's wiring"),
    (("saslsmtp",), ("saslsmtp.tap",), "only the twistd plugin names saslsmtp.tap"),
    (("saslsmtp",), ("saslsmtp.testing",), "test helpers are for tests"),
    (("saslsmtp",), ("saslsmtp.embed",), "the library surface is for embedders, not for the daemon"),
)


def module_name(path: Path) -> str:
    """``saslsmtp/sasl/plain.py`` -> ``saslsmtp.sasl.plain`` (packages without ``__init__``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(module: str, source: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports anywhere (also inside functions), relative
    imports resolved against ``module``; ``from a import b`` counts as ``a`` and ``a.b``."""
    names: set[str] = set()
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p.rstrip(".") or name.startswith(p.rstrip(".") + ".") for p in prefixes)


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """The layering rules ``module`` (with this ``source``) breaks, one line each."""
    found = []
    for name in sorted(imported_modules(module, source, is_package)):
        for importers, forbidden, why in RULES:
            if not _under(module, importers) or not _under(name, forbidden):
                continue
            if name == module or (importers == ("saslsmtp.sasl",) and _under(name, ("saslsmtp.sasl",))):
                continue  # the SASL core may import itself
            found.append(f"{module} imports {name}: {why}")
    return found


def test_imports_follow_the_layers() -> None:
    """No module under saslsmtp/ imports against the layers, and the rules are live: the
    same check refuses synthetic modules that add a forbidden import."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    problems = []
    for path in files:
        problems += violations(module_name(path), path.read_text(encoding="utf-8"),
                               path.name == "__init__.py")
    assert problems == []

    bad = {
        "saslsmtp.sasl.plain": "from twisted.internet import defer\n",
        "saslsmtp.sasl.login": "import zope.interface\n",
        "saslsmtp.sasl.scram": "from saslsmtp.credentials import PasswordCredentials\n",
        "saslsmtp.sasl.oauth": "from .. import errors\n",
        "saslsmtp.config": "def f():\n    from twisted.python import usage\n",
        "saslsmtp.passwords": "import twisted\n",
        "saslsmtp.checkers.file": "from saslsmtp.protocol import SubmissionESMTP\n",
        "saslsmtp.checkers.ldap": "from ..auth import AuthExchange\n",
        "saslsmtp.checkers.http": "from saslsmtp import service\n",
        "saslsmtp.auth": "from saslsmtp.protocol import EngineSettings\n",
        "saslsmtp.transaction": "from saslsmtp.smtpauth import SmtpAuth\n",
        "saslsmtp.envelope": "from saslsmtp.transaction import MailTransaction\n",
        "saslsmtp.guards": "from saslsmtp.protocol import SubmissionESMTP\n",
        "saslsmtp.peer": "from saslsmtp.protocol import SubmissionESMTP\n",
        "saslsmtp.admission": "from saslsmtp.smtpauth import SmtpAuth\n",
        "saslsmtp.engine_settings": "from saslsmtp.protocol import SubmissionESMTP\n",
        "saslsmtp.smtpauth": "from saslsmtp.protocol import SubmissionESMTP\n",
        "saslsmtp.lines": "from twisted.protocols.basic import LineReceiver\n",
        "saslsmtp.protocol": "import saslsmtp.service\n",
        "saslsmtp.service": "from saslsmtp.tap import Options\n",
    }
    for module, source in bad.items():
        assert violations(module, source), f"{module} may do: {source!r}"
    assert violations("saslsmtp.sasl", "from saslsmtp.sasl.outcome import Accept\n", True) == []
    assert violations("saslsmtp.sasl.plain", "from saslsmtp.sasl.mechanism import MechanismSpec\n") == []
    assert violations("saslsmtp.service", "from saslsmtp.protocol import SubmissionESMTP\n") == []
    # Relative imports are judged under their absolute names.
    assert violations("saslsmtp.checkers.file", "from ..protocol import SubmissionESMTP\n")
    assert violations("saslsmtp.sasl", "from .. import tap\n", True)
    assert imported_modules("saslsmtp.sasl", "from .outcome import Accept\n", True) == {
        "saslsmtp.sasl.outcome", "saslsmtp.sasl.outcome.Accept"}

    # The twistd plugin is the one place that names saslsmtp.tap (as a string: nothing of
    # the daemon is imported at plugin discovery).
    plugin = (ROOT / "twisted" / "plugins" / "saslsmtp_plugin.py").read_text(encoding="utf-8")
    assert '"saslsmtp.tap"' in plugin
    assert not [n for n in imported_modules("twisted.plugins.saslsmtp_plugin", plugin)
                if n.startswith("saslsmtp")]

