#!/usr/bin/env bash
# The benchmark: relocator against the S3 ceiling and rclone, in one run on the local
# stack. Usage: scripts/bench.sh [--objects N] [--scaling]   (results in bench-out/)
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
eval "$(scripts/stack.sh env)"
cargo build --release --locked --bin relocator
cargo build --release --locked --features bench --bin bench
exec target/release/bench "$@"
