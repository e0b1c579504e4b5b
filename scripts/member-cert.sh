#!/usr/bin/env bash
# member-cert.sh DIR HOST:PORT [NAME…]: a member certificate like `waxos dev-pki DIR --member
# HOST:PORT` makes (member-HOST_PORT.pem/.key in DIR, signed by DIR's CA: the URI
# waxos://member/HOST:PORT and HOST), that also names each NAME (an IP address or DNS name) —
# e.g. 127.0.0.1 and localhost for a container whose port is published on this machine, so that
# `waxos 127.0.0.1 PORT …` verifies it. `waxos dev-pki` names only the member's own host. Made
# with openssl; an existing certificate is kept. KEY_OWNER=UID:GID chowns the private key
# (the containers' user reads it). Development only, as dev-pki.
set -euo pipefail
dir="$1"; address="$2"; shift 2
host="${address%:*}"
name=$(printf '%s' "$address" | tr -c 'A-Za-z0-9.\n-' '_')
cert="$dir/member-$name.pem"; key="$dir/member-$name.key"
[ -f "$dir/ca.pem" ] && [ -f "$dir/ca.key" ] || { echo "member-cert: no CA in $dir (waxos dev-pki $dir makes one)" >&2; exit 1; }
if [ ! -f "$cert" ] || [ ! -f "$key" ]; then
  san="URI:waxos://member/$address"
  for n in "$host" "$@"; do
    if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then san+=",IP:$n"; else san+=",DNS:$n"; fi
  done
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  (umask 077; openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/key" 2>/dev/null)
  openssl req -new -key "$tmp/key" -subj "/CN=member $address" -out "$tmp/csr" 2>/dev/null
  cat > "$tmp/ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san
authorityKeyIdentifier=keyid
subjectKeyIdentifier=hash
EXT
  openssl x509 -req -in "$tmp/csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -set_serial "0x$(openssl rand -hex 16)" -days 3650 \
    -extfile "$tmp/ext" -out "$tmp/cert" 2>/dev/null
  mv "$tmp/key" "$key"; mv "$tmp/cert" "$cert"
fi
[ -z "${KEY_OWNER:-}" ] || chown "$KEY_OWNER" "$key"
echo "$cert"
