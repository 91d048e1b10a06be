#!/usr/bin/env python3
"""CPU per simple bind of three ways to write an LDAP BindRequest and read its BindResponse,
no network: what the Twisted-native LDAP client (saslsmtp/checkers/ldapwire.py) was chosen on.

    python3 benchmarks/ldap_ber_cpu.py [-n 20000]

* ldapwire: saslsmtp's hand encoder and its BER reader (``ldapwire.decode``);
* ldaptor: ``pureldap.LDAPMessage(LDAPBindRequest).toWire()`` + ``pureber.berDecodeObject``
  with ``LDAPBERDecoderContext_TopLevel`` (what ``ldaptor.protocols.ldap.ldapclient`` does);
* ldap3 (pyasn1): ``bind_operation`` + pyasn1's encoder (what ldap3's connections do per
  bind) + ldapwire's reader.

Also times the search-then-bind SearchRequest (an ``&`` of two equalities) with ldapwire
and ldaptor (optional: skipped when not installed).  Prints microseconds per operation
(process CPU time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from saslsmtp.checkers import ldapwire  # noqa: E402

DN = "uid=alice,ou=people,dc=example,dc=test"
PASSWORD = b"alice-secret-password"
# slapd's answer to a successful bind, message ID 7
RESPONSE = ldapwire.message(7, ldapwire.tlv(0x61, b"\x0a\x01\x00\x04\x00\x04\x00"))


def per_op(n: int, f) -> float:
    start = time.process_time()
    for i in range(n):
        f(i)
    return (time.process_time() - start) / n * 1e6


def ours(i: int) -> None:
    ldapwire.message(i + 1, ldapwire.bind_request(DN.encode(), PASSWORD))
    ldapwire.decode(RESPONSE)


def ldaptor_bind():
    from ldaptor.protocols import pureber, pureldap

    context = pureldap.LDAPBERDecoderContext_TopLevel(
        inherit=pureldap.LDAPBERDecoderContext_LDAPMessage(
            fallback=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext()),
            inherit=pureldap.LDAPBERDecoderContext(fallback=pureber.BERDecoderContext())))

    def run(i: int) -> None:
        pureldap.LDAPMessage(pureldap.LDAPBindRequest(dn=DN, auth=PASSWORD), id=i + 1).toWire()
        pureber.berDecodeObject(context, RESPONSE)
    return run


def ldap3_bind(i: int) -> None:
    from ldap3.operation.bind import bind_operation
    from ldap3.protocol.rfc4511 import LDAPMessage, MessageID, ProtocolOp
    from ldap3.utils.asn1 import encode
    request = bind_operation(3, "SIMPLE", DN, PASSWORD)
    message = LDAPMessage()
    message["messageID"] = MessageID(i + 1)
    message["protocolOp"] = ProtocolOp().setComponentByName("bindRequest", request)
    encode(message)
    ldapwire.decode(RESPONSE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=20000)
    n = p.parse_args().n
    print(f"bind request + response, us per bind (n={n}):")
    print(f"  ldapwire (hand encoder + reader):            {per_op(n, ours):7.1f}")
    try:
        import ldaptor  # noqa: F401  # optional: pip install ldaptor
    except ImportError:
        print("  ldaptor: not installed (pip install ldaptor)")
        have_ldaptor = False
    else:
        have_ldaptor = True
        print(f"  ldaptor pureldap/pureber:                    {per_op(n, ldaptor_bind()):7.1f}")
    print(f"  ldap3 pyasn1 encoder + ldapwire reader:      {per_op(n // 10, ldap3_bind):7.1f}")
    compiled = ldapwire.compile_filter("(&(objectClass=inetOrgPerson)(uid={username}))", True)
    shape = ldapwire.SearchShape.of(ldapwire.SCOPE_SUBTREE, 2, ("1.1",))
    base = b"ou=people,dc=example,dc=test"

    def our_search(i: int) -> None:
        ldapwire.message(i + 1, shape.request(base, compiled.encode(b"alice")))

    def ldaptor_search(i: int) -> None:
        from ldaptor.protocols import pureldap
        pureldap.LDAPMessage(pureldap.LDAPSearchRequest(
            baseObject=base, scope=pureldap.LDAP_SCOPE_wholeSubtree, sizeLimit=2,
            filter=pureldap.LDAPFilter_and([
                pureldap.LDAPFilter_equalityMatch(
                    attributeDesc=pureldap.LDAPAttributeDescription("objectClass"),
                    assertionValue=pureldap.LDAPAssertionValue("inetOrgPerson")),
                pureldap.LDAPFilter_equalityMatch(
                    attributeDesc=pureldap.LDAPAttributeDescription("uid"),
                    assertionValue=pureldap.LDAPAssertionValue("alice"))]),
            attributes=["1.1"]), id=i + 1).toWire()
    print("search request encoding, us per request:")
    print(f"  ldapwire: {per_op(n, our_search):7.1f}")
    if have_ldaptor:
        print(f"  ldaptor:  {per_op(n, ldaptor_search):7.1f}")


if __name__ == "__main__":
    main()
