#!/usr/bin/env bash
# Installs what the test suite needs and a fresh machine may lack. Idempotent: does nothing when
# everything is there. Needs root (or sudo) only when something is missing.
set -euo pipefail

need_cargo_tool() { # binary crate
    command -v "$1" >/dev/null 2>&1 || cargo install --locked "$2"
}

if ! cargo nextest --version >/dev/null 2>&1; then
    need_cargo_tool cargo-nextest cargo-nextest
fi
