"""LOGIN (draft-murchison-sasl-login): ``Username:`` then ``Password:`` prompts.

An initial response is the username (smtplib and most clients send one).
"""

from __future__ import annotations

from saslsmtp.sasl.mechanism import MechanismSpec, NoLookup
from saslsmtp.sasl.outcome import MechanismStateError, Outcome, Reject, Reply, Session, Verify

USERNAME_PROMPT = b"Username:"
PASSWORD_PROMPT = b"Password:"
MALFORMED = Reject("Malformed LOGIN response")


class Login(NoLookup):
    """Two prompts; the exchange ends in ``Verify``."""

    def __init__(self, session: Session | None = None) -> None:
        self._stage = "new"
        self._username = ""

    def start(self, initial: bytes | None) -> Outcome:
        if self._stage != "new":
            raise MechanismStateError("LOGIN already started")
        if initial is None:
            self._stage = "username"
            return Reply(USERNAME_PROMPT)
        return self._got_username(initial)

    def receive(self, response: bytes) -> Outcome:
        if self._stage == "username":
            return self._got_username(response)
        if self._stage == "password":
            self._stage = "done"
            try:
                password = response.decode("utf-8")
            except UnicodeDecodeError:
                return MALFORMED
            return Verify(self._username, password)
        raise MechanismStateError(f"LOGIN is not waiting for a response (stage {self._stage})")

    def _got_username(self, data: bytes) -> Outcome:
        try:
            self._username = data.decode("utf-8")
        except UnicodeDecodeError:
            self._stage = "done"
            return MALFORMED
        if not self._username or "\0" in self._username:
            self._stage = "done"
            return MALFORMED
        self._stage = "password"
        return Reply(PASSWORD_PROMPT)


SPEC = MechanismSpec("LOGIN", Login, plaintext=True, client_first=True, password=True)
