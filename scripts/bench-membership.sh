#!/usr/bin/env bash
# `just bench-membership [KEYS...]` (default 10000 1000000): membership figures (issue 13).
# For each size, a fresh five-host TLS cluster (scripts/lib/bench-cluster.sh) is loaded with KEYS
# keys of 100 bytes (`waxos bench --prefill`), then:
#  1. a sixth host is added: the time from `waxos member add` (which waits for the new host to
#     catch up by snapshot transfer, then promotes it) to promoted, the new host started with
#     `waxosd --join` as soon as the add is chosen;
#  2. write throughput, 16 clients of 100-byte PUTs spread over the members, for 20 s without
#     any change (the baseline), then for 20 s during a replacement: host 5 is killed for good,
#     a new host is added and promoted, and host 5 is removed. Errors are counted (each failed
#     request is one the client gave up on after retrying every member).
set -euo pipefail
cd "$(dirname "$0")/.."
sizes="${*:-10000 1000000}"
dir=$(mktemp -d /tmp/waxos-members.XXXXXX)
source scripts/lib/bench-cluster.sh
dev_pki 50066 50067
trap 'stop_cluster; rm -rf "$dir"' EXIT
w() { RUST_LOG=off "$waxos" ${waxos_flags[@]+"${waxos_flags[@]}"} 127.0.0.1 50061 "$@"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

start_joiner() { # PORT: a new host that joins through host 1
  "$waxosd" 50061 "$1" --data-dir "$dir/data/$1" --chaos off --snapshot-every 1000000 --join 127.0.0.1:50061 \
    ${trust[@]+"${trust[@]}"} $(host_tls "$1") >/dev/null 2>"$dir/$1.log" &
  pids+=($!)
}

add_member() { # PORT: member add (waits for catch-up, then promotes) + the joining host; sets added_ms
  local t0 add
  t0=$(now_ms)
  w member add "127.0.0.1:$1" --wait-secs 1800 >"$dir/add-$1.out" 2>&1 &
  add=$!
  # The add must be chosen before the new host asks for the members.
  for _ in $(seq 1 200); do
    w member list 2>/dev/null | grep -q "127.0.0.1:$1" && break
    sleep 0.1
  done
  start_joiner "$1"
  if ! wait "$add"; then
    echo "member add 127.0.0.1:$1 failed:" >&2; cat "$dir/add-$1.out" >&2; tail -20 "$dir/$1.log" >&2; exit 1
  fi
  added_ms=$(($(now_ms) - t0))
}

field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

results=()
for keys in $sizes; do
  echo "== $keys keys"
  start_cluster
  t0=$(now_ms)
  w bench --clients 64 --keys "$keys" --prefill --duration 1 --mix get=100 --json >"$dir/prefill.json"
  echo "loaded $keys keys in $(( ($(now_ms) - t0) / 1000 )) s"
  add_member 50066
  add_ms=$added_ms
  echo "member add -> promoted: $add_ms ms"
  w bench --clients 16 --keys "$keys" --mix put=100 --duration 20 --json >"$dir/baseline.json"
  base=$(field "$dir/baseline.json" ops_per_s)
  w bench --clients 16 --keys "$keys" --mix put=100 --duration 20 --json >"$dir/replace.json" &
  load=$!
  sleep 3
  kill "${pids[4]}" 2>/dev/null || true
  dead=$(w member list | awk '$2 == "127.0.0.1:50065" {print $1}')
  replace_t0=$(now_ms)
  add_member 50067
  w member remove "$dead" >/dev/null
  replace_ms=$(($(now_ms) - replace_t0))
  wait "$load"
  during=$(field "$dir/replace.json" ops_per_s)
  errors=$(field "$dir/replace.json" errors)
  printf 'replacement (kill host 5, add + promote 127.0.0.1:50067, remove node %s): %d ms\n' "$dead" "$replace_ms"
  printf 'PUT/s, 16 clients: %.0f without changes, %.0f during the replacement (%s errors)\n' "$base" "$during" "$errors"
  results+=("$(printf '| %s | %.1f | %.1f | %.0f | %.0f | %s |' "$keys" "$(echo "$add_ms / 1000" | python3 -c 'print(eval(input()))')" \
    "$(echo "$replace_ms / 1000" | python3 -c 'print(eval(input()))')" "$base" "$during" "$errors")")
  stop_cluster
done
echo
echo "| keys | member add -> promoted (s) | replacement (s) | PUT/s baseline | PUT/s during replacement | errors |"
echo "|---|---|---|---|---|---|"
printf '%s\n' "${results[@]}"
