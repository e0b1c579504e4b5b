#!/usr/bin/env bash
# The dev PKI under .cluster/pki (what `just cluster`, `just swap`, the benchmarks and the waxos
# client use by default): on first run a CA, an operator's and a plain client's certificates
# (`waxos dev-pki`); then, where missing, a member certificate for 127.0.0.1:PORT for each PORT
# given. Prints nothing. Source it to get `member_tls PORT`, the waxosd flags of that member.
# For development only: a production cluster brings its own CA (see the README).
set -euo pipefail
pki_dir=.cluster/pki
dev_pki() { # PORT...
  local args=()
  for port in "$@"; do args+=(--member "127.0.0.1:$port"); done
  ./target/release/waxos dev-pki "$pki_dir" ${args[@]+"${args[@]}"} > /dev/null
}
member_tls() { # PORT -> the waxosd flags of the member serving 127.0.0.1:PORT
  echo "--cacert $pki_dir/ca.pem --cert $pki_dir/member-127.0.0.1_$1.pem --key $pki_dir/member-127.0.0.1_$1.key"
}
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  cd "$(dirname "$0")/.."
  dev_pki "$@"
fi
