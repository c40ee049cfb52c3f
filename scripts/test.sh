#!/usr/bin/env bash
# The whole test suite, on a fresh machine or a used one: installs and starts the local
# stack (PostgreSQL + Garage), checks that the stack script is idempotent, then runs
# formatting, lints and every test against the real services.
set -euo pipefail
cd "$(dirname "$0")/.."
# Plain-http loopback endpoint: no CA bundle wanted (see scripts/stack.sh).
unset AWS_CA_BUNDLE

scripts/stack.sh up

# The stack script must be idempotent and restartable without rebuilding Garage.
log=$(mktemp)
scripts/stack.sh up 2>"$log" || { cat "$log" >&2; exit 1; }
grep -q "already running" "$log" || { echo "test.sh: second 'up' did not find the stack running" >&2; cat "$log" >&2; exit 1; }
scripts/stack.sh down 2>/dev/null
scripts/stack.sh up 2>"$log" || { cat "$log" >&2; exit 1; }
if grep -q "building Garage" "$log"; then
    echo "test.sh: 'up' after 'down' rebuilt Garage" >&2
    exit 1
fi
rm -f "$log"
echo "test.sh: stack up/up/down/up ok" >&2

eval "$(scripts/stack.sh env)"
cargo fmt --check
cargo clippy --all-targets --all-features --locked -- -D warnings
cargo test --locked
