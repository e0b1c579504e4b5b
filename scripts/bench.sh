#!/usr/bin/env bash
# `just bench`: the standard scenarios against a fresh five-host waxos cluster (chaos off, on
# 127.0.0.1:50061-50065, data in a temp dir), one fresh cluster per scenario, at every value
# size of BENCH_SIZES: PUT and linearizable GET at 1 and 64 clients to the leader, and GET at 64
# clients spread over all members; at 100 B also serializable GET and a 50/50 mix. Prints one
# table; with BENCH_RESULTS=FILE it also appends one JSON line per scenario there (for `just
# bench-compare`). The latency-by-size probe is `just bench-latency`.
#   BENCH_SECONDS  measured seconds per scenario (default 5)   BENCH_WARMUP  unmeasured (1)
#   BENCH_SIZES    value sizes in bytes (default "100 1000 16384 262144")   BENCH_KEYS (1000)
#   --group-commit-compare  also a 64-client PUT run against hosts that fsync every record
# Every run is bounded in time; the hosts are stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${BENCH_SECONDS:-5}"
warmup="${BENCH_WARMUP:-1}"
sizes="${BENCH_SIZES:-100 1000 16384 262144}"
keys="${BENCH_KEYS:-1000}"
compare=false
[ "${1:-}" = "--group-commit-compare" ] && compare=true
dir=$(mktemp -d /tmp/waxos-bench.XXXXXX)
source scripts/lib/bench-cluster.sh
results="${BENCH_RESULTS:-$dir/results.jsonl}"
trap 'stop_cluster; rm -rf "$dir"' EXIT

scenario() { # name, value size, then waxos bench args
  local name="$1" size="$2"; shift 2
  start_cluster "${host_args[@]}"
  local json
  json=$(RUST_LOG=off timeout $((secs + warmup + 180)) "$waxos" ${waxos_flags[@]+"${waxos_flags[@]}"} 127.0.0.1 50061 --timeout-ms 10000 bench \
    --duration "$secs" --warmup "$warmup" --keys "$keys" --value-size "$size" --json "$@")
  python3 - "$name" "$size" "$json" "$(rss_mb)" "$results" <<'PY'
import json, sys
name, size, j, rss, results = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
row = {"system": "waxos", "scenario": name, "value_bytes": size, "ops_per_s": j["ops_per_s"], "p50_ms": j["p50_ms"],
       "p90_ms": j["p90_ms"], "p99_ms": j["p99_ms"], "max_ms": j["max_ms"], "errors": j["errors"], "rss_mb": rss}
open(results, "a").write(json.dumps(row) + "\n")
print(f"{name:<28} {size:>7} {row['ops_per_s']:>10.0f} {row['p50_ms']:>8.2f} {row['p90_ms']:>8.2f} "
      f"{row['p99_ms']:>8.2f} {row['max_ms']:>8.2f} {row['errors']:>7} {rss:>7}")
PY
}

host_args=()
printf '%-28s %7s %10s %8s %8s %8s %8s %7s %7s\n' "waxos scenario" value ops/s p50_ms p90_ms p99_ms max_ms errors rss_MiB
for size in $sizes; do
  scenario put_c1             "$size" --target leader --clients 1  --mix put=100
  scenario put_c64            "$size" --target leader --clients 64 --mix put=100
  scenario get_lin_c1         "$size" --target leader --clients 1  --mix get=100 --prefill
  scenario get_lin_c64        "$size" --target leader --clients 64 --mix get=100 --prefill
  scenario get_lin_c64_spread "$size"                 --clients 64 --mix get=100 --prefill
done
scenario get_ser_c64 100 --target leader --clients 64 --mix get=100 --prefill --stale
scenario rw50_c64    100 --target leader --clients 64 --mix put=50,get=50 --prefill
if $compare; then
  host_args=(--sync-every-record)
  scenario put_c64_fsync_every_record 100 --target leader --clients 64 --mix put=100
fi
