#!/usr/bin/env bash
# `just bench-compare [REPS]`: waxos and etcd back to back, REPS times (default 3), on this
# machine; prints per scenario the median (min-max) of each and the ratios against the targets.
set -euo pipefail
cd "$(dirname "$0")/.."
reps="${1:-3}"
out=$(mktemp /tmp/waxos-vs-etcd.XXXXXX.jsonl)
for rep in $(seq 1 "$reps"); do
  echo "== round $rep of $reps" >&2
  BENCH_RESULTS="$out" scripts/bench.sh >&2
  BENCH_RESULTS="$out" scripts/bench-etcd.sh >&2
done
python3 scripts/bench-table.py "$out"
echo "raw results: $out"
