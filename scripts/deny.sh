#!/usr/bin/env bash
# Checks Cargo.lock with cargo-deny, offline: known advisories (RustSec database snapshot in
# ../shared/advisory-db, or ADVISORY_DB), banned crates, licenses and sources (deny.toml). Installs
# cargo-deny into target/tools the first time (built from crates.io). Exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."

db_source=${ADVISORY_DB:-../shared/advisory-db}
if ! [ -d "$db_source/crates" ]; then
    echo "deny.sh: no advisory database at $db_source (set ADVISORY_DB)" >&2
    exit 1
fi
# The version is pinned, so a finding never comes from a new release of the tool itself.
deny_version=0.20.2
deny=target/tools/bin/cargo-deny
if ! "$deny" --version 2>/dev/null | grep -qx "cargo-deny $deny_version"; then
    cargo install --locked --quiet --force --root target/tools cargo-deny --version "$deny_version"
fi

# cargo-deny opens the default database at a path derived from its URL, as a git repository whose
# HEAD commit says how old it is: a copy of the snapshot, committed at the snapshot's date.
db=target/advisory-dbs/advisory-db-3157b0e258782691
snapshot_date=$(sed -n 's/.*(\([0-9-]*\)).*/\1/p' "$db_source/SNAPSHOT.txt" | head -n 1)
rm -rf "$db"
mkdir -p "$db"
cp -R "$db_source/." "$db/"
git -C "$db" init --quiet
git -C "$db" add --all
GIT_AUTHOR_DATE="${snapshot_date}T00:00:00Z" GIT_COMMITTER_DATE="${snapshot_date}T00:00:00Z" \
    git -C "$db" -c user.name=snapshot -c user.email=snapshot@localhost commit --quiet -m snapshot

# The crate graph for every target (Windows included), resolved from the lock file.
cargo metadata --format-version 1 --locked >target/cargo-metadata.json
# How old the advisories are: a reader of the result should know what it could not know.
echo "advisories: RustSec snapshot of $snapshot_date ($db_source/SNAPSHOT.txt), checked offline"
"$deny" --offline --metadata-path target/cargo-metadata.json check --show-stats
