"""Onward delivery to an upstream SMTP or LMTP server (``[delivery] type = "smtp"|"lmtp"``).

``wire`` is the sans-I/O part (reply parsing, xtext, dot-stuffing, passing a reply on);
``options`` parses the ``[delivery]`` keys; ``connection`` is one upstream connection,
``transaction`` the per-message ``UpstreamTransaction`` the SMTP server drives, ``client``
the handshake and the pool.
"""
