#!/usr/bin/env bash
# Coverage-guided fuzzing of the job options' validation and the key rewrite
# (fuzz/fuzz_targets/rewrite_key.rs) for a bounded time: scripts/fuzz.sh [SECONDS]
# (default 120). Needs a nightly toolchain (libFuzzer instrumentation); installs
# cargo-fuzz if missing. The same property runs on stable in every test run
# (tests/fuzz_rewrite.rs). Exits non-zero on any panic, with the crashing input under
# fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
secs=${1:-120}
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz.sh: a nightly toolchain is needed (rustup toolchain install nightly)" >&2
    exit 2
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo +nightly fuzz run rewrite_key -- -max_total_time="$secs" -max_len=512 -len_control=0
