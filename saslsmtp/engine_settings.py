"""``EngineSettings``: what one listener's connections are allowed and required to do.

``saslsmtp.service`` builds one per listener from ``saslsmtp.config``; ``SubmissionESMTP``
and the helpers it owns (``saslsmtp.guards``) read their limits from it.
"""

from __future__ import annotations

from dataclasses import dataclass


def not_one_name(value: object, what: str) -> None:
    """One string where a list of mechanism names is meant would be read letter by letter
    ("P, L, A, I, N"): a ``TypeError`` naming the argument ``what``."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{what} must be a list of names, not one {type(value).__name__}:"
                        f" [{value!r}]")


@dataclass(frozen=True)
class EngineSettings:
    """Per-listener behaviour of ``SubmissionESMTP`` (built from ``saslsmtp.config``)."""

    hostname: str = "localhost"
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    require_tls: bool = True
    require_auth: bool = True
    failure_delay: float = 1.0
    max_failures: int = 3
    max_steps: int = 16
    max_message_size: int = 26214400
    max_recipients: int = 100
    idle_timeout: float = 300.0
    junk_command_limit: int = 100
    max_unauthenticated_time: float = 300.0
    tls_handshake_timeout: float = 30.0

    def __post_init__(self) -> None:
        """``mechanisms`` as a tuple of names, checked now: ``mechanisms="PLAIN"`` was
        taken letter by letter and failed only at the first connection ("P, L, A, I, N")."""
        names = self.mechanisms
        not_one_name(names, "EngineSettings: mechanisms")
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"EngineSettings: mechanisms: each item must be a name (str),"
                                f" not {type(name).__name__}")
        if not isinstance(names, tuple):  # a list from the caller: frozen, so a tuple
            object.__setattr__(self, "mechanisms", tuple(names))
