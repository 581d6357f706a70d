#!/bin/bash
# Stages the build context of docker/*.scratch.Dockerfile in DIR: BINARY at
# rootfs/usr/local/bin/<name>, exactly the shared libraries `ldd` lists for
# it (the dynamic loader included) at the paths ldd resolved them to, the
# host's CA bundle, an empty /tmp and /var/lib/drover. A static binary
# (musl) gets no libraries.
#
#   docker/scratch-context.sh target/release/drover-agent /tmp/agent-image
set -euo pipefail

if [ $# -ne 2 ] || [ ! -x "$1" ]; then
  echo "usage: $0 BINARY DIR (BINARY: a built drover-agent or drover-coordinator)" >&2
  exit 2
fi
binary=$1
rootfs="$2/rootfs"

mkdir -p "${rootfs}/usr/local/bin" "${rootfs}/tmp" "${rootfs}/var/lib/drover"
chmod 1777 "${rootfs}/tmp"
install -m 0755 "${binary}" "${rootfs}/usr/local/bin/$(basename "${binary}")"

# "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and
# "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
if libraries=$(ldd "${binary}" 2>/dev/null); then
  awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"${libraries}" |
    while read -r library; do
      mkdir -p "${rootfs}$(dirname "${library}")"
      cp -L "${library}" "${rootfs}${library}"
    done
fi

if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "${rootfs}/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "${rootfs}/etc/ssl/certs/"
fi
