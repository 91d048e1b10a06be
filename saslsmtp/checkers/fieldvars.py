"""Dovecot's ``%`` variables in a users file's extra field value (``reason=``).

Dovecot expands variables in passwd-file extra fields, so a file it shares with saslsmtp
may hold ``reason=%u_moved_to_mx2`` or ``reason=100%%_full``; shown as written, the
client would read the template.  ``FieldTemplate.parse`` splits a value once, at load
(an unknown variable is a ``ValueError``, as it fails the login in Dovecot);
``expand`` fills it in at each refusal.  Supported: ``%%``, ``%u``/``%{user}``,
``%n``/``%{username}``, ``%d``/``%{domain}``, ``%s``/``%{service}`` (``smtp``),
``%r``/``%{rip}`` and ``%l``/``%{lip}``; no modifiers (``%Lu``).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Dovecot's short and long names of the variables a login has here.
VARIABLES = {"u": "user", "n": "username", "d": "domain", "s": "service", "r": "rip", "l": "lip"}
_LONG = {long: long for long in VARIABLES.values()}


@dataclass(frozen=True)
class FieldTemplate:
    """Literal text and variable names, in order (a name is a ``str`` in ``parts`` too:
    ``variables`` says which indexes are variables)."""

    parts: tuple[str, ...]
    variables: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, value: str) -> "FieldTemplate":
        """``value`` split into text and variables; ``ValueError`` names the first
        unknown variable or a ``%`` that ends the value."""
        parts: list[str] = []
        variables: set[int] = set()
        text: list[str] = []
        i = 0
        while i < len(value):
            char = value[i]
            if char != "%":
                text.append(char)
                i += 1
                continue
            if value.startswith("%%", i):
                text.append("%")
                i += 2
                continue
            name, i = _variable(value, i)
            parts.append("".join(text))
            text = []
            variables.add(len(parts))
            parts.append(name)
        parts.append("".join(text))
        return cls(tuple(parts), frozenset(variables))

    def expand(self, user: str, remote_ip: str = "", local_ip: str = "") -> str:
        """The text, with the login's values (``user@domain``: ``%n`` and ``%d`` split it
        at the last ``@``, as Dovecot does)."""
        if not self.variables:
            return "".join(self.parts)
        name, at, domain = user.rpartition("@")
        values = {"user": user, "username": name if at else user, "domain": domain if at else "",
                  "service": "smtp", "rip": remote_ip, "lip": local_ip}
        return "".join(values[p] if i in self.variables else p for i, p in enumerate(self.parts))


def _variable(value: str, start: int) -> tuple[str, int]:
    """The long name of the variable at ``value[start]`` (a ``%``) and the index after it."""
    if value.startswith("%{", start):
        end = value.find("}", start)
        if end < 0:
            raise ValueError("'%{' without '}' (write %% for a %)")
        long = value[start + 2:end]
        if long not in _LONG:
            raise ValueError(f"unknown variable %{{{long}}} (known: {_known()}; write %% for a %)")
        return long, end + 1
    short = value[start + 1:start + 2]
    if short not in VARIABLES:
        shown = f"%{short}" if short else "a % at the end"
        raise ValueError(f"unknown variable {shown} (known: {_known()}; write %% for a %)")
    return VARIABLES[short], start + 2


def _known() -> str:
    return ", ".join(f"%{s}" for s in VARIABLES)
