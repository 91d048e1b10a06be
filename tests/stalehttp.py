"""An HTTP server that forgets its kept-alive connections: for the backends' one retry.

It answers the first request on each connection (keep-alive) with ``factory.body``, then
drops the connection without a word when the next request arrives on it: a kept-alive
connection the server had closed (a restart, a short keep-alive timeout).  The factory
counts ``connections`` and ``requests``.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol


class ForgetfulHTTP(Protocol):
    factory: "ForgetfulFactory"

    def connectionMade(self) -> None:
        self.buffer = b""
        self.answered = False
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.factory.requests += 1
            if self.answered:
                self.transport.loseConnection()
                return
            self.answered = True
            body = self.factory.body
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\n"
                                 b"Content-Length: %d\r\n\r\n%s"
                                 % (self.factory.content_type, len(body), body))


class ForgetfulFactory(Factory):
    protocol = ForgetfulHTTP

    def __init__(self, body: bytes = b"ok", content_type: bytes = b"text/plain") -> None:
        self.body = body
        self.content_type = content_type
        self.connections = 0
        self.requests = 0
