"""The sans-I/O SASL core: mechanisms as small state machines, outcomes as frozen values.

Theory of operation
-------------------
A mechanism object lives for one AUTH exchange.  The engine calls ``start(initial)``
once (``initial`` is ``None`` when the client sent no initial response, ``b""`` for
``=``), then ``receive(response)`` for every client line (decoded), and ``resume(secret)``
after a ``Lookup``.  Each call returns exactly one outcome (``saslsmtp.sasl.outcome``):

* ``Reply(payload)``: send ``334 base64(payload)`` and wait for the next line;
* ``Verify(username, password, authzid)``: check a password with the backends; the
  engine finishes the exchange from the verdict (235, 535 or 454);
* ``Lookup(username, kinds)``: the engine fetches a stored secret and calls ``resume``;
* ``ValidateToken(token, ...)``: the engine asks the token validators and calls ``resume``
  with a ``TokenVerdict``;
* ``Accept(username)``: the exchange proved the identity itself (SCRAM, a script);
* ``Reject(...)`` / ``Defer(...)``: permanent / temporary failure with its reply.

The union is closed (``Outcome`` = ``Decision`` | ``Request``) and the engine matches it
exhaustively.  Client mistakes are outcomes, never exceptions.  Calling a mechanism out of order raises
``MechanismStateError`` (that is our bug, not the client's).  Nothing here imports
Twisted; tests/test_layering.py enforces it.
"""

__all__ = ["Accept", "Decision", "Defer", "Lookup", "MechanismStateError", "Outcome", "Reject",
           "Reply", "Request", "Secret", "Session", "TokenVerdict", "ValidateToken", "Verify"]

from saslsmtp.sasl.outcome import (  # noqa: F401
    Accept,
    Decision,
    Defer,
    Lookup,
    MechanismStateError,
    Outcome,
    Reject,
    Reply,
    Request,
    Secret,
    Session,
    TokenVerdict,
    ValidateToken,
    Verify,
)
