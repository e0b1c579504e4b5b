#!/usr/bin/env bash
# `just test-net [SECONDS]`: five waxos hosts in containers of the image waxos:latest (`just
# image`) on a docker network this test makes (its own /24, addresses .11-.15), driven by
# scripts/net-test.py: Python grpcio clients against all five while a nemesis partitions them with
# iptables (both ways, 2|3 splits, one-way: in, out, and single links; DROP rules between the
# containers' addresses in the DOCKER-USER chain), kills and restarts containers, and rolls a
# signed hot swap across them. The history (invoke/ok/fail/info per operation) is then checked
# for linearizability by waxos-check-history (the simulator's checker), after every key was read
# back. SECONDS of load and faults (default 150); the whole run takes about a minute more.
# Everything it made (containers, network, volumes, iptables rules, the temporary PKI) is removed
# on exit, failure or Ctrl-C included; the hosts' logs and the history stay in target/test-net/.
# Needs root (iptables) and a running Docker engine; traffic stays on this machine (the test's
# own containers and loopback).
#   NET_SEED=N replays the nemesis' and clients' choices (timing still differs).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-150}"
t_start=$(date +%s)
[ "$(id -u)" = 0 ] || { echo "test-net: needs root (iptables rules in DOCKER-USER, docker); run it with sudo" >&2; exit 1; }
command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "test-net: no running Docker engine" >&2; exit 1; }
command -v iptables >/dev/null || { echo "test-net: iptables is not installed" >&2; exit 1; }
iptables -S DOCKER-USER >/dev/null 2>&1 || { echo "test-net: no DOCKER-USER chain (is the Docker engine managing iptables?)" >&2; exit 1; }
docker image inspect waxos:latest >/dev/null 2>&1 || { echo "test-net: no image waxos:latest: run \`just image\`" >&2; exit 1; }
for f in target/release/waxos target/release/waxos-check-history .cluster/dev-signing.key .cluster/trusted-keys \
         target/wasm32-wasip2/guest/waxos_guest.wasm.sig; do
  [ -f "$f" ] || { echo "test-net: $f is missing: run \`just build\`" >&2; exit 1; }
done
if ! python3 -c 'import grpc, grpc_tools' 2>/dev/null; then
  echo "test-net: installing grpcio and grpcio-tools (pip) for the clients" >&2
  python3 -m pip install --quiet grpcio grpcio-tools >&2
fi

label=waxos-test-net
# Leftovers of an earlier run whose script was killed outright (no trap ran): its process is gone.
leftovers() { # what: names of runs (waxos-net-PID) holding resources, whose PID is not alive
  { docker ps -a --filter "label=$label" --format '{{.Label "waxos-test-net"}}'
    docker network ls --filter "label=$label" --format '{{.Name}}'
    docker volume ls --filter "label=$label" --format '{{.Label "waxos-test-net"}}'
    iptables -S DOCKER-USER 2>/dev/null | grep -o -- '--comment waxos-net-[0-9]*' | awk '{print $2}' || true
  } 2>/dev/null | sort -u | while read -r run; do
    [ -n "$run" ] && ! kill -0 "${run#waxos-net-}" 2>/dev/null && echo "$run"
  done
}
cleanup_run() { # RUN
  local run="$1"
  docker ps -aq --filter "label=$label=$run" | xargs -r docker rm -f > /dev/null 2>&1 || true
  docker network rm "$run" > /dev/null 2>&1 || true
  docker volume ls -q --filter "label=$label=$run" | xargs -r docker volume rm > /dev/null 2>&1 || true
  { iptables -S DOCKER-USER 2>/dev/null | grep -- "--comment $run " || true; } | sed 's/^-A /-D /' | while read -r rule; do
    # shellcheck disable=SC2086
    iptables $rule 2>/dev/null || true
  done
}
for old in $(leftovers); do
  echo "test-net: removing what the interrupted run $old left behind" >&2
  cleanup_run "$old"
  rm -rf "/tmp/$old".*
done

run="waxos-net-$$"
work=$(mktemp -d "/tmp/$run.XXXXXX")
out=target/test-net
rm -rf "$out"; mkdir -p "$out"
finish() {
  local code=$?
  set +e  # clean up all of it, whatever fails
  trap - EXIT INT TERM
  if [ -n "${driver:-}" ]; then kill "$driver" 2>/dev/null || true; wait "$driver" 2>/dev/null || true; fi
  for n in 1 2 3 4 5; do docker logs "$run-$n" > "$out/$n.log" 2>&1 || true; done
  [ -f "$work/history.jsonl" ] && cp "$work/history.jsonl" "$out/"
  cleanup_run "$run"
  rm -rf "$work"
  [ "$code" = 0 ] || echo "test-net: FAILED (exit $code); the hosts' logs and the history are in $out/" >&2
  exit "$code"
}
trap finish EXIT
trap 'exit 130' INT TERM

