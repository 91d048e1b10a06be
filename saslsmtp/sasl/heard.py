"""``Heard``: what the client said in the last few AUTH exchanges of one connection.

An AUTH script may keep part of a response in its per-connection ``context`` (a
password split off a PLAIN-like message) and quote it in an exception many exchanges
later.  To take it out of the log line, the server must still know what the client said
then; so each connection keeps its responses here, beside ``context``, bounded: the
last ``EXCHANGES`` exchanges and, of the earlier ones, no more than ``LIMIT`` bytes (the
current exchange is always kept whole; its steps are bounded by ``script_max_steps``).
A value kept from an exchange older than that is no longer recognised.
"""

from __future__ import annotations

__all__ = ["Heard"]


class Heard:
    """The client's responses (and the passwords PLAIN and LOGIN decoded), by exchange."""

    __slots__ = ("_exchanges",)  # one per connection: no __dict__, nothing until AUTH

    #: Exchanges remembered, the current one included.
    EXCHANGES = 4
    #: Bytes remembered of the exchanges before the current one.
    LIMIT = 64 * 1024

    def __init__(self) -> None:
        self._exchanges: list[list[bytes]] | None = None

    def begin(self) -> None:
        """A new exchange starts: what it hears goes with it."""
        if self._exchanges is None:
            self._exchanges = []
        self._exchanges.append([])
        self._trim()

    def add(self, said: str | bytes) -> None:
        """The client said ``said`` in the current exchange (nothing for an empty one)."""
        if not said:
            return
        if self._exchanges is None or not self._exchanges:
            self.begin()
        assert self._exchanges is not None
        raw = said.encode("utf-8", "surrogatepass") if isinstance(said, str) else bytes(said)
        self._exchanges[-1].append(raw)

    def said(self) -> tuple[bytes, ...]:
        """Everything remembered, oldest first."""
        if not self._exchanges:
            return ()
        return tuple(item for exchange in self._exchanges for item in exchange)

    def _trim(self) -> None:
        exchanges = self._exchanges
        assert exchanges is not None
        del exchanges[:-self.EXCHANGES]
        while len(exchanges) > 1 and sum(len(i) for e in exchanges[:-1] for i in e) > self.LIMIT:
            del exchanges[0]

    def __repr__(self) -> str:
        count = len(self._exchanges or ())
        return f"<Heard {count} exchanges>"
