#!/usr/bin/env bash
# The main job end to end on a self-started local stack: start PostgreSQL + Garage,
# seed ~10,000 avatars into s3://legacy-s3/image/, relocate them to
# s3://production-s3/avatar/, verify, and print a summary. Safe to run again: the demo
# table and relocator's ledger are recreated each time.
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

echo "== seed $ROWS avatars (awkward keys, a shared default, 20 rows without an object)" >&2
"$REL" seed --rows "$ROWS" --missing 20 --target s3://legacy-s3/image/

JOB=(--table avatars --source s3://legacy-s3/image/ --dest s3://production-s3/avatar/)

echo "== plan (dry run)" >&2
set +e
"$REL" plan "${JOB[@]}" --out "$OUT/plan.csv"
echo "plan exit code: $? (3 = some rows need attention: the 20 missing objects)" >&2

echo "== run" >&2
"$REL" run "${JOB[@]}" --report "$OUT/report.csv" --summary-json "$OUT/summary.json"
code=$?
echo "run exit code: $code" >&2

echo "== verify" >&2
"$REL" verify "${JOB[@]}" --out "$OUT/verify.csv"
vcode=$?
set -e

echo "== summary" >&2
psql "$DATABASE_URL" -c "SELECT split_part(path, '/', 1) AS prefix, count(*) AS rows FROM avatars GROUP BY 1 ORDER BY 1"
echo "report: $OUT/report.csv  plan: $OUT/plan.csv  verify: $OUT/verify.csv" >&2
# Success for the demo: the run finished (0, or 3 for the seeded missing objects) and
# verify found every moved row in place and nothing left in legacy for them.
if [ "$code" -ne 0 ] && [ "$code" -ne 3 ]; then exit "$code"; fi
if [ "$vcode" -ne 0 ] && [ "$vcode" -ne 3 ]; then exit "$vcode"; fi
