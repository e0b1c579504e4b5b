#!/usr/bin/env bash
# `just image`: builds the container image waxos:latest FROM scratch (image/Dockerfile; nothing is
# pulled) from what `just build` made: target/release/waxosd and waxos, and the signed guest
# target/wasm32-wasip2/guest/waxos_guest.wasm with its .sig. The binaries are linked against
# glibc: the image holds exactly the shared libraries `ldd` names for them, and the loader, at the
# paths ldd gives. Debug info is stripped from the copies (target/ keeps it; waxosd keeps its
# symbols). Runs as UID 10001;
# /data is the volume. Prints the image's size. IMAGE=name:tag builds another tag.
set -euo pipefail
cd "$(dirname "$0")/.."
image="${IMAGE:-waxos:latest}"
guest=target/wasm32-wasip2/guest/waxos_guest.wasm
bins=(target/release/waxosd target/release/waxos)
for f in "${bins[@]}" "$guest" "$guest.sig"; do
  [ -f "$f" ] || { echo "image: $f is missing: run \`just build\`" >&2; exit 1; }
done
command -v docker >/dev/null 2>&1 || { echo "image: docker is not installed" >&2; exit 1; }
stage=$(mktemp -d /tmp/waxos-image.XXXXXX)
trap 'rm -rf "$stage"' EXIT
root="$stage/rootfs"
mkdir -p "$root/usr/local/bin" "$root/usr/local/share/waxos" "$root/etc" "$root/tmp" "$stage/data"
chmod 1777 "$root/tmp"
# waxosd keeps its symbols (a panic's backtrace names functions); the client needs none.
strip --strip-debug -o "$root/usr/local/bin/waxosd" target/release/waxosd
strip --strip-all -o "$root/usr/local/bin/waxos" target/release/waxos
cp "$guest" "$guest.sig" "$root/usr/local/share/waxos/"
# Every library ldd resolves ("name => /path (addr)") and the loader ("/lib64/ld-linux… (addr)"),
# copied as files (symlinks followed) under the path the binary asks for.
libs=$(ldd "${bins[@]}" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
[ -n "$libs" ] || { echo "image: ldd named no libraries (a static build?)" >&2; }
if ldd "${bins[@]}" | grep -q 'not found'; then
  echo "image: ldd cannot resolve every library:" >&2; ldd "${bins[@]}" >&2; exit 1
fi
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
waxos:x:10001:10001:waxos:/data:/sbin/nologin
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
waxos:x:10001:
GROUP
echo 'hosts: files dns' > "$root/etc/nsswitch.conf"
cp image/Dockerfile "$stage/Dockerfile"
echo "image: $(echo $libs | wc -w) libraries: $(echo $libs | tr "\n" " ")"
# The classic builder: FROM scratch needs nothing BuildKit adds (and the buildx plugin may be missing).
DOCKER_BUILDKIT=0 docker build -q -t "$image" \
  --label "org.opencontainers.image.revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "$stage" 2> >(grep -v -e DEPRECATED -e 'legacy builder' -e 'BuildKit is currently' -e 'environment-variable' -e '^ *$' >&2) > /dev/null
bytes=$(docker image inspect -f '{{.Size}}' "$image")
echo "image: $image, $((bytes / 1000000)) MB ($bytes bytes): waxosd, waxos, the signed guest, $(echo $libs | wc -w) libraries; runs as 10001, volume /data"
