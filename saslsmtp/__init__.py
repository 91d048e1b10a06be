"""saslsmtp: a Twisted SMTP submission daemon with scriptable SASL authentication.

As a library, start at ``saslsmtp.embed`` (docs/library.md lists the public names;
anything else is internal).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
