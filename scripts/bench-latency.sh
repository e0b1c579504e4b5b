#!/usr/bin/env bash
# `just bench-latency`: p50 latency per value size, 8 B to 1 MiB, one client, to the leader of a
# fresh five-host cluster — with two clients: a third-party one (Python grpcio, stubs generated
# from proto/waxos.proto; `pip install grpcio grpcio-tools` when missing) and `waxos bench
# --clients 1`. A latency cliff at some size (the 44 ms Nagle/delayed-ACK stall at 300 B-8 KB
# was one) shows as a row far above the 100-byte one. WAXOSD=path measures another host build.
# Both clients speak TLS to the hosts (the dev PKI; the probe with the plain client certificate),
# or plaintext with BENCH_INSECURE=1.
#   LATENCY_OPS  requests per size and op for the probe (default 50)
#   LATENCY_SECONDS  seconds per size and op for `waxos bench` (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d /tmp/waxos-latency.XXXXXX)
source scripts/lib/bench-cluster.sh
trap 'stop_cluster; rm -rf "$dir"' EXIT
ops="${LATENCY_OPS:-50}"
secs="${LATENCY_SECONDS:-2}"
sizes="${LATENCY_SIZES:-8,64,100,256,512,1024,2048,4096,8192,16384,65536,262144,1048576}"
if ! python3 -c 'import grpc, grpc_tools' 2>/dev/null; then
  echo "bench-latency: installing grpcio and grpcio-tools (pip) for the third-party client" >&2
  python3 -m pip install --quiet grpcio grpcio-tools >&2
fi
start_cluster
leader=$(leader_address)
tls=(--cacert .cluster/pki/ca.pem --cert .cluster/pki/client.pem --key .cluster/pki/client.key)
[ "${BENCH_INSECURE:-0}" = 1 ] && tls=()
python3 scripts/probe-grpcio.py "$leader" ${tls[@]+"${tls[@]}"} --sizes "$sizes" --ops "$ops" --json "$dir/probe.jsonl" >&2
for size in ${sizes//,/ }; do
  for op in put get; do
    RUST_LOG=off "$waxos" ${waxos_flags[@]+"${waxos_flags[@]}"} "${leader%:*}" "${leader##*:}" --timeout-ms 10000 bench --clients 1 --duration "$secs" \
      --keys 1 --value-size "$size" --mix "$op=100" --prefill --json \
      | python3 -c 'import json, sys; j = json.load(sys.stdin); print(json.dumps({"client": "waxos", "op": sys.argv[1], "value_bytes": int(sys.argv[2]), "p50_ms": j["p50_ms"], "p90_ms": j["p90_ms"], "max_ms": j["max_ms"]}))' "$op" "$size" \
      >> "$dir/probe.jsonl"
  done
done
python3 - "$dir/probe.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
p50 = {(r["client"], r["op"], r["value_bytes"]): r["p50_ms"] for r in rows}
sizes = sorted({r["value_bytes"] for r in rows})
def human(n):
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n} B"
cols = [("python-grpcio", "put"), ("python-grpcio", "get"), ("waxos", "put"), ("waxos", "get")]
print("p50 ms by value size (one client, to the leader); x = ratio to the 100-byte row")
print(f"| value | {' | '.join(f'{c} {o}' for c, o in cols)} |")
print("|---|" + "---|" * len(cols))
worst = {}
for s in sizes:
    cells = []
    for c in cols:
        v, base = p50.get((c[0], c[1], s)), p50.get((c[0], c[1], 100))
        if v is None:
            cells.append("-")
            continue
        ratio = v / base if base else 0
        if s <= 65536:
            worst[c] = max(worst.get(c, 0), ratio)
        cells.append(f"{v:.2f} ({ratio:.1f}x)")
    print(f"| {human(s)} | {' | '.join(cells)} |")
print()
for c in cols:
    if c in worst:
        print(f"{c[0]} {c[1]}: worst p50 from 8 B to 64 KiB is {worst[c]:.1f}x the 100-byte p50 "
              f"(target <= 2x: {'met' if worst[c] <= 2 else 'NOT met'})")
PY
