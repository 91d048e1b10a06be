"""Example AUTH script: a three-round custom mechanism, password then TOTP code.

    [auth]
    mechanisms = ["X-PASSWORD-TOTP"]
    script = "auth_totp.py"
    backends = ["users"]
    require_tls = false        # for a demo without [tls]: the password crosses the wire,
                               # so the mechanism is hidden before TLS otherwise

The exchange (each payload base64 on the wire, as always):

    C: AUTH X-PASSWORD-TOTP [base64(username)]
    S: 334 "Username:"        (only without an initial response)
    C: username
    S: 334 "Password:"
    C: password               -> checked against the "users" backend
    S: 334 "Code:"
    C: 6-digit TOTP code      -> RFC 6238, 30 s steps, one step of clock skew allowed
    S: 235 2.7.0 ...

The TOTP secrets (base32, as authenticator apps take them) are listed below for the demo.
"""

import base64
import hashlib
import hmac
import struct
import time

from saslsmtp.script import Accept, Defer, Reject, Reply, Verdict

MECHANISMS = ["X-PASSWORD-TOTP"]
BACKEND = "users"
TOTP_SECRETS = {"demo": "JBSWY3DPEHPK3PXP"}


def totp(secret_b32, at=None, step=30, digits=6):
    """RFC 6238 TOTP with HMAC-SHA1 (RFC 4226 dynamic truncation)."""
    counter = int((time.time() if at is None else at) // step)
    key = base64.b32decode(secret_b32.upper())
    mac = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    code = (struct.unpack(">I", mac[offset:offset + 4])[0] & 0x7FFFFFFF) % 10 ** digits
    return f"{code:0{digits}d}"


async def auth(arguments, context):
    state, response = arguments["state"], arguments["response"]
    if state == 0:
        context.pop("totp", None)
        if response is None:
            context["totp"] = {"step": "username"}
            return Reply("Username:")
        context["totp"] = {"step": "username"}
    flow = context.get("totp")
    if flow is None:
        return Reject()
    text = (response or b"").decode("utf-8", "replace")
    if flow["step"] == "username":
        if not text:
            return Reject("Empty username")
        flow.update(step="password", user=text)
        return Reply("Password:")
    if flow["step"] == "password":
        verdict = await arguments["backends"].verify(BACKEND, flow["user"], text)
        if verdict is Verdict.TEMPORARY:
            return Defer()
        flow.update(step="code", password_ok=verdict is Verdict.ACCEPT)
        return Reply("Code:")  # ask for the code even after a bad password: reveal nothing
    if flow["step"] == "code":
        context.pop("totp", None)
        secret = TOTP_SECRETS.get(flow["user"])
        now = time.time()
        valid = secret is not None and any(
            hmac.compare_digest(totp(secret, now + skew), text) for skew in (-30, 0, 30))
        if valid and flow["password_ok"]:
            return Accept(username=flow["user"])
        return Reject()
    return Reject()
