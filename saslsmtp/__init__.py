"""saslsmtp: a Twisted SMTP submission daemon with scriptable SASL authentication."""

__version__ = "0.1.0"
