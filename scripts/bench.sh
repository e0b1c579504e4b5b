#!/usr/bin/env bash
# `just bench`: the standard scenarios against a fresh five-host waxos cluster (chaos off, on
# 127.0.0.1:50061-50065, data in a temp dir), one fresh cluster per scenario, all traffic sent
# to the leader (as the etcd side does). Prints one table; with BENCH_RESULTS=FILE it also
# appends one JSON line per scenario there (for `just bench-compare`).
#   BENCH_SECONDS  measured seconds per scenario (default 10)   BENCH_WARMUP  unmeasured (2)
#   --group-commit-compare  also a 64-client PUT run against hosts that fsync every record
# Every run is bounded in time; the hosts are stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${BENCH_SECONDS:-10}"
warmup="${BENCH_WARMUP:-2}"
compare=false
[ "${1:-}" = "--group-commit-compare" ] && compare=true
waxos=./target/release/waxos
dir=$(mktemp -d /tmp/waxos-bench.XXXXXX)
results="${BENCH_RESULTS:-$dir/results.jsonl}"
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap 'stop; rm -rf "$dir"' EXIT

start_cluster() { # extra waxosd args (may be none)...
  stop; pids=(); rm -rf "$dir/data"
  for n in 1 2 3 4 5; do
    ./target/release/waxosd 50061 $((50060 + n)) --data-dir "$dir/data/$n" --chaos off --snapshot-every 1000000 "$@" \
      2>"$dir/$n.log" &
    pids+=($!)
    sleep 0.2
  done
  for _ in $(seq 1 100); do
    RUST_LOG=off "$waxos" 127.0.0.1 50061 --timeout-ms 1000 put __bench_ready__ 1 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench: cluster did not come up; logs in $dir" >&2; exit 1
}

rss_mb() { # largest resident size among the hosts, MiB
  local max=0 kb
  for p in "${pids[@]}"; do
    kb=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    [ "${kb:-0}" -gt "$max" ] && max=$kb
  done
  echo $((max / 1024))
}

scenario() { # name, then waxos bench args
  local name="$1"; shift
  start_cluster "${host_args[@]}"
  local json
  json=$(RUST_LOG=off timeout $((secs + warmup + 120)) "$waxos" 127.0.0.1 50061 --timeout-ms 5000 bench \
    --duration "$secs" --warmup "$warmup" --keys 10000 --value-size 100 --target leader --json "$@")
  python3 - "$name" "$json" "$(rss_mb)" "$results" <<'PY'
import json, sys
name, j, rss, results = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
row = {"system": "waxos", "scenario": name, "ops_per_s": j["ops_per_s"], "p50_ms": j["p50_ms"],
       "p90_ms": j["p90_ms"], "p99_ms": j["p99_ms"], "max_ms": j["max_ms"], "errors": j["errors"],
       "rss_mb": rss}
open(results, "a").write(json.dumps(row) + "\n")
print(f"{name:<26} {row['ops_per_s']:>10.0f} {row['p50_ms']:>8.2f} {row['p90_ms']:>8.2f} {row['p99_ms']:>8.2f} "
      f"{row['max_ms']:>8.2f} {row['errors']:>7} {rss:>7}")
PY
}

host_args=()
printf '%-26s %10s %8s %8s %8s %8s %7s %7s\n' "waxos scenario" ops/s p50_ms p90_ms p99_ms max_ms errors rss_MiB
scenario put_c1      --clients 1  --mix put=100
scenario put_c64     --clients 64 --mix put=100
scenario get_lin_c64 --clients 64 --mix get=100 --prefill
scenario get_ser_c64 --clients 64 --mix get=100 --prefill --stale
scenario rw50_c64    --clients 64 --mix put=50,get=50 --prefill
if $compare; then
  host_args=(--sync-every-record)
  scenario put_c64_fsync_every_record --clients 64 --mix put=100
fi
