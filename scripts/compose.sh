#!/usr/bin/env bash
# `just compose-up` / `just compose-down [ARGS]`: the five hosts of compose.yaml in containers
# (project `waxos`). Up: installs Debian's docker-compose if neither `docker compose` (v2) nor
# `docker-compose` is there (apt-get, as root), makes what is missing of the dev PKI in
# .cluster/pki (`waxos dev-pki`) plus a certificate per container that also names 127.0.0.1 and
# localhost (scripts/member-cert.sh), builds the image if there is none (`just image` rebuilds
# it), starts the five and waits until each says SERVING (its metrics' waxos_serving). Down: stops
# and removes the containers and the network; the data volumes stay (`just compose-down -v`
# removes them too).
set -euo pipefail
cd "$(dirname "$0")/.."
action="${1:-up}"; shift || true
compose=()
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "compose: installing Debian's docker-compose (apt-get)" >&2
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q docker-compose >/dev/null 2>&1) || { apt-get update -q >/dev/null && apt-get install -y -q docker-compose >/dev/null; }
  else
    sudo apt-get install -y -q docker-compose >/dev/null
  fi
  compose=(docker-compose)
fi
compose+=(-p waxos -f compose.yaml)
case "$action" in
  up)
    [ -f .cluster/trusted-keys ] || { echo "compose: no .cluster/trusted-keys: run \`just build\`" >&2; exit 1; }
    ./target/release/waxos dev-pki .cluster/pki > /dev/null
    owner=""
    [ "$(id -u)" = 0 ] && owner=10001:10001
    for n in 1 2 3 4 5; do
      KEY_OWNER="$owner" scripts/member-cert.sh .cluster/pki "waxos$n:$((50050 + n))" 127.0.0.1 localhost > /dev/null
      # Not root: the containers' user 10001 cannot be given the key, so it must be readable (dev PKI only).
      [ -n "$owner" ] || chmod 0644 ".cluster/pki/member-waxos${n}_$((50050 + n)).key"
    done
    docker image inspect waxos:latest > /dev/null 2>&1 || scripts/image.sh
    "${compose[@]}" up -d "$@"
    echo "compose: waiting for the five hosts to serve..." >&2
    for n in 1 2 3 4 5; do
      for _ in $(seq 1 60); do
        # grep -c reads the whole scrape (an early grep -q could fail curl with SIGPIPE under pipefail)
        curl -sf "http://127.0.0.1:910$n/metrics" 2>/dev/null | grep -c '^waxos_serving 1' > /dev/null && break
        sleep 1
      done
      state=$(curl -sf "http://127.0.0.1:910$n/metrics" 2>/dev/null | grep -E '^waxos_(serving|leader_id) ' | tr '\n' ' ' || true)
      echo "waxos$n: gRPC 127.0.0.1:$((50050 + n)), metrics http://127.0.0.1:910$n/metrics  ${state:-not answering}" >&2
    done
    echo "try: ./target/release/waxos 127.0.0.1 50051 put greeting hello" >&2
    ;;
  down)
    "${compose[@]}" down "$@"
    ;;
  *)
    echo "usage: compose.sh up|down [ARGS…]" >&2; exit 1
    ;;
esac
