#!/usr/bin/env bash
# `just bench-scale [KEYS]` (default 1000000): large state without stalls (issue 14). A fresh
# five-host TLS cluster (scripts/lib/bench-cluster.sh) with compaction ON as shipped
# (--snapshot-every 20000 and the log-to-snapshot ratio) and metrics on ports 9131-9135:
#  1. load: KEYS keys of 100 bytes written once by 64 clients (`waxos bench --prefill`);
#  2. a rolling hot swap of all five hosts, leader included, while 8 clients keep writing and
#     reading; each swap's pause as the host reports it;
#  3. a restart: a follower is killed (SIGKILL) and started again: the time to read its data dir
#     and start its guest from the snapshot + WAL (restart_ms), and from the process's launch to
#     its guest running (process_restart_ms: also compiles the signed build, no compiled cache).
# Figures: leader changes (the most any host counted, waxos_leader_changes_total) during the
# load and during the swaps, the longest step-loop turn on any host (waxos_turn_longest_seconds)
# and the longest compaction pause on a loop (host logs), swap pauses, restart time, resident
# memory per host against the raw data size. Last line: one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."
keys="${1:-1000000}"
value_size=100
dir=$(mktemp -d /tmp/waxos-scale.XXXXXX)
export BENCH_SNAPSHOT_EVERY=20000 BENCH_METRICS_BASE=9130
source scripts/lib/bench-cluster.sh
trap 'kill $(jobs -p) 2>/dev/null; stop_cluster; [ -n "${BENCH_KEEP:-}" ] && echo "kept $dir" || rm -rf "$dir"' EXIT
w() { RUST_LOG=off "$waxos" ${waxos_flags[@]+"${waxos_flags[@]}"} 127.0.0.1 "$@"; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
metric() { # N NAME: the unlabelled sample NAME of host N (0 when absent)
  curl -s "127.0.0.1:$((BENCH_METRICS_BASE + $1))/metrics" | awk -v m="$2" '$1 == m {print $2; found=1} END {if (!found) print 0}'
}
leader_changes() { # the most leader changes any host counted so far
  local max=0 c
  for n in 1 2 3 4 5; do
    c=$(metric "$n" waxos_leader_changes_total); c=${c%.*}
    [ "${c:-0}" -gt "$max" ] && max=$c
  done
  echo "$max"
}
longest_turn_ms() {
  local all=""
  for n in 1 2 3 4 5; do all="$all $(metric "$n" waxos_turn_longest_seconds)"; done
  python3 -c 'import sys; print(round(max(float(x) for x in sys.argv[1:]) * 1e3, 1))' $all
}
turns_over_20ms() { # "N of M": step-loop turns over 20.48 ms, and all turns, summed over the hosts
  local over=0 all=0 c b
  for n in 1 2 3 4 5; do
    c=$(metric "$n" waxos_turn_duration_seconds_count); b=$(curl -s "127.0.0.1:$((BENCH_METRICS_BASE + n))/metrics" | awk '$1 == "waxos_turn_duration_seconds_bucket{le=\"0.02048\"}" {print $2}')
    c=${c%.*}; b=${b%.*}
    over=$((over + ${c:-0} - ${b:-0})); all=$((all + ${c:-0}))
  done
  echo "$over of $all"
}
rss_all() { # resident MiB of each host, space-separated
  local out="" kb
  for p in "${pids[@]}"; do
    kb=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    out="$out $((kb / 1024))"
  done
  echo "$out"
}
sample_rss() { # FILE: every second, the largest host's resident MiB, until killed
  while true; do rss_mb >>"$1"; sleep 1; done
}
max_of() { sort -n "$1" | tail -1; }
node_of_port() { # PORT -> node id (the status row with that address)
  w 50061 status 2>/dev/null | awk -v a="127.0.0.1:$1" '$2 == a {print $1; exit}'
}

echo "== bench-scale: $keys keys of $value_size bytes, compaction on (--snapshot-every $BENCH_SNAPSHOT_EVERY)"
start_cluster
t0=$(now_ms)
sample_rss "$dir/rss-load" & sampler=$!
w 50061 bench --clients 64 --keys "$keys" --value-size "$value_size" --prefill --duration 1 --mix get=100 --timeout-ms 10000 --json >"$dir/load.json"
kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
load_s=$(( ($(now_ms) - t0) / 1000 ))
load_changes=$(leader_changes)
load_turn=$(longest_turn_ms)
load_rss=$(max_of "$dir/rss-load")
compactions=$(cat "$dir"/[1-5].log | grep -c 'compacted .* off the step loop' || true)
compaction_loop_ms=$(cat "$dir"/[1-5].log | grep -oE '(on the loop: WAL rolled to segment [0-9]+ in|; on the loop:) [0-9.]+ ms' | grep -oE '[0-9.]+ ms' | sort -n | tail -1 | cut -d' ' -f1 || true)
snapshot_mb=$(cat "$dir"/[1-5].log | grep -oE 'into a [0-9]+-byte snapshot' | grep -oE '[0-9]+' | sort -n | tail -1 || true)
snapshot_mb=$(( ${snapshot_mb:-0} / 1048576 ))
echo "loaded in ${load_s} s; leader changes $load_changes; longest step-loop turn ${load_turn} ms; $compactions compactions off the loop (longest on-loop part ${compaction_loop_ms:-0} ms; last snapshot $snapshot_mb MiB); largest host RSS $load_rss MiB"
rss_after_load=$(rss_all)

echo "== rolling hot swap of the five hosts at $keys keys, 8 clients writing and reading"
build=target/wasm32-wasip2/guest/waxos_guest.wasm
[ -f target/guest-variants/relabeled.wasm ] && build=target/guest-variants/relabeled.wasm
scripts/dev-signing.sh "$build" >/dev/null  # a variant rebuilt since it was last signed
before=$(leader_changes)
# The waxos process itself in the background (not the `w` function: its subshell's kill would
# leave the client running); the run ends by itself soon after the swaps anyway.
RUST_LOG=off "$waxos" ${waxos_flags[@]+"${waxos_flags[@]}"} 127.0.0.1 50061 bench --clients 8 --keys "$keys" \
  --value-size "$value_size" --mix put=50,get=50 --duration 60 --json >"$dir/swap-load.json" 2>/dev/null &
load=$!
: >"$dir/rss-swap"
sample_rss "$dir/rss-swap" & sampler=$!
sleep 3
pauses=()
for port in 50061 50062 50063 50064 50065; do
  out=$(w "$port" --json swap "$build" 2>&1) || { echo "swap at $port failed: $out" >&2; exit 1; }
  pause=$(echo "$out" | python3 -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])["pause_ms"])')
  pauses+=("$pause")
  echo "  127.0.0.1:$port: pause $pause ms"
  sleep 3
