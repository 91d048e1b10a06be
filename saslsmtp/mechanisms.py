"""The built-in mechanisms: name -> ``MechanismSpec``, and what each needs to be served.

Add a mechanism: write a sans-I/O state machine in ``saslsmtp/sasl/`` with a ``SPEC``
(or ``SPECS``) that declares what the mechanism needs (``password``, ``secret_kinds``,
``token_validator``, ``client_certificate``: checked at startup), and name its module in
``BUILTIN_MODULES``.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable

from saslsmtp.sasl import scram
from saslsmtp.sasl.mechanism import MechanismSpec

BUILTIN_MODULES = (
    "saslsmtp.sasl.plain",
    "saslsmtp.sasl.login",
    "saslsmtp.sasl.cram_md5",
    "saslsmtp.sasl.scram",
    "saslsmtp.sasl.oauth",
    "saslsmtp.sasl.external",
)


def builtin_mechanisms(configured: Iterable[str] | None = None,
                       salt_key: Callable[[], bytes | None] | None = None) -> dict[str, MechanismSpec]:
    """Every mechanism the server implements itself.  With ``configured``, the SCRAM
    specs know whether their ``-PLUS`` sibling is offered (the ``y`` downgrade check) and
    derive salts with ``salt_key`` (the users file's: ``FileChecker.salt_key``)."""
    specs: dict[str, MechanismSpec] = {}
    for name in BUILTIN_MODULES:
        module = importlib.import_module(name)
        for spec in getattr(module, "SPECS", ()) or (module.SPEC,):
            specs[spec.name] = spec
    if configured is not None:
        specs.update(scram.specs_for(configured, salt_key))
    return specs


BUILTIN_NAMES = frozenset(builtin_mechanisms())
