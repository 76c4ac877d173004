#!/usr/bin/env bash
# Builds the ssi-vmm test initramfs: Debian's busybox-static with all applet links, an /init
# implementing the ssi-vmm test protocol and the tests in /tests (see images/README.md).
# For guest kernels with everything built in (no modules).
#
# Output (stdout, one line): path of initramfs.cpio, an UNCOMPRESSED newc cpio archive
#   (the guest kernel unpacks it under instruction emulation, so no compression).
# Cache: ${SSI_CACHE:-$HOME/.cache/ssi-vmm}/initramfs-<hash>/, hash over this script,
#   lib/common.sh, lib/initramfs-common.sh, lib/initramfs/ and the busybox-static/cpio
#   versions. Progress goes to stderr.
set -euo pipefail
SSI_NAME=initramfs
# shellcheck source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"
# shellcheck source=lib/initramfs-common.sh
. "$SSI_IMAGES_DIR/lib/initramfs-common.sh"

initramfs_need_pkgs
key=$(initramfs_key_inputs | cache_key "$0" "${INITRAMFS_KEY_FILES[@]}")
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
initramfs_pack "$CACHE_TMP/root" "$CACHE_TMP/initramfs.cpio"
rm -rf "$CACHE_TMP/root"
cache_commit
log "done in $((SECONDS - start)) s: $CACHE_OUT"
emit "$CACHE_OUT/initramfs.cpio"
