"""One ``ICredentialsChecker`` per backend, and the chain that tries them in order.

Contract for every backend checker:

* ``credentialInterfaces = (IUsernamePassword,)``; ``requestAvatarId(credentials)``
  returns a Deferred firing with the username as bytes on success.
* wrong credentials (unknown user included): fail with ``UnauthorizedLogin``;
* anything else (server down, timeout, bad answer): fail with
  ``saslsmtp.errors.TemporaryFailure`` (any other exception is treated the same);
* never block the reactor: blocking libraries run through a ``BlockingRunner``;
* never put a password in a log line, exception message or repr.
"""
