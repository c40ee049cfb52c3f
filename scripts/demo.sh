#!/usr/bin/env bash
# The main job end to end on a self-started local stack: start PostgreSQL + Garage,
# seed ~10,000 avatars into s3://legacy-s3/image/, relocate them to
# s3://production-s3/avatar/, verify, and print a summary. Safe to run again: the demo
# table, relocator's ledger and both demo prefixes start empty each time.
set -euo pipefail
cd "$(dirname "$0")/.."
unset AWS_CA_BUNDLE
ROWS=${DEMO_ROWS:-10000}
OUT=demo-out
mkdir -p "$OUT"

scripts/stack.sh up
eval "$(scripts/stack.sh env)"
cargo build --release --locked
REL=target/release/relocator

echo "== fresh demo table" >&2
psql "$DATABASE_URL" -qc "DROP TABLE IF EXISTS avatars; DROP SCHEMA IF EXISTS relocator CASCADE" 2>/dev/null

echo "== seed $ROWS avatars (awkward keys, a shared default avatar)" >&2
"$REL" seed --rows "$ROWS" --target s3://legacy-s3/image/ \
    --clear s3://legacy-s3/image/ --clear s3://production-s3/avatar/

JOB=(--table avatars --source s3://legacy-s3/image/ --dest s3://production-s3/avatar/)

echo "== plan (dry run)" >&2
set +e
"$REL" plan "${JOB[@]}" --out "$OUT/plan.csv"
echo "plan exit code: $?" >&2

echo "== run" >&2
"$REL" run "${JOB[@]}" --report "$OUT/report.csv" --summary-json "$OUT/summary.json"
code=$?
echo "run exit code: $code" >&2

echo "== verify (every row against both buckets, and nothing left unreferenced)" >&2
"$REL" verify "${JOB[@]}" --orphans --out "$OUT/verify.csv"
vcode=$?
set -e

echo "== summary" >&2
psql "$DATABASE_URL" -c "SELECT split_part(path, '/', 1) AS prefix, count(*) AS rows FROM avatars GROUP BY 1 ORDER BY 1"
echo "report: $OUT/report.csv  plan: $OUT/plan.csv  verify: $OUT/verify.csv" >&2
# Success: every row moved (run exit 0) and verify found every row's object under
# avatar/ in production-s3 and nothing left under image/ in legacy-s3 (exit 0).
if [ "$code" -ne 0 ]; then echo "demo: run exited $code" >&2; exit "$code"; fi
if [ "$vcode" -ne 0 ]; then echo "demo: verify exited $vcode" >&2; exit "$vcode"; fi
echo "demo: every row points at its object under avatar/ in production-s3; image/ in legacy-s3 is empty" >&2
