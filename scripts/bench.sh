#!/usr/bin/env bash
# `just bench`: a fresh five-host cluster (chaos off) on 127.0.0.1:50061-50065 in a temp dir,
# the standard scenarios through `waxos bench`, one table. Every run is bounded in time, and the
# cluster is stopped at the end. BENCH_SECONDS sets the length of each scenario (default 10).
# With --group-commit-compare it also runs the 64-client PUT against a cluster that fsyncs
# every WAL record (no group commit).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${BENCH_SECONDS:-10}"
compare=false
[ "${1:-}" = "--group-commit-compare" ] && compare=true
waxos=./target/release/waxos
dir=$(mktemp -d /tmp/waxos-bench.XXXXXX)
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap 'stop; rm -rf "$dir"' EXIT

start_cluster() { # extra waxosd args...
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

row() { # name, then waxos bench args
  local name="$1"; shift
  local json
  json=$(RUST_LOG=off "$waxos" 127.0.0.1 50061 bench --duration "$secs" --json "$@")
  python3 - "$name" "$json" <<'PY'
import json, sys
name, j = sys.argv[1], json.loads(sys.argv[2])
print(f"{name:<34} {j['ops_per_s']:>10.0f} {j['p50_ms']:>8.2f} {j['p90_ms']:>8.2f} {j['p99_ms']:>8.2f} {j['max_ms']:>8.2f} {j['errors']:>7}")
PY
}

printf '%-34s %10s %8s %8s %8s %8s %7s\n' scenario ops/s p50_ms p90_ms p99_ms max_ms errors
start_cluster
wal_before=$(du -sb "$dir/data/1/wal" | cut -f1)
row "PUT, 64 clients"           --clients 64 --mix put=100 --keys 100000
wal_after=$(du -sb "$dir/data/1/wal" | cut -f1)
row "PUT, 1 client"             --clients 1 --mix put=100 --keys 100000
row "GET (linearizable), 64"    --clients 64 --mix get=100 --keys 100000
row "mixed 50/50, 64 clients"   --clients 64 --mix put=50,get=50 --keys 100000
if $compare; then
  start_cluster --sync-every-record
  row "PUT, 64, fsync every record" --clients 64 --mix put=100 --keys 100000
fi
echo "WAL growth on host 1 during the 64-client PUT run: $((wal_after - wal_before)) bytes"
