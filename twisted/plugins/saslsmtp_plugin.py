"""The ``twistd saslsmtp`` plugin: everything is resolved lazily from ``saslsmtp.tap``."""

from twisted.application.service import ServiceMaker

saslsmtp = ServiceMaker(
    "saslsmtp",
    "saslsmtp.tap",
    "SMTP submission server with scriptable SASL authentication",
    "saslsmtp",
)
