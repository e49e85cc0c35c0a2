#!/usr/bin/env bash
# The long forms of the lab's soaks (CI runs them for a minute or two):
#   - no false alarm: an idle tunnel through 20 ms RTT and 2% loss is never declared dead;
#   - mixed transfers through loss, jitter, reordering and duplication, memory flat.
# Usage: ./scripts/soak.sh [seconds]   (default 600 each; needs root for the network lab)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-600}"
cargo build --workspace --bins --quiet
FALSE_ALARM_SECONDS="$seconds" SOAK_SECONDS="$seconds" exec cargo nextest run --profile soak -p sallyport-tests --test lab --test lab_timers \
    --no-capture -E 'test(no_false_alarm_through_twenty_ms_and_two_percent_loss) | test(soak_mixed_traffic_through_impairment)'