done
kill "$load" 2>/dev/null; wait "$load" 2>/dev/null || true
kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null || true
swap_changes=$(( $(leader_changes) - before ))
swap_pause=$(printf '%s\n' "${pauses[@]}" | sort -n | tail -1)
swap_rss=$(max_of "$dir/rss-swap")
all_turn=$(longest_turn_ms)
slow_turns=$(turns_over_20ms)
staged=$(cat "$dir"/[1-5].log | grep -c 'hot swap (staged)' || true)
sleep 2
rss_after_swap=$(rss_all)
echo "swap pauses (ms): ${pauses[*]}; $staged of 5 staged; leader changes during the swaps: $swap_changes; largest host RSS during the swaps $swap_rss MiB"

echo "== restart of a follower from its snapshot + WAL"
leader=$(leader_address)
n=2
[ "$leader" = "127.0.0.1:50062" ] && n=3
kill -9 "${pids[n - 1]}"; wait "${pids[n - 1]}" 2>/dev/null || true
lines=$(wc -l <"$dir/$n.log")
t0=$(now_ms)
start_host "$n"
restart_ms=""
for _ in $(seq 1 600); do
  if tail -n +"$((lines + 1))" "$dir/$n.log" | grep -q 'guest .* started from'; then restart_ms=$(($(now_ms) - t0)); break; fi
  sleep 0.01
done
guest_start=$(tail -n +"$((lines + 1))" "$dir/$n.log" | grep -oE 'started from .* WAL records in [0-9]+ ms' | tail -1 || true)
read_ms=$(tail -n +"$((lines + 1))" "$dir/$n.log" | grep -oE 'data dir read in [0-9]+ ms' | grep -oE '[0-9]+' | tail -1 || true)
start_ms=$(echo "$guest_start" | grep -oE '[0-9]+ ms$' | grep -oE '[0-9]+' || true)
state_ms=$(( ${read_ms:-0} + ${start_ms:-0} ))
echo "host $n: state restarted in $state_ms ms (data dir read ${read_ms:-?} ms, guest $guest_start); guest running ${restart_ms:-?} ms after the process launched (that includes compiling the signed build)"
sleep 3
rss_final=$(rss_all)

raw_mb=$(( keys * (${#keys} + 6 + value_size) / 1048576 ))
echo
echo "| figure | value |"
echo "|---|---|"
echo "| keys (raw data: keys + values) | $keys ($raw_mb MiB) |"
echo "| load time (64 clients) | $load_s s |"
echo "| leader changes while loading | $load_changes |"
echo "| longest step-loop turn while loading | $load_turn ms |"
echo "| compactions off the loop / longest on-loop part | $compactions / ${compaction_loop_ms:-0} ms |"
echo "| last snapshot | $snapshot_mb MiB |"
echo "| swap pauses (5 hosts) | ${pauses[*]} ms ($staged staged) |"
echo "| leader changes during the rolling swap | $swap_changes |"
echo "| longest step-loop turn, load and swaps | $all_turn ms |"
echo "| step-loop turns over 20 ms, load and swaps (all hosts) | $slow_turns |"
echo "| restart from snapshot + WAL (read + guest start) | $state_ms ms |"
echo "| process launch to guest running (compiles the signed build) | ${restart_ms:-?} ms |"
echo "| RSS per host (MiB) after load | $rss_after_load |"
echo "| RSS largest host during load / during swaps | $load_rss / $swap_rss |"
echo "| RSS per host (MiB) after swaps | $rss_after_swap |"
echo "| RSS per host (MiB) after the restart | $rss_final |"
printf '{"keys": %s, "leader_changes": %s, "max_stall_ms": %s, "swap_pause_ms": %s, "restart_ms": %s, "rss_mib": %s, "swap_leader_changes": %s, "raw_mib": %s, "process_restart_ms": %s}\n' \
  "$keys" "$((load_changes + swap_changes))" "$all_turn" "$swap_pause" "$state_ms" "$(echo "$rss_final" | tr ' ' '\n' | sort -n | tail -1)" "$swap_changes" "$raw_mb" "${restart_ms:-null}"
