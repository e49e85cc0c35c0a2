#!/usr/bin/env bash
# Runs the whole test suite: installs what is missing, builds every binary, runs every test.
# Usage: ./scripts/test.sh [extra cargo-nextest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --workspace --bins --quiet
# The relay's container image, for the test that runs it (needs a Docker engine).
if docker version >/dev/null 2>&1; then
    ./scripts/image.sh
fi
profile=default
[ "${CI:-}" = "true" ] && profile=ci
exec cargo nextest run --workspace --profile "$profile" "$@"
