"""The ``ldap`` backend's Twisted-native client (saslsmtp/checkers/ldaptwisted.py).

The behaviour tests of tests/test_checker_ldap.py that do not reach into ldap3 are run
again here, unchanged, against a real slapd with ``TwistedLdapChecker`` (this module's
``make_checker``); then exact-byte transcript tests of the wire client over
``StringTransport`` with a fake clock, and the connection pool on its own.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from saslsmtp.checkers import ldapwire
from saslsmtp.checkers.ldap import LdapOptions, from_config
from saslsmtp.checkers.ldapclient import (LdapConnectionLost, LdapProtocol, LdapTimeout)
from saslsmtp.checkers.ldappool import ConnectionPool, PoolWaitTooLong
from saslsmtp.checkers.ldaptwisted import TwistedDirectory, TwistedLdapChecker
from saslsmtp.checkers.registry import BackendDeps
from tests.slapd import ALICE, BOB, READER_DN, SlapdServer, parse_operations
from tests.test_checker_ldap import (  # noqa: F401  (fixtures and tests run again here)
    TEMPLATE, TIMEOUT, blackhole, captured_log, outcome, search_options, slapd,
    test_template_bind, test_template_escapes_dn_specials, test_template_injection_rejected,
    test_directory_matching_rules_apply, test_search_then_bind,
    test_search_by_mail_and_ambiguity, test_search_anonymous,
    test_search_escapes_filter_specials, test_search_injection_rejected,
    test_wrong_service_password_is_temporary,
    test_template_logins_reuse_a_bounded_set_of_connections,
    test_searches_run_as_the_service_account_only,
    test_empty_or_undecodable_username_rejected, test_require_filter,
    test_identity_attribute_names_the_user,
    test_identity_attribute_with_require_filter_and_missing_values,
    test_ldaps_and_start_tls, test_tls_verification, test_down_then_restarted,
    test_unresponsive_server_times_out, test_failover,
    test_queued_logins_fail_fast_when_directory_hangs,
    test_outage_warned_once_and_recovery_logged)


@pytest.fixture
def make_checker(slapd: SlapdServer) -> Iterator[Callable[..., TwistedLdapChecker]]:
    """Factory: ``make_checker(**options)`` -> a Twisted-native checker on the test
    reactor, stopped afterwards.  Defaults as in tests/test_checker_ldap.py."""
    from twisted.internet import reactor
    made: list[TwistedLdapChecker] = []

    def make(**options: Any) -> TwistedLdapChecker:
        values: dict[str, Any] = {"url": (slapd.url,), "timeout": TIMEOUT, "threads": 4}
        if "search_base" not in options:
            values["user_dn"] = TEMPLATE
        values.update(options)
        checker = TwistedLdapChecker("test", TwistedDirectory(LdapOptions(**values), reactor))
        made.append(checker)
        return checker

    yield make
    for checker in made:
        checker.stop()
