#!/usr/bin/env bash
# `just bench-memory [MINUTES] [KEYS]`: resident memory of the five hosts (chaos off, ports
# 21071-21075) under steady mixed load (16 clients, put=50,get=50 over 10k keys) for MINUTES
# (default 10), sampled every 30 s — a leak shows as growth — then after writing KEYS distinct
# 100-byte values (default 1,000,000): the bound at that size. One line per sample.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes="${1:-10}"
keys="${2:-1000000}"
waxos=./target/release/waxos
dir=$(mktemp -d /tmp/waxos-memory.XXXXXX)
source scripts/dev-pki.sh
dev_pki 21071 21072 21073 21074 21075
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap 'stop; rm -rf "$dir"' EXIT
for n in 1 2 3 4 5; do
  ./target/release/waxosd 21071 $((21070 + n)) --data-dir "$dir/data/$n" --chaos off \
    --trusted-keys .cluster/trusted-keys $(member_tls $((21070 + n))) 2>"$dir/$n.log" &
  pids+=($!)
  sleep 0.2
done
for _ in $(seq 1 100); do
  RUST_LOG=off "$waxos" 127.0.0.1 21071 --timeout-ms 1000 put __memory_ready__ 1 2>/dev/null && break
  sleep 0.1
done
rss() { for p in "${pids[@]}"; do awk '/^VmRSS/ {printf "%d ", $2 / 1024}' "/proc/$p/status"; done; }
start=$SECONDS
echo "t_s   RSS MiB of hosts 1-5   (steady load: 16 clients, put=50,get=50, 10k keys)"
RUST_LOG=off "$waxos" 127.0.0.1 21071 bench --clients 16 --duration $((minutes * 60)) --mix put=50,get=50 \
  --keys 10000 --json > "$dir/steady.json" &
load=$!
while kill -0 "$load" 2>/dev/null; do
  printf '%-5d %s\n' $((SECONDS - start)) "$(rss)"
  sleep 30
done
wait "$load"
python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(f\"steady load: {j['ops_per_s']:.0f} ops/s, {j['errors']} errors\")" "$dir/steady.json"
echo "writing $keys distinct keys (100-byte values)..."
RUST_LOG=off "$waxos" 127.0.0.1 21071 --timeout-ms 10000 bench --clients 64 --duration 0.001 --keys "$keys" \
  --prefill --mix get=100 --json > /dev/null
RUST_LOG=off "$waxos" 127.0.0.1 21071 status | tail -n +1 | head -8
echo "after $keys keys: RSS MiB of hosts 1-5: $(rss)"
sleep 15
echo "15 s later (compaction/snapshot settled): $(rss)"
