"""Abuse controls: rate windows, shared counters, the limiter facade, the auth cache,
the fair hashing pool and the fail2ban log line.

Each module has one job; the protocol talks only to ``Limiter`` (``limiter.py``) and,
for the password cache, to ``CachingChecker`` (``authcache.py``).  See docs/limits.md.
"""
