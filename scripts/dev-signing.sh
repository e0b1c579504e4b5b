#!/usr/bin/env bash
# The dev guest-signing key. On first run, makes .cluster/dev-signing.key (private, mode 0600)
# and .cluster/dev-signing.pub with `waxos keygen`; makes sure .cluster/trusted-keys (what
# `just cluster`, `just swap` and the benchmarks' hosts trust) lists its public key; then signs
# each BUILD given (`waxos sign` writes BUILD.sig). `just build` runs it on the guest build.
# For development only: a production key lives elsewhere, and its hosts trust only it.
set -euo pipefail
cd "$(dirname "$0")/.."
waxos=./target/release/waxos
key=.cluster/dev-signing.key
if [ ! -f "$key" ]; then
  mkdir -p .cluster
  "$waxos" keygen --out .cluster --name dev-signing > /dev/null
fi
public=$(grep -v '^#' .cluster/dev-signing.pub | head -n 1)
if ! grep -qxF "$public" .cluster/trusted-keys 2>/dev/null; then
  cat .cluster/dev-signing.pub >> .cluster/trusted-keys
fi
for build in "$@"; do
  "$waxos" sign --key "$key" "$build"
done
