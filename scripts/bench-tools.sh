#!/usr/bin/env bash
# Installs what the benchmarks need: Debian's wrk, nginx, iperf3, Redis and PostgreSQL (servers and
# their benchmark clients) and the network lab's tools, and the peers rathole (plain and noise) and
# bore-cli built from crates.io into target/bench-tools (release builds, once).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(wrk nginx-light iperf3 redis-server redis-tools postgresql postgresql-client iproute2 iptables conntrack)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

root=target/bench-tools
# rathole with its plain TCP transport and its noise transport (encrypted, no certificates; the
# fair peer of an encrypted tunnel); no TLS, so it needs no OpenSSL. `rathole --genkey` exists only
# with noise, which tells an older plain-only build apart.
# Not --locked: its lockfile pins a `time` release that no longer builds on current Rust.
if ! "$root/bin/rathole" --genkey >/dev/null 2>&1; then
    cargo install --quiet --force --root "$root" rathole --no-default-features --features server,client,noise
fi
[ -x "$root/bin/bore" ] || cargo install --locked --quiet --root "$root" bore-cli
