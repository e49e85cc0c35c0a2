#!/usr/bin/env bash
# Installs what the test suite needs and a fresh machine may lack: Debian packages for the network
# lab (namespaces, NAT, real servers and clients) and cargo-nextest. Idempotent: installs only what
# is missing. Needs root for apt-get.
set -euo pipefail

packages=(
    iproute2 iptables conntrack procps   # network lab: namespaces, veth, NAT, conntrack, kill
    curl postgresql postgresql-client redis-server redis-tools iperf3 python3   # real servers and clients
    chromium                              # renders the relay's status page, logs in to a terminated HTTPS app
    pebble                                # Let's Encrypt's test ACME server: the relay orders certificates from it
    nginx-light dnsmasq-base bind9-dnsutils openssl   # HTTP/PROXY v2 target, UDP DNS server and dig, TLS targets
    wixl msitools                         # builds the Windows agent's MSI and reads its tables back
    faketime                              # a replica whose wall clock runs ahead (libfaketime)
    fail2ban                              # reads the relay's access log with the shipped filter
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# CrowdSec, to run the shipped parser and scenario over a relay's access log. Debian's package
# registers with CrowdSec's online API when it is configured, which fails offline, so its files
# are unpacked into target/crowdsec instead of installed.
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -x "$root/target/crowdsec/usr/bin/crowdsec" ]; then
    (
        download=$(mktemp -d)
        cd "$download"
        apt-get download crowdsec >/dev/null 2>&1 || { ${sudo:-} apt-get update -qq && apt-get download crowdsec >/dev/null; }
        mkdir -p "$root/target/crowdsec"
        dpkg-deb -x crowdsec_*.deb "$root/target/crowdsec"
        rm -rf "$download"
    )
fi

# Offline validation of the Kubernetes manifests against the cluster's schema version.
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi
# A real NTLM client and server (connection-bound authentication through the HTTP router).
if ! python3 -c 'import spnego' >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check pyspnego
fi
# A real WebSocket client and echo server for the HTTP router's upgrade test.
if ! python3 -c 'import websockets' >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check 'websockets>=12'
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
