#!/usr/bin/env bash
# Benchmarks Sallyport side by side with direct connections, rathole and bore on this machine, and
# writes bench/results.md (the table) and bench/results.json (every sample).
# Usage: ./scripts/bench.sh            full run (3 interleaved rounds)
#        ./scripts/bench.sh --quick    one short round (CI runs this so the harness cannot rot)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
./scripts/bench-tools.sh
cargo build --release --quiet -p sallyport-relay -p sallyport-agent -p sallyport-tests --bins
echo "tools and release build: $((SECONDS - start)) s"
# 10,000 idle connections through a tunnel need a few tens of thousands of descriptors.
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "open files limit: $(ulimit -n)"
target/release/sallyport-bench "$@"
echo "benchmark total: $((SECONDS - start)) s"
