"""Example AUTH script: CRAM-MD5 for a user list, PLAIN/LOGIN against two backends in order.

Load it with, in saslsmtp.toml:

    [auth]
    mechanisms = ["CRAM-MD5", "PLAIN", "LOGIN"]
    script = "auth_cram_md5.py"

CRAM-MD5 (RFC 2195) is also built in (against a users file's {PLAIN} or {CRAM-MD5}
entries); naming it in MECHANISMS makes this script run it instead, for its own list.
State 0 sends the challenge ``<uuid@hostname>`` and keeps it in the connection's context;
state 1 checks ``user HMAC-MD5(secret, challenge)`` with a constant-time compare.
CRAM-MD5 needs the plaintext secret on the server, so keep this file readable by the
daemon only.
"""

import hashlib
import hmac
import uuid

from saslsmtp.script import Accept, Defer, Reject, Reply, Verdict

MECHANISMS = ["CRAM-MD5"]  # the custom mechanisms this script serves

# CRAM-MD5 needs the plaintext: a demo list.  (A real one would read a protected file.)
SECRETS = {
    "demo": "demo-password",
    "tim": "tanstaaftanstaaf",
}

# PLAIN and LOGIN: these backends, in this order; the first that accepts wins.
PASSWORD_BACKENDS = ["users", "directory"]


async def auth(arguments, context):
    mechanism = arguments["mechanism"]
    if mechanism == "CRAM-MD5":
        return cram_md5(arguments, context)
    if mechanism in ("PLAIN", "LOGIN"):
        return await password(arguments)
    return Reject("Mechanism not served by this script")


def cram_md5(arguments, context):
    if arguments["state"] == 0:
        challenge = f"<{uuid.uuid4()}@{arguments['hostname']}>"
        context["cram_challenge"] = challenge
        return Reply(challenge)
    challenge = context.pop("cram_challenge", None)
    if challenge is None:
        return Reject()
    try:
        user, digest = arguments["response"].decode("utf-8").rsplit(" ", 1)
    except ValueError:
        return Reject("Malformed CRAM-MD5 response")
    secret = SECRETS.get(user)
    # Compare against a digest even for unknown users so both take the same time.
    expected = hmac.new((secret or "x").encode(), challenge.encode(), hashlib.md5).hexdigest()
    if hmac.compare_digest(expected, digest.lower()) and secret is not None:
        return Accept(username=user)
    return Reject()


async def password(arguments):
    temporary = False
    for name in PASSWORD_BACKENDS:
        if name not in arguments["backends"].names:
            continue
        verdict = await arguments["backends"].verify(name, arguments["username"],
                                                     arguments["password"])
        if verdict is Verdict.ACCEPT:
            return Accept()
        temporary = temporary or verdict is Verdict.TEMPORARY
    return Defer() if temporary else Reject()