# The network: the first free /24 of 10.213.0.0/16 (docker refuses one that overlaps another).
subnet=""
for third in $(shuf -i 1-254 -n 40); do
  if docker network create --driver bridge --subnet "10.213.$third.0/24" --label "$label=$run" "$run" > /dev/null 2>&1; then
    subnet="10.213.$third"; break
  fi
done
[ -n "$subnet" ] || { echo "test-net: could not create a network in 10.213.0.0/16" >&2; exit 1; }
ips=()
for n in 1 2 3 4 5; do ips+=("$subnet.1$n"); done

# A PKI of the run's own: a member certificate per container naming waxosN:5005N, waxosN and its
# address (the clients here dial addresses); the private keys belong to the containers' user.
# Each host listens on its own port: the one on the coordinator's port (50051) is the coordinator.
./target/release/waxos dev-pki "$work/pki" > /dev/null
for n in 1 2 3 4 5; do
  KEY_OWNER=10001:10001 scripts/member-cert.sh "$work/pki" "waxos$n:$((50050 + n))" "${ips[n-1]}" > /dev/null
done

# The builds the rolling swap alternates: a relabeled guest (the hot-swap tests' variant, built
# here when `just test` has not made it yet), then the build the hosts started with; both signed.
relabeled=target/guest-variants/relabeled.wasm
if [ ! -f "$relabeled" ]; then
  echo "test-net: building the relabeled guest variant" >&2
  WAXOS_BUILD_LABEL=swap-test CARGO_TARGET_DIR=target/variants CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=true \
    cargo build -q --release --target wasm32-wasip2 -p waxos-guest
  relabeled=target/variants/wasm32-wasip2/release/waxos_guest.wasm
fi
cp "$relabeled" "$work/relabeled.wasm"
cp target/wasm32-wasip2/guest/waxos_guest.wasm "$work/original.wasm"
./target/release/waxos sign --key .cluster/dev-signing.key "$work/relabeled.wasm" > /dev/null
./target/release/waxos sign --key .cluster/dev-signing.key "$work/original.wasm" > /dev/null

# Every host finds the others in its /etc/hosts (the image's nsswitch reads files first), and has
# no upstream DNS server: Docker's embedded DNS would forward the name of a stopped container to
# this machine's resolver, off the machine.
hosts=()
for n in 1 2 3 4 5; do hosts+=(--add-host "waxos$n:${ips[n-1]}"); done
for n in 1 2 3 4 5; do
  docker volume create --label "$label=$run" "$run-data-$n" > /dev/null
  docker run -d --name "$run-$n" --hostname "waxos$n" --network "$run" --ip "${ips[n-1]}" --network-alias "waxos$n" \
    --label "$label=$run" -e RUST_LOG=info "${hosts[@]}" --dns 127.0.0.1 \
    -v "$run-data-$n:/data" \
    -v "$PWD/.cluster/trusted-keys:/etc/waxos/trusted-keys:ro" \
    -v "$work/pki/ca.pem:/etc/waxos/ca.pem:ro" \
    -v "$work/pki/member-waxos${n}_$((50050 + n)).pem:/etc/waxos/member.pem:ro" \
    -v "$work/pki/member-waxos${n}_$((50050 + n)).key:/etc/waxos/member.key:ro" \
    waxos:latest 50051 $((50050 + n)) --host "waxos$n" --coordinator-host waxos1 --data-dir /data \
    --guest /usr/local/share/waxos/waxos_guest.wasm --trusted-keys /etc/waxos/trusted-keys \
    --cacert /etc/waxos/ca.pem --cert /etc/waxos/member.pem --key /etc/waxos/member.key \
    --metrics-port 9100 --metrics-host 0.0.0.0 --chaos off > /dev/null
  sleep 0.3 # register in order: container N is node N
done
echo "test-net: five hosts waxosN at $subnet.1N:5005N (network $run); waiting until each serves" >&2
# (grep -c reads the whole scrape: with pipefail, an early grep -q could fail curl with SIGPIPE.)
serving() { curl -sf --max-time 1 "http://$1:9100/metrics" 2>/dev/null | grep -c '^waxos_serving 1' > /dev/null; }
for n in 1 2 3 4 5; do
  for _ in $(seq 1 120); do
    serving "${ips[n-1]}" && break
    sleep 0.5
  done
  serving "${ips[n-1]}" || { echo "test-net: host $n does not serve after 60 s" >&2; exit 1; }
done

ip_list=$(IFS=,; echo "${ips[*]}")
# In the background, so that a signal to this script runs the trap at once (a foreground child
# would be waited for first); the trap stops the driver before it removes what the driver uses.
python3 scripts/net-test.py --run "$run" --ips "$ip_list" --pki "$work/pki" --waxos ./target/release/waxos \
  --builds "$work/relabeled.wasm,$work/original.wasm" --history "$work/history.jsonl" --duration "$seconds" \
  ${NET_SEED:+--seed "$NET_SEED"} &
driver=$!
wait "$driver"
driver=""
./target/release/waxos-check-history "$work/history.jsonl"
echo "test-net: passed in $(( $(date +%s) - t_start )) s (setup and read-back included)"
