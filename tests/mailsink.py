"""An aiosmtpd upstream that accepts mail, for the relay tests.

In a thread (``MailSink(...).start()``) it keeps every message in ``messages``; as a
process (``python -m tests.mailsink PORT LOG``) it appends one line per message to LOG
(``from rcpts octets message-id``) and keeps nothing, so a test can kill it mid-DATA or
measure its own memory apart from the upstream's.  ``RCPT TO:<reject...>`` is refused
with ``550 5.1.1``; with a certificate it offers STARTTLS; with ``eight_bit_mime=False``
its EHLO does not announce 8BITMIME.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from aiosmtpd.controller import Controller

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(\S+)", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Received:
    """One message as the upstream got it."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    mail_options: tuple[str, ...]

    @property
    def message_id(self) -> str:
        match = _MESSAGE_ID.search(self.content[:4096])
        return match.group(1).decode() if match else ""


class Handler:
    """Accept every sender; refuse ``reject*`` recipients; record or log each message."""

    def __init__(self, log_path: str | None = None, *, eight_bit_mime: bool = True) -> None:
        self.messages: list[Received] = []
        self.log_path = log_path
        self.eight_bit_mime = eight_bit_mime
        self.lock = threading.Lock()

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        """aiosmtpd's keywords, without ``8BITMIME`` when told (a 7-bit upstream)."""
        session.host_name = hostname
        return [r for r in responses if self.eight_bit_mime or r[4:] != "8BITMIME"]

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: Any) -> str:
        if address.startswith("reject"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content
        message = Received(envelope.mail_from, tuple(envelope.rcpt_tos),
                           b"" if self.log_path else content, tuple(envelope.mail_options))
        if self.log_path:
            mid = _MESSAGE_ID.search(content[:4096])
            with open(self.log_path, "a") as f:
                f.write(f"{envelope.mail_from} {','.join(envelope.rcpt_tos)} {len(content)}"
                        f" {mid.group(1).decode() if mid else '-'}\n")
        with self.lock:
            self.messages.append(message)
        return "250 2.0.0 OK: queued"


class MailSink:
    """aiosmtpd on 127.0.0.1:``port`` with ``Handler`` (STARTTLS with ``tls_context``,
    TLS from the first byte with ``implicit_tls``, SMTPUTF8 announced with ``smtputf8``)."""

    def __init__(self, port: int, *, log_path: str | None = None, tls_context: Any = None,
                 implicit_tls: Any = None, smtputf8: bool = False,
                 eight_bit_mime: bool = True):
        self.port = port
        self.handler = Handler(log_path, eight_bit_mime=eight_bit_mime)
        kwargs: dict[str, Any] = dict(hostname="127.0.0.1", port=port, ready_timeout=5,
                                      data_size_limit=0, decode_data=False,
                                      enable_SMTPUTF8=smtputf8)
        if tls_context is not None:
            kwargs.update(tls_context=tls_context, require_starttls=False)
        if implicit_tls is not None:
            kwargs.update(ssl_context=implicit_tls)
        self.controller = Controller(self.handler, **kwargs)

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()


def running_sink() -> Iterator[MailSink]:
    """The body of a ``sink`` fixture: an aiosmtpd sink on a free loopback port, in this
    process, stopped after the test."""
    from tests.support import free_port
    server = MailSink(free_port())
    server.start()
    yield server
    server.stop()


def main() -> None:
    port, log_path = int(sys.argv[1]), sys.argv[2]
    sink = MailSink(port, log_path=log_path)
    sink.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        sink.stop()


if __name__ == "__main__":
    main()
