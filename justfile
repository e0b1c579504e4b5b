# waxos — run `just` to list recipes.

set shell := ["bash", "-euo", "pipefail", "-c"]

guest_wasm := "target/wasm32-wasip2/guest/waxos_guest.wasm"

# List recipes.
default:
    @just --list

# Make sure the toolchain has what the build needs: the wasm32-wasip2 target, rustfmt, clippy (idempotent, ~1 s).
setup:
    @command -v rustup >/dev/null 2>&1 || { echo "error: rustup not found. waxos needs a rustup-managed Rust toolchain (https://rustup.rs) to add the wasm32-wasip2 target." >&2; exit 1; }
    @rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
    @rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt
    @rustup component list --installed | grep -q '^clippy' || rustup component add clippy

# Build the guest component, the host (waxosd) and the client (waxos), release; sign the guest with the dev key (.cluster/dev-signing.key, made on first run).
build: setup
    cargo build --target wasm32-wasip2 --profile guest -p waxos-guest
    cargo build --release -p waxos-host -p waxos-client -p waxos-sim
    scripts/dev-signing.sh {{guest_wasm}}

# Start five hosts on 127.0.0.1:50051-50055 (50051 coordinates); Ctrl-C stops all five.
cluster chaos="low": build
    scripts/cluster.sh "{{chaos}}"

# Everything: guest unit tests under wasmtime, host and client tests, real-process cluster tests.
test: build
    scripts/guest-variants.sh
    cargo test --release --target wasm32-wasip2 -p waxos-guest
    cargo test --release -p waxos-host -p waxos-client -p waxos-proto -p waxos-sim --features waxos-host/crash-points

# Hot-swap a guest build (default: the current guest, rebuilt and signed with the dev key) into the five `just cluster` hosts, one by one.
swap path="": setup
    scripts/swap.sh "{{path}}"

# Load scenarios at value sizes 100 B-256 KiB (PUT, GET at 1 and 64 clients, leader and spread), p50 latency per size, a stalled follower's memory.
bench: build
    scripts/bench.sh --group-commit-compare
    scripts/bench-latency.sh
    scripts/bench-tls.sh 1
    scripts/bench-stall.sh 60

# What TLS costs: PUT@64 and linearizable GET@64 with TLS vs --insecure, REPS rounds in one run, and the signature check time.
bench-tls reps="3": build
    scripts/bench-tls.sh {{reps}}

# p50 latency per value size, 8 B-1 MiB, one client: a third-party client (Python grpcio) and waxos bench.
bench-latency: build
    scripts/bench-latency.sh

# Memory of a follower whose disk stalls for SECONDS under load, then its catch-up.
bench-stall seconds="60": build
    scripts/bench-stall.sh {{seconds}}

# The same scenarios against a five-member etcd on loopback (installs etcd-server if missing).
bench-etcd:
    scripts/bench-etcd.sh

# waxos and etcd back to back, REPS rounds: median (min-max) table and the ratios against the targets.
bench-compare reps="3": build
    scripts/bench-compare.sh {{reps}}

# Host memory: resident size under steady load for MINUTES (leak check), then at KEYS keys.
bench-memory minutes="10" keys="1000000": build
    scripts/bench-memory.sh {{minutes}} {{keys}}

# Membership figures: member add -> promoted, and write throughput during a replacement, per size.
bench-membership *keys="10000 1000000": build
    scripts/bench-membership.sh {{keys}}

# Large state: load KEYS keys with compaction on, roll a hot swap, restart a follower; leader changes, stalls, pauses, restart, memory.
bench-scale keys="1000000": build
    scripts/bench-scale.sh {{keys}}

# Storage and restart figures: fdatasync latency, group commit, restart from 100k/1M-key snapshots (and + WAL).
bench-storage: build
    cargo run -q --release -p waxos-host --example storage_bench

# Simulate the real guest .wasm under faults for N seeds (default 1000); replay: just sim --seed S --trace
sim *args="1000": build
    scripts/guest-variants.sh > /dev/null
    ./target/release/waxos-sim --swap-with target/guest-variants/relabeled.wasm {{args}}

# Container image waxos:latest FROM scratch: the release waxosd and waxos, the glibc libraries ldd names, the signed guest; user 10001, volume /data.
image: build
    scripts/image.sh

# Five hosts in containers (compose.yaml): gRPC on 127.0.0.1:50051-50055, metrics on 127.0.0.1:9101-9105; installs docker-compose if missing.
compose-up:
    scripts/compose.sh up

# Stop and remove the compose hosts and their network; `just compose-down -v` removes their data volumes too.
compose-down *args="":
    scripts/compose.sh down {{args}}

# Real-network faults (root, Docker): five hosts in containers, iptables partitions (one-way too), kills, a rolling hot swap, under load; the history checked for linearizability.
test-net seconds="150": image
    scripts/test-net.sh {{seconds}}

# Format and lint (CI runs these too).
lint: setup
    cargo fmt --all -- --check
    cargo clippy --release --all-targets -p waxos-host -p waxos-client -p waxos-proto -p waxos-sim --features waxos-host/crash-points -- -D warnings
    cargo clippy --release --target wasm32-wasip2 -p waxos-guest --all-targets -- -D warnings
