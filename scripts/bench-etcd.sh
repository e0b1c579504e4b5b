#!/usr/bin/env bash
# `just bench-etcd`: the scenarios of `just bench` against a five-member etcd 3.4 (Debian's
# `etcd-server`) on 127.0.0.1, with the shared load generator `etcd-bench` (closed loop, one
# connection per client, the same value sizes and key space as bench.sh). Installs
# etcd-server (and protoc, which etcd-bench's build needs) from Debian's packages when
# missing; builds etcd-bench from ETCD_BENCH_SRC (default ../shared/tools/etcd-bench) into
# target/etcd-bench. One fresh etcd cluster per scenario. Same env knobs as bench.sh
# (BENCH_SECONDS, BENCH_WARMUP, BENCH_RESULTS).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${BENCH_SECONDS:-5}"
warmup="${BENCH_WARMUP:-1}"
sizes="${BENCH_SIZES:-100 1000 16384 262144}"
keys="${BENCH_KEYS:-1000}"
src="${ETCD_BENCH_SRC:-../shared/tools/etcd-bench}"
work=target/etcd-bench
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo

if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null || ! command -v protoc >/dev/null; then
  echo "bench-etcd: installing etcd-server, etcd-client and protobuf-compiler from Debian's packages" >&2
  $sudo apt-get install -y etcd-server etcd-client protobuf-compiler >&2 \
    || { $sudo apt-get update >&2 && $sudo apt-get install -y etcd-server etcd-client protobuf-compiler >&2; }
fi
if [ ! -x "$work/cluster.sh" ]; then
  [ -d "$src" ] || { echo "bench-etcd: etcd-bench sources not found at $src (set ETCD_BENCH_SRC)" >&2; exit 1; }
  mkdir -p "$work" && cp -r "$src"/. "$work"/
fi
[ -x "$work/target/release/etcd-bench" ] || (cd "$work" && CARGO_TARGET_DIR="$PWD/target" cargo build --release >&2)
bin="$work/target/release/etcd-bench"
export ETCDPERF_DIR; ETCDPERF_DIR=$(mktemp -d /tmp/etcdperf.XXXXXX)
dir="$ETCDPERF_DIR"
results="${BENCH_RESULTS:-$dir/results.jsonl}"
trap '"$work/cluster.sh" stop >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT

scenario() { # name, value size, then etcd-bench args
  local name="$1" size="$2"; shift 2
  "$work/cluster.sh" start >/dev/null
  sleep 1
  local json rss=0 kb
  json=$(timeout $((secs + warmup + 120)) "$bin" --duration "$secs" --warmup "$warmup" --keyspace "$keys" \
    --value-size "$size" --pidfile "$dir/pids" "$@" 2>"$dir/$name-$size.stderr")
  for p in $(cat "$dir/pids"); do
    kb=$(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    [ "${kb:-0}" -gt "$rss" ] && rss=$kb
  done
  "$work/cluster.sh" stop >/dev/null
  python3 - "$name" "$size" "$json" "$((rss / 1024))" "$results" <<'PY'
import json, sys
name, size, j, rss, results = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
lat = j["lat_ms"]
row = {"system": "etcd", "scenario": name, "value_bytes": size, "ops_per_s": j["ops_per_s"], "p50_ms": lat["p50"],
       "p90_ms": lat["p90"], "p99_ms": lat["p99"], "max_ms": lat["max"], "errors": j["errors"], "rss_mb": rss}
open(results, "a").write(json.dumps(row) + "\n")
print(f"{name:<28} {size:>7} {row['ops_per_s']:>10.0f} {row['p50_ms']:>8.2f} {row['p90_ms']:>8.2f} "
      f"{row['p99_ms']:>8.2f} {row['max_ms']:>8.2f} {row['errors']:>7} {rss:>7}")
PY
}

printf '%-28s %7s %10s %8s %8s %8s %8s %7s %7s\n' "etcd scenario" value ops/s p50_ms p90_ms p99_ms max_ms errors rss_MiB
for size in $sizes; do
  scenario put_c1             "$size" --target leader --clients 1  --mix put
  scenario put_c64            "$size" --target leader --clients 64 --mix put
  scenario get_lin_c1         "$size" --target leader --clients 1  --mix get --prefill
  scenario get_lin_c64        "$size" --target leader --clients 64 --mix get --prefill
  scenario get_lin_c64_spread "$size" --target spread --clients 64 --mix get --prefill
done
scenario get_ser_c64 100 --target leader --clients 64 --mix get --prefill --consistency serializable
scenario rw50_c64    100 --target leader --clients 64 --mix rw --read-pct 50 --prefill
