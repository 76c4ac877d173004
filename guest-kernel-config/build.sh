#!/usr/bin/env bash
# Builds the lean ssi-vmm guest kernel (an ELF vmlinux) from Debian's linux-source-6.1 package:
# `make tinyconfig` + lean.config, everything built in. The result is cached outside the repository
# under $SSI_CACHE (default ~/.cache/ssi-vmm), keyed by a hash of the source tarball, the config
# fragment and this script, so a second run is instant. Prints the path of the vmlinux on stdout.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${SSI_CACHE:-$HOME/.cache/ssi-vmm}
src=/usr/src/linux-source-6.1.tar.xz
log() { echo "[guest-kernel] $*" >&2; }

if [ ! -f "$src" ]; then
  log "installing linux-source-6.1 and build tools (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends linux-source-6.1 flex bison bc libelf-dev \
    libssl-dev make gcc xz-utils >&2
fi

key=$( { sha256sum "$src" | cut -d' ' -f1; cat "$here/lean.config" "$here/build.sh"; } | sha256sum | cut -c1-16)
out="$cache/kernel-lean-$key"
if [ -f "$out/vmlinux" ]; then
  log "cached: $out/vmlinux"
  echo "$out/vmlinux"
  exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/kernel-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "unpacking $src"
tar -xf "$src" -C "$work"
cd "$work"/linux-source-6.1
log "configuring (tinyconfig + lean.config)"
make -s tinyconfig >&2
KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -m .config "$here/lean.config" >&2
make -s olddefconfig >&2
# Report fragment options that Kconfig did not take (dependencies), so drift is visible.
while IFS= read -r line; do
  case "$line" in CONFIG_*=n) opt=${line%%=*}; grep -q "^$opt=" .config && log "warning: $opt still set" ;;
    CONFIG_*) grep -qx "$line" .config || log "warning: $line not applied" ;; esac
done < "$here/lean.config"
jobs=$(nproc)
log "building vmlinux with -j$jobs (about 10 minutes on 2 cores)"
start=$(date +%s)
make -j"$jobs" vmlinux 2>&1 | awk '/^  (CC|LD|AR)/ { n++; if (n % 200 == 0) printf "[guest-kernel] %d objects built\n", n > "/dev/stderr"; next } { print > "/dev/stderr" }'
[ -f vmlinux ] || { log "build failed"; exit 1; }
mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp .config "$out.tmp/config"
rm -rf "$out"; mv "$out.tmp" "$out"
log "built in $(( $(date +%s) - start )) s: $out/vmlinux"
echo "$out/vmlinux"
