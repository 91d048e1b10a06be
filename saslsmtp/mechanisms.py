"""The built-in mechanisms: name -> ``MechanismSpec``.

Add a mechanism: write a sans-I/O state machine in ``saslsmtp/sasl/`` with a ``SPEC``
(or ``SPECS``), and name its module in ``BUILTIN_MODULES``.
"""

from __future__ import annotations

import importlib

from saslsmtp.sasl.mechanism import MechanismSpec

BUILTIN_MODULES = (
    "saslsmtp.sasl.plain",
    "saslsmtp.sasl.login",
)


def builtin_mechanisms() -> dict[str, MechanismSpec]:
    """Every mechanism the server implements itself."""
    specs: dict[str, MechanismSpec] = {}
    for name in BUILTIN_MODULES:
        module = importlib.import_module(name)
        for spec in getattr(module, "SPECS", ()) or (module.SPEC,):
            specs[spec.name] = spec
    return specs


BUILTIN_NAMES = frozenset(builtin_mechanisms())
