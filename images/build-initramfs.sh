#!/usr/bin/env bash
# Builds the ssi-vmm test initramfs: Debian's busybox-static with all applet links, an /init
# implementing the ssi-vmm test protocol, the tests in /tests (see images/README.md) and the
# SMP checker /bin/ssi-check (checker/ssi-check.c, compiled static with the host's gcc).
# For guest kernels with everything built in (no modules).
#
# Output (stdout, one line): path of initramfs.cpio, an UNCOMPRESSED newc cpio archive
#   (the guest kernel unpacks it under instruction emulation, so no compression).
# Cache: ${SSI_CACHE:-$HOME/.cache/ssi-vmm}/initramfs-<hash>/, hash over this script,
#   lib/common.sh, lib/initramfs-common.sh, lib/initramfs/, checker/ and the
#   busybox-static/cpio/libc6-dev versions and `gcc --version`. Progress goes to stderr.
set -euo pipefail
SSI_NAME=initramfs
# shellcheck source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"
# shellcheck source=lib/initramfs-common.sh
. "$SSI_IMAGES_DIR/lib/initramfs-common.sh"

CHECKER_DIR=$SSI_IMAGES_DIR/checker
# -s: the archive is unpacked under emulation at every boot, every byte counts.
CHECKER_CFLAGS=(-std=c11 -O2 -static -pthread -s -Wall -Wextra -Werror)

initramfs_need_pkgs
need_pkgs gcc libc6-dev
key=$({
  initramfs_key_inputs
  echo "gcc $(gcc --version | head -n 1)"
  echo "libc6-dev $(pkg_installed_version libc6-dev)"
  echo "checker-cflags ${CHECKER_CFLAGS[*]}"
} | cache_key "$0" "${INITRAMFS_KEY_FILES[@]}" "$CHECKER_DIR")
if cache_lookup initramfs "$key"; then
  log "cached: $CACHE_OUT"
  emit "$CACHE_OUT/initramfs.cpio"
  exit 0
fi
cache_begin
if [ -n "$CACHE_HIT" ]; then
  emit "$CACHE_OUT/initramfs.cpio"
  exit 0
fi

start=$SECONDS
log "building in $CACHE_TMP"
initramfs_populate "$CACHE_TMP/root"
log "compiling ssi-check"
gcc "${CHECKER_CFLAGS[@]}" -o "$CACHE_TMP/root/bin/ssi-check" "$CHECKER_DIR/ssi-check.c"
file "$CACHE_TMP/root/bin/ssi-check" | grep -q 'statically linked' ||
  die "ssi-check is not statically linked"
# A short run on the host: the binary we ship must pass where SMP is not in question.
"$CACHE_TMP/root/bin/ssi-check" --seconds 0.3 --threads 2 --mem 4 --watchdog 60 >&2 ||
  die "ssi-check fails on the host"
initramfs_pack "$CACHE_TMP/root" "$CACHE_TMP/initramfs.cpio"
rm -rf "$CACHE_TMP/root"
cache_commit
log "done in $((SECONDS - start)) s: $CACHE_OUT"
emit "$CACHE_OUT/initramfs.cpio"
