#!/usr/bin/env bash
# The benchmark. With no mode flag: the README's table — the S3 ceiling, rclone move,
# relocator run and the per-object script pattern, each alone, in a rotating order, three
# repetitions, on a table with and without an index on the path column, on both server
# configurations the stack starts (Garage with SQLite metadata, and with LMDB).
#   scripts/bench.sh [--objects N] [--reps R] [--out DIR] [--before BINARY]
# (results in bench-out/; --before adds an earlier relocator binary to the rotation).
# Other modes pass straight to the bench binary: --chart (objects/s over time), --scaling
# (peak RSS of every command), --workers (two processes on one table).
set -euo pipefail
cd "$(dirname "$0")/.."
unset AWS_CA_BUNDLE

missing=()
command -v rclone >/dev/null || missing+=(rclone)
[ -x /usr/bin/time ] || missing+=(time)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

scripts/stack.sh up
scripts/stack.sh lmdb-up
eval "$(scripts/stack.sh env)"
cargo build --release --locked --bin relocator
cargo build --release --locked --features bench --bin bench

out=bench-out
mode=matrix
prev=""
for a in "$@"; do
    case "$a" in
        --chart | --scaling | --workers) mode=other ;;
    esac
    [ "$prev" = "--out" ] && out=$a
    prev=$a
done
if [ "$mode" = other ]; then
    exec target/release/bench "$@"
fi

state=${RELOCATOR_STACK_DIR:-.stack}
target/release/bench --label garage-sqlite --server-pid "$(cat "$state/garage/pid")" "$@"
AWS_ENDPOINT_URL=$RELOCATOR_BENCH_LMDB_ENDPOINT \
    AWS_ACCESS_KEY_ID=$RELOCATOR_BENCH_LMDB_KEY_ID \
    AWS_SECRET_ACCESS_KEY=$RELOCATOR_BENCH_LMDB_SECRET \
    target/release/bench --label garage-lmdb --server-pid "$(cat "$state/garage-lmdb/pid")" "$@"
echo
echo "measured $(date -u +%Y-%m-%d) with: scripts/bench.sh $*"
target/release/bench --table "$out/matrix-garage-sqlite.json" "$out/matrix-garage-lmdb.json"
