# Sourced by the benchmark scripts: a fresh five-host waxos cluster on 127.0.0.1:50061-50065
# (chaos off, data under $dir/data), stopped on exit. The caller sets `dir` (a temp dir) and may
# set WAXOSD (default ./target/release/waxosd) to measure another build of the host. The hosts
# trust .cluster/trusted-keys: the guest build signed by `just build` with the dev key
# (WAXOSD_TRUST="" for a host build from before signed builds, which has no --trusted-keys).
# They speak TLS with the dev PKI (.cluster/pki, scripts/dev-pki.sh), which the waxos client
# finds by itself; BENCH_INSECURE=1 starts them with --insecure instead (and the client with it:
# use `$waxos_flags`), to measure what TLS costs. WAXOSD_TLS="" for a host build from before TLS.
# BENCH_SNAPSHOT_EVERY sets --snapshot-every (default 1000000: no compaction while measuring);
# BENCH_METRICS_BASE=P gives host N --metrics-port P+N.
waxos=./target/release/waxos
waxosd="${WAXOSD:-./target/release/waxosd}"
read -r -a trust <<< "${WAXOSD_TRUST---trusted-keys .cluster/trusted-keys}"
source scripts/dev-pki.sh
dev_pki 50061 50062 50063 50064 50065
waxos_flags=()
[ "${BENCH_INSECURE:-0}" = 1 ] && waxos_flags=(--insecure)
host_tls() { # PORT -> this cluster's TLS flags of the host on PORT
  if [ "${BENCH_INSECURE:-0}" = 1 ]; then echo --insecure; else echo "${WAXOSD_TLS-$(member_tls "$1")}"; fi
}
pids=()
stop_cluster() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait "${pids[@]}" 2>/dev/null || true; pids=(); }

start_host() { # N, extra waxosd args (may be none)...: host N (its log appended to $dir/N.log)
  local n=$1; shift
  local metrics=()
  [ -n "${BENCH_METRICS_BASE:-}" ] && metrics=(--metrics-port $((BENCH_METRICS_BASE + n)))
  "$waxosd" 50061 $((50060 + n)) --data-dir "$dir/data/$n" --chaos off --snapshot-every "${BENCH_SNAPSHOT_EVERY:-1000000}" \
    ${trust[@]+"${trust[@]}"} $(host_tls $((50060 + n))) ${metrics[@]+"${metrics[@]}"} "$@" \
    2>>"$dir/$n.log" &
  pids[n - 1]=$!
}

start_cluster() { # extra waxosd args (may be none)...
  stop_cluster; rm -rf "$dir/data"
  for n in 1 2 3 4 5; do
    : >"$dir/$n.log"
    start_host "$n" "$@"
    sleep 0.2
  done
  for _ in $(seq 1 100); do
    RUST_LOG=off "$waxos" ${waxos_flags[@]+"${waxos_flags[@]}"} 127.0.0.1 50061 --timeout-ms 1000 put __bench_ready__ 1 2>/dev/null && return 0
    sleep 0.1
  done
  echo "bench: cluster did not come up; logs in $dir" >&2; exit 1
}

leader_address() { # host:port of the current leader (the status row whose role is leader)
  RUST_LOG=off "$waxos" ${waxos_flags[@]+"${waxos_flags[@]}"} 127.0.0.1 50061 status 2>/dev/null | awk '$4 == "leader" {print $2; exit}'
}

rss_mb() { # largest resident size among the hosts, MiB
  local max=0 kb
  for p in "${pids[@]}"; do
    kb=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    [ "${kb:-0}" -gt "$max" ] && max=$kb
  done
  echo $((max / 1024))
}
