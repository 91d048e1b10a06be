"""MAIL FROM: may this login use this sender address?

``SenderCheck`` is the ``sender_check`` the mail transaction calls at MAIL: first the
``[submission]`` policy (``saslsmtp.senders.SenderPolicy``: ``any``, ``login``, ``map``,
``allow_null_sender``), then, when the AUTH script defines ``sender(arguments,
context)``, the script, which has the last word on what the policy allowed:
``Accept`` allows, ``Reject`` refuses with ``553 5.7.1`` (its ``reason`` as the text
when given), ``Defer`` (or an error, or a timeout) answers ``451 4.7.1``.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet import defer

from saslsmtp.envelope import Client
from saslsmtp.replies import SMTPReply, clean_text
from saslsmtp.sasl.outcome import Accept, Reject
from saslsmtp.senders import SenderPolicy, refusal

DEFERRED = SMTPReply(451, "4.7.1", "Sender address check failed temporarily, try again later")


class SenderCheck:
    """``check(client, address, params)`` -> Deferred of ``None`` (allowed) or the reply."""

    def __init__(self, policy: SenderPolicy, script: Any = None) -> None:
        self.policy = policy
        self.script = script  # a ScriptRunner whose script defines sender(), or None

    def __call__(self, client: Client, address: str,
                 params: Sequence[str]) -> "defer.Deferred[SMTPReply | None]":
        login = client.login or ""
        decision = self.policy.check(login, address)
        if not decision.allowed:
            return defer.succeed(decision.reply)
        if self.script is None or client.session is None:
            return defer.succeed(None)

        def decide(result: Any) -> SMTPReply | None:
            if isinstance(result, Accept):
                return None
            if isinstance(result, Reject):
                reply = refusal(address, login)
                return reply.with_text(clean_text(result.reason)) if result.reason else reply
            reason = getattr(result, "reason", None)
            return DEFERRED.with_text(clean_text(reason) if reason else None)
        d = self.script.check_sender(client.session(), client.login, address, params)
        return d.addCallback(decide)
