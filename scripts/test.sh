#!/usr/bin/env bash
# saslsmtp's test command (README: `bash scripts/test.sh [pytest args...]`).
#
# On a fresh Debian machine it installs what the suite needs and runs it:
#   1. Debian packages for the real peers the tests start on loopback
#      (slapd, dovecot, swaks, gsasl, msmtp, ...). Skipped when every binary is
#      already present. Package maintainer scripts are not allowed to start
#      system services (policy-rc.d), so nothing grabs ports behind our back.
#   2. The project itself, editable, with its test extras. editable_mode=compat
#      is required: the default PEP 660 editable install hides the twistd
#      plugin (docs/twisted-notes.md).
#   3. mypy over saslsmtp/ (configuration in setup.cfg: strict for saslsmtp.sasl,
#      the zope.interface plugin everywhere); any type error fails the run.
#   4. pytest (extra arguments are passed through), bounded by a timeout, in one
#      process per CPU (pytest-xdist; at most 4, SASLSMTP_TEST_PROCESSES overrides,
#      0 = one process): most tests wait on the peers they start, and tests marked
#      `alone` (latency and timeout windows) still run by themselves (tests/alone.py).
# The exit status is mypy's when it fails, else pytest's (5, "no tests collected",
# is a failure too).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO_ROOT=$(pwd)

PYTEST_TIMEOUT=${SASLSMTP_PYTEST_TIMEOUT:-1500}
PIP_TIMEOUT=${SASLSMTP_PIP_TIMEOUT:-900}
APT_TIMEOUT=${SASLSMTP_APT_TIMEOUT:-900}

section() { printf '\n==== %s ====\n' "$*"; }
die() { printf 'scripts/test.sh: %s\n' "$*" >&2; exit 2; }

# Binary the tests run -> Debian package that provides it.
declare -A BINARY_PACKAGE=(
    [swaks]=swaks
    [slapd]=slapd
    [slapadd]=slapd
    [ldapsearch]=ldap-utils
    [ldapadd]=ldap-utils
    [dovecot]=dovecot-core
    [doveadm]=dovecot-core
    [gsasl]=gsasl
    [msmtp]=msmtp
    [curl]=curl
    [openssl]=openssl
    [redis-server]=redis-server
    [fail2ban-regex]=fail2ban
    [postfix]=postfix
    [/usr/lib/dovecot/lmtp]=dovecot-lmtpd
    [systemd-analyze]=systemd
    [systemd-socket-activate]=systemd
    [haproxy]=haproxy
    [setpriv]=util-linux
    [cc]=gcc
    [logrotate]=logrotate
    [mkpasswd]=whois
    [valgrind]=valgrind
    [callgrind_control]=valgrind
)
# Packages that provide no binary of their own but that a binary above needs
# (swaks' --tls needs Net::SSLeay; its CRAM-MD5 needs Authen::SASL-era modules).
LIBRARY_PACKAGES=(libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl)
# Services whose Debian packages would start a daemon on install.
SERVICES=(slapd dovecot redis-server fail2ban postfix haproxy)

have() { PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

running_pids() {
    local name=$1
    [ "$name" = postfix ] && name=/usr/lib/postfix/sbin/master  # Postfix's daemon is "master"
    pidof "$name" 2>/dev/null || true
}

# ---------------------------------------------------------------------------
section "1/4 Debian packages"

PY=${PYTHON:-python3}
in_venv() { "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; }
externally_managed() {
    "$PY" - 2>/dev/null <<'EOF'
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if os.path.exists(marker) and sys.prefix == sys.base_prefix else 1)
EOF
}
# A system Python without pip, or one that refuses pip installs (PEP 668), is
# used through a virtual environment in .venv (git-ignored).
needs_venv() {
    ! in_venv && { externally_managed || ! "$PY" -m pip --version >/dev/null 2>&1; }
}

declare -A MISSING=()
for binary in "${!BINARY_PACKAGE[@]}"; do
    have "$binary" || MISSING[${BINARY_PACKAGE[$binary]}]=1
done
for package in "${LIBRARY_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" \
        || MISSING[$package]=1
done
if ! have "$PY"; then
    MISSING[python3]=1
    MISSING[python3-venv]=1
elif needs_venv && ! "$PY" -c 'import ensurepip' >/dev/null 2>&1; then
    MISSING[python3-venv]=1   # Debian ships ensurepip (needed by venv) separately
fi

if [ "${#MISSING[@]}" -eq 0 ]; then
    echo "all needed binaries present (${!BINARY_PACKAGE[*]}): skipping apt"
else
    command -v apt-get >/dev/null 2>&1 || die "missing packages (${!MISSING[*]}) and no apt-get"
    echo "installing: ${!MISSING[*]}"
    declare -A RUNNING_BEFORE=()
    for service in "${SERVICES[@]}"; do
        [ -n "$(running_pids "$service")" ] && RUNNING_BEFORE[$service]=1
    done
    # Keep maintainer scripts from starting services; restore any existing policy.
    POLICY=/usr/sbin/policy-rc.d
    POLICY_BACKUP=""
    if [ -e "$POLICY" ]; then
        POLICY_BACKUP=$(as_root mktemp /tmp/policy-rc.d.XXXXXX) || die "mktemp failed"
        as_root cp -p "$POLICY" "$POLICY_BACKUP"
    fi
    restore_policy() {
        if [ -n "$POLICY_BACKUP" ]; then
            as_root mv -f "$POLICY_BACKUP" "$POLICY"
        else
            as_root rm -f "$POLICY"
        fi
    }
    trap restore_policy EXIT
    printf '#!/bin/sh\n# scripts/test.sh: no service starts during package installs\nexit 101\n' \
        | as_root tee "$POLICY" >/dev/null
    as_root chmod 755 "$POLICY"

    export DEBIAN_FRONTEND=noninteractive
    # Postfix: no system mailer configuration (the tests run their own instance)
    if [ -n "${MISSING[postfix]:-}" ] && command -v debconf-set-selections >/dev/null 2>&1; then
        echo "postfix postfix/main_mailer_type select No configuration" \
            | as_root debconf-set-selections
    fi
    apt_rc=0
    as_root timeout "$APT_TIMEOUT" apt-get -o Acquire::Retries=3 update -q || apt_rc=$?
    if [ "$apt_rc" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive timeout "$APT_TIMEOUT" \
            apt-get install -y -q --no-install-recommends "${!MISSING[@]}" || apt_rc=$?
    fi
    restore_policy
    trap - EXIT
    # Belt and braces: stop any daemon the install started anyway.
    for service in "${SERVICES[@]}"; do
        if [ -z "${RUNNING_BEFORE[$service]:-}" ] && [ -n "$(running_pids "$service")" ]; then
            echo "stopping $service started by the package install"
            as_root service "$service" stop >/dev/null 2>&1 \
                || as_root kill $(running_pids "$service") 2>/dev/null || true
        fi
    done
    [ "$apt_rc" -eq 0 ] || { echo "apt-get failed with status $apt_rc" >&2; exit "$apt_rc"; }
    for binary in "${!BINARY_PACKAGE[@]}"; do
        have "$binary" || die "$binary still missing after installing ${BINARY_PACKAGE[$binary]}"
    done
fi

# ---------------------------------------------------------------------------
section "2/4 Python packages"

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PY is $("$PY" --version 2>&1); saslsmtp needs Python >= 3.11"
if needs_venv; then
    echo "$PY is a system interpreter (PEP 668 or no pip): using $REPO_ROOT/.venv"
    [ -x .venv/bin/python ] || "$PY" -m venv .venv || die "cannot create .venv"
    PY=$REPO_ROOT/.venv/bin/python
fi
# Tests start `twistd` and console scripts: make the interpreter's bin dir win.
PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH
echo "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

pip_rc=0
PIP_DISABLE_PIP_VERSION_CHECK=1 timeout "$PIP_TIMEOUT" \
    "$PY" -m pip install -q --root-user-action=ignore -e '.[test]' --config-settings editable_mode=compat || pip_rc=$?
[ "$pip_rc" -eq 0 ] || { echo "pip install failed with status $pip_rc" >&2; exit "$pip_rc"; }
# Refresh Twisted's plugin cache so twistd sees saslsmtp without rescanning.
"$PY" -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' \
    >/dev/null 2>&1 || true
# Byte-compile the package and the tests once: with PYTHONDONTWRITEBYTECODE set (as in
# many CI images) each of the suite's few hundred daemon starts would otherwise compile
# every module from source again (a third of a start's CPU).
"$PY" -m compileall -q -j 0 saslsmtp tests benchmarks twisted/plugins >/dev/null \
    || die "cannot byte-compile saslsmtp"

# ---------------------------------------------------------------------------
section "3/4 mypy"

mypy_rc=0
timeout "$PYTEST_TIMEOUT" "$PY" -m mypy || mypy_rc=$?
if [ "$mypy_rc" -ne 0 ]; then
    section "FAILED: mypy found type errors (status $mypy_rc)"
    exit "$mypy_rc"
fi

# ---------------------------------------------------------------------------
section "4/4 pytest"

rc=0
PROCESSES=${SASLSMTP_TEST_PROCESSES:-auto}
timeout "$PYTEST_TIMEOUT" "$PY" -m pytest -q -p no:randomly -p no:benchmark \
    -n "$PROCESSES" --maxprocesses 4 "$@" || rc=$?
case "$rc" in
    0) section "tests passed" ;;
    5) section "FAILED: pytest collected no tests (status 5)" ;;
    124) section "FAILED: pytest exceeded ${PYTEST_TIMEOUT}s and was stopped (status 124)" ;;
    *) section "FAILED: pytest exited with status $rc" ;;
esac
exit "$rc"
