#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of every decoder that sees bytes from the network
# or a user: control, stream-header and enrollment frames, tunnel datagrams, the TLS ClientHello
# parser, join tokens, relay.toml and agent.toml, the tunnel over TCP as the relay sees it (link),
# the replicas' bodies (cluster), the state files, certificate requests, Host values (against the
# http crate) and the WSL helper file (fuzz/fuzz_targets/).
#
#   ./scripts/fuzz.sh            20 s per target (what CI runs)
#   ./scripts/fuzz.sh 600        10 minutes per target
#
# Starts from the committed seeds in fuzz/corpus/ and leaves them as they are; a finding is saved
# in fuzz/artifacts/TARGET/ and fails the run. Needs the nightly toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
rustup toolchain list | grep -q '^nightly' || { echo "fuzz.sh: needs the nightly toolchain" >&2; exit 1; }
# Pinned: the same fuzzer build on every machine.
fuzz_version=0.13.2
if ! target/tools/bin/cargo-fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $fuzz_version"; then
    cargo install --locked --quiet --force --root target/tools cargo-fuzz --version "$fuzz_version"
fi
export PATH=$PWD/target/tools/bin:$PATH
cd fuzz
# No sanitizer: the code is safe Rust; what is looked for is panics and broken invariants.
cargo +nightly fuzz build --sanitizer none --release
for target in frames datagrams client_hello join_token config link cluster state_files csr host wsl; do
    work=$(mktemp -d)
    cp -R "corpus/$target/." "$work/"
    log=$(mktemp)
    if ! cargo +nightly fuzz run --sanitizer none --release "$target" "$work" -- \
        -max_total_time="$seconds" -max_len=65536 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz $target: FAILED (input saved under fuzz/artifacts/$target/)" >&2
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    echo "fuzz $target: ${runs:-?} inputs in ${seconds} s, corpus $(find "$work" -type f | wc -l) inputs, no finding"
    rm -rf "$work" "$log"
done
