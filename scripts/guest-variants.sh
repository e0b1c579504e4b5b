#!/usr/bin/env bash
# Builds the guest variants the hot-swap tests swap in, into target/guest-variants/:
#   relabeled.wasm      the same code with version "0.1.0+swap-test"
#   snapshot-v3.wasm    writes a snapshot format newer than the build's (the build must refuse it), "+snapshot-v3"
#   trap-on-start.wasm  traps in start (a broken build)
#   not-a-world.wasm    a valid, empty component that exports nothing
#   not-wasm.wasm       not wasm at all
#   bug-*.wasm          planted bugs the simulator must catch
# They use their own target dir so the real guest build is never disturbed, and are rebuilt
# only when the guest's sources changed.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/guest-variants
mkdir -p "$out"
newest_source=$(find guest/src guest/Cargo.toml wit -type f -newer "$out/trap-on-start.wasm" 2>/dev/null | head -n 1 || true)
if [ -f "$out/trap-on-start.wasm" ] && [ -z "$newest_source" ]; then
  echo "guest variants are up to date"
else
  build() { # name label features
    WAXOS_BUILD_LABEL="$2" CARGO_TARGET_DIR=target/variants CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=true \
      cargo build -q --release --target wasm32-wasip2 -p waxos-guest ${3:+--features "$3"}
    cp target/variants/wasm32-wasip2/release/waxos_guest.wasm "$out/$1.wasm"
  }
  build relabeled swap-test ""
  build snapshot-v3 snapshot-v3 test-snapshot-v3
  build bug-forget-promise bug-forget-promise bug-forget-promise
  build bug-skip-phase1 bug-skip-phase1 bug-skip-phase1
  build bug-apply-out-of-order bug-apply-out-of-order bug-apply-out-of-order
  build bug-rejoin-early bug-rejoin-early bug-rejoin-early
  build bug-no-check-quorum bug-no-check-quorum bug-no-check-quorum
  build bug-reads-reset-on-swap bug-reads-reset-on-swap bug-reads-reset-on-swap
  build bug-silent-forgotten bug-silent-forgotten bug-silent-forgotten
  build bug-no-pre-vote bug-no-pre-vote bug-no-pre-vote
  build bug-fence-without-nonce bug-fence-without-nonce bug-fence-without-nonce
  build bug-snapshot-forgets-rejoin bug-snapshot-forgets-rejoin bug-snapshot-forgets-rejoin
  build bug-reconfig-at-once bug-reconfig-at-once bug-reconfig-at-once
  # Last: its timestamp is what "up to date" is judged by.
  build trap-on-start trap-on-start test-trap-on-start
fi
printf '\0asm\x0d\x00\x01\x00' > "$out/not-a-world.wasm"
printf 'this is not a wasm component\n' > "$out/not-wasm.wasm"
ls -l "$out"
