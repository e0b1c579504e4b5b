#!/usr/bin/env bash
# `just bench-tls [REPS]`: what TLS costs. PUT and linearizable GET at 64 clients to the leader
# (100-byte values), on a fresh five-host cluster with TLS (the default: mutual TLS between
# hosts, the operator's certificate from the client) and one started with --insecure, taking
# turns REPS times (default 3) in one run; prints the median (min-max) ops/s of each and the
# ratio, and the hosts' guest-signature check time from their logs.
#   BENCH_SECONDS  measured seconds per scenario (default 5)   BENCH_WARMUP  unmeasured (1)
set -euo pipefail
cd "$(dirname "$0")/.."
reps="${1:-3}"
secs="${BENCH_SECONDS:-5}"
warmup="${BENCH_WARMUP:-1}"
dir=$(mktemp -d /tmp/waxos-bench-tls.XXXXXX)
source scripts/lib/bench-cluster.sh
trap 'stop_cluster; rm -rf "$dir"' EXIT
results="$dir/results.jsonl"
for rep in $(seq 1 "$reps"); do
  for mode in tls insecure; do
    if [ "$mode" = insecure ]; then BENCH_INSECURE=1; waxos_flags=(--insecure); else BENCH_INSECURE=0; waxos_flags=(); fi
    for scenario in "put --mix put=100" "get --mix get=100 --prefill"; do
      read -r name mix <<< "$scenario"
      start_cluster
      [ "$mode" = tls ] && grep -ho 'verified in [0-9.]* ms' "$dir"/*.log >> "$dir/signature.txt" || true
      json=$(RUST_LOG=off timeout $((secs + warmup + 180)) "$waxos" ${waxos_flags[@]+"${waxos_flags[@]}"} 127.0.0.1 50061 \
        --timeout-ms 10000 bench --target leader --clients 64 --duration "$secs" --warmup "$warmup" --keys 1000 \
        --value-size 100 --json $mix)
      echo "{\"mode\": \"$mode\", \"op\": \"$name\", \"rep\": $rep, \"result\": $json}" >> "$results"
      printf 'round %s %-8s %-3s %8.0f ops/s\n' "$rep" "$mode" "$name" \
        "$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["ops_per_s"])' "$json")" >&2
    done
  done
done
python3 - "$results" "$dir/signature.txt" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def figs(mode, op):
    return [r["result"]["ops_per_s"] for r in rows if r["mode"] == mode and r["op"] == op]
print(f"{'64 clients, 100 B':<20} {'TLS ops/s':>22} {'--insecure ops/s':>22} {'TLS/insecure':>13}")
for op, label in (("put", "PUT@64"), ("get", "lin. GET@64")):
    t, i = figs("tls", op), figs("insecure", op)
    tm, im = statistics.median(t), statistics.median(i)
    print(f"{label:<20} {tm:>10.0f} ({min(t):.0f}-{max(t):.0f}) {im:>10.0f} ({min(i):.0f}-{max(i):.0f}) {tm / im:>12.2f}")
try:
    ms = [float(l.split()[2]) for l in open(sys.argv[2]) if l.strip()]
    print(f"guest signature check at host start: median {statistics.median(ms):.2f} ms ({min(ms):.2f}-{max(ms):.2f}, {len(ms)} starts)")
except (FileNotFoundError, ValueError, statistics.StatisticsError):
    pass
PY
