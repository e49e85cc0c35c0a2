#!/usr/bin/env bash
# Builds the relay's container image, sallyport-relay:VERSION, offline: a statically linked release
# binary (glibc, +crt-static) copied onto an empty base (deploy/docker/Dockerfile).
# Usage: ./scripts/image.sh [tag]
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag=${1:-sallyport-relay:$version}
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release --target "$target" -p sallyport-relay
binary=target/$target/release/sallyport-relay
if readelf -d "$binary" | grep -q NEEDED; then
    echo "image.sh: $binary is not static" >&2
    exit 1
fi
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
# The image carries the binary without its line tables (panics still name the function).
strip -o "$context/sallyport-relay" "$binary"
if ! docker build -f deploy/docker/Dockerfile -t "$tag" "$context" >"$context/build.log" 2>&1; then
    cat "$context/build.log" >&2
    exit 1
fi
echo "built image $tag ($(du -h "$context/sallyport-relay" | cut -f1) static binary)"
