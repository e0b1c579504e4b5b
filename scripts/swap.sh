#!/usr/bin/env bash
# Rolls a guest build through the five `just cluster` hosts (127.0.0.1:50051-50055) one at a
# time: swap, then wait until the host serves a write again before moving on. Prints each
# host's swap pause. With no PATH, builds the guest first and swaps that in. The hosts run only
# signed builds (`--trusted-keys .cluster/trusted-keys`): the build is signed with the dev key
# (scripts/dev-signing.sh) first — always when built here, and when PATH has no PATH.sig yet (a
# build signed already, e.g. with another key, keeps its signature). A swap is an operator
# action: the waxos client shows the dev PKI's operator certificate (.cluster/pki) by default.
set -euo pipefail
cd "$(dirname "$0")/.."
path="${1:-}"
if [ -z "$path" ]; then
  cargo build -q --target wasm32-wasip2 --profile guest -p waxos-guest
  path=target/wasm32-wasip2/guest/waxos_guest.wasm
  scripts/dev-signing.sh "$path"
fi
[ -f "$path" ] || { echo "swap: no such file: $path" >&2; exit 1; }
[ -f "$path.sig" ] || scripts/dev-signing.sh "$path"
waxos=./target/release/waxos
for port in 50051 50052 50053 50054 50055; do
  RUST_LOG=warn "$waxos" 127.0.0.1 "$port" swap "$path"
  for _ in $(seq 1 100); do
    if RUST_LOG=off "$waxos" 127.0.0.1 "$port" --timeout-ms 1000 put __swap_health__ "$port" 2>/dev/null; then
      break
    fi
    sleep 0.1
  done
done
RUST_LOG=warn "$waxos" 127.0.0.1 50051 status
