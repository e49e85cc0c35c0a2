#!/usr/bin/env bash
# Installs what the benchmarks need: Debian's wrk, nginx and iperf3, and the peers rathole and
# bore-cli built from crates.io into target/bench-tools (release builds, once).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(wrk nginx-light iperf3)
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
# rathole: plain TCP transport only (no TLS or noise), so it needs no OpenSSL.
# Not --locked: its lockfile pins a `time` release that no longer builds on current Rust.
[ -x "$root/bin/rathole" ] || cargo install --quiet --root "$root" rathole --no-default-features --features server,client
[ -x "$root/bin/bore" ] || cargo install --locked --quiet --root "$root" bore-cli
