#!/usr/bin/env bash
# Benchmarks Sallyport side by side with direct connections, rathole and bore on this machine, and
# writes bench/results.md (the table) and bench/results.json (every sample).
# Usage: ./scripts/bench.sh                 full run (3 interleaved rounds), release build
#        ./scripts/bench.sh --quick         one short round
#        ./scripts/bench.sh --dev --quick   the short round on the dev build that ./scripts/test.sh
#                                           made (CI runs this so the harness cannot rot: its
#                                           correctness checks count, its figures do not)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
profile=release
if [ "${1:-}" = "--dev" ]; then
    profile=debug
    shift
fi
./scripts/bench-tools.sh
if [ "$profile" = release ]; then
    cargo build --release --quiet -p sallyport-relay -p sallyport-agent -p sallyport-tests --bins
else
    cargo build --quiet -p sallyport-relay -p sallyport-agent -p sallyport-tests --bins
fi
echo "tools and $profile build: $((SECONDS - start)) s"
# 10,000 idle connections through a tunnel need a few tens of thousands of descriptors.
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "open files limit: $(ulimit -n)"
"target/$profile/sallyport-bench" "$@"
echo "benchmark total: $((SECONDS - start)) s"
