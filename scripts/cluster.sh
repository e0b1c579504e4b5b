#!/usr/bin/env bash
# Starts five waxosd hosts on 127.0.0.1:50051..50055 (50051 is the coordinator), data under
# .cluster/data/N, logs in .cluster/logs/N.log and a merged, prefixed view on this terminal.
# Ctrl-C (or SIGTERM) stops all five. The hosts run only guest builds signed by a key of
# .cluster/trusted-keys (`just build` makes the dev key and signs the guest with it), and speak
# TLS with the dev PKI of .cluster/pki (made here on first run: a CA, a certificate per host, an
# operator's certificate that the waxos client uses by default; scripts/dev-pki.sh). Host N serves
# Prometheus metrics at http://127.0.0.1:910N/metrics.
set -euo pipefail
chaos="${1:-low}"
cd "$(dirname "$0")/.."
[ -f .cluster/trusted-keys ] || { echo "cluster: no .cluster/trusted-keys: run \`just build\` (it makes the dev signing key)" >&2; exit 1; }
mkdir -p .cluster/logs .cluster/data
source scripts/dev-pki.sh
dev_pki 50051 50052 50053 50054 50055
pids=()
stop() {
  trap - INT TERM EXIT
  echo "stopping the cluster..." >&2
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop INT TERM EXIT
for n in 1 2 3 4 5; do
  port=$((50050 + n))
  # $! is waxosd itself (its output goes through a process substitution), so stop() reaches it.
  ./target/release/waxosd 50051 "$port" --data-dir ".cluster/data/$n" --chaos "$chaos" --trusted-keys .cluster/trusted-keys $(member_tls "$port") --metrics-port $((9100 + n)) \
    > >(tee ".cluster/logs/$n.log" | sed -u "s/^/[$n] /") 2>&1 &
  pids+=($!)
  sleep 0.3  # register in order, so node N listens on port 5005N
done
echo "five hosts starting on 127.0.0.1:50051-50055; try: ./target/release/waxos 127.0.0.1 50051 put hello world" >&2
wait
