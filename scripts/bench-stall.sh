#!/usr/bin/env bash
# `just bench-stall [SECONDS]`: memory of a follower whose disk stalls under load (issue 17).
# Five hosts on 127.0.0.1:21081-21085, each on the fault-injecting disk
# (host/tests/faultdisk/faultdisk.c, LD_PRELOAD; faults only while a per-host file exists).
# One follower's WAL fdatasync is stalled for SECONDS (default 60) while 32 clients write 1 KiB
# values through the leader; its resident size is sampled every 5 s (the bound:
# sync_pipeline::BACKLOG_BYTES_MAX of backlog, then it turns work away). Then the disk comes
# back and the time to catch up is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
waxos=./target/release/waxos
dir=$(mktemp -d /tmp/waxos-stall.XXXXXX)
source scripts/dev-pki.sh
dev_pki 21081 21082 21083 21084 21085
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap 'stop; rm -rf "$dir"' EXIT
cc -shared -fPIC -O2 -o "$dir/faultdisk.so" host/tests/faultdisk/faultdisk.c -ldl
for n in 1 2 3 4 5; do
  LD_PRELOAD="$dir/faultdisk.so" FAULTDISK_PATH=/wal/ FAULTDISK_MODE="stall-while:$dir/stall-$n" \
    ./target/release/waxosd 21081 $((21080 + n)) --data-dir "$dir/data/$n" --chaos off \
    --trusted-keys .cluster/trusted-keys $(member_tls $((21080 + n))) 2>"$dir/$n.log" &
  pids+=($!)
  sleep 0.2
done
for _ in $(seq 1 100); do
  RUST_LOG=off "$waxos" 127.0.0.1 21081 --timeout-ms 1000 put __stall_ready__ 1 2>/dev/null && break
  sleep 0.1
done
leader=$(RUST_LOG=off "$waxos" 127.0.0.1 21081 status 2>/dev/null | awk '$4 == "leader" {print $2; exit}')
stalled=5
[ "$leader" = "127.0.0.1:21085" ] && stalled=4
pid=${pids[$((stalled - 1))]}
rss() { awk '/^VmRSS/ {printf "%d", $2 / 1024}' "/proc/$1/status"; }
echo "stalled follower: host $stalled (leader $leader); RSS before: $(rss "$pid") MiB"
touch "$dir/stall-$stalled"
RUST_LOG=off "$waxos" 127.0.0.1 21081 bench --clients 32 --duration "$seconds" --value-size 1024 --mix put=100 \
  --target leader --json > "$dir/load.json" &
load=$!
start=$SECONDS
echo "t_s   RSS MiB of the stalled follower   (32 clients, 1 KiB PUTs through the leader)"
peak=0
while kill -0 "$load" 2>/dev/null; do
  r=$(rss "$pid"); [ "$r" -gt "$peak" ] && peak=$r
  printf '%-5d %s\n' $((SECONDS - start)) "$r"
  sleep 5
done
wait "$load"
python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(f\"load: {j['ops_per_s']:.0f} PUT/s, {j['errors']} errors\")" "$dir/load.json"
echo "peak RSS of the stalled follower: $peak MiB; turned-away notices: $(grep -c 'disk behind' "$dir/$stalled.log" || true)"
rm -f "$dir/stall-$stalled"
unstalled=$SECONDS
for _ in $(seq 1 600); do
  RUST_LOG=off "$waxos" 127.0.0.1 $((21080 + stalled)) --timeout-ms 1000 put __stall_done__ 1 2>/dev/null && break
  sleep 0.1
done
echo "disk back: host $stalled serves a write again after $((SECONDS - unstalled)) s; RSS $(rss "$pid") MiB"
