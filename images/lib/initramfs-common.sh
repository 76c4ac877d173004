# shellcheck shell=bash
# The busybox userland shared by build-initramfs.sh and build-stock-kernel.sh (sourced after
# lib/common.sh). The files that end up in the archive besides busybox live in
# lib/initramfs/ (the /init script, /etc/ssi-functions.sh, /tests/*.sh).

INITRAMFS_OVERLAY=$SSI_IMAGES_DIR/lib/initramfs
BUSYBOX=/bin/busybox

# shellcheck disable=SC2034  # used by the build scripts
# Files/dirs whose content defines the shared userland (for cache keys).
INITRAMFS_KEY_FILES=("$SSI_IMAGES_DIR/lib/common.sh" "$SSI_IMAGES_DIR/lib/initramfs-common.sh"
  "$INITRAMFS_OVERLAY")

initramfs_need_pkgs() { need_pkgs busybox-static cpio file; }

# Inputs other than files, for cache keys.
initramfs_key_inputs() {
  echo "busybox-static $(pkg_installed_version busybox-static)"
  echo "cpio $(pkg_installed_version cpio)"
}

# initramfs_populate ROOT: busybox with all applet links, the base directories, the overlay.
initramfs_populate() {
  local root=$1 applet
  [ -x "$BUSYBOX" ] || die "$BUSYBOX missing (package busybox-static)"
  file -L "$BUSYBOX" | grep -q 'statically linked' || die "$BUSYBOX is not statically linked"
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,etc,mnt,root,run,tests,lib/modules}
  chmod 1777 "$root/tmp"
  chmod 700 "$root/root"
  cp "$BUSYBOX" "$root/bin/busybox"
  # `busybox --list-full` prints e.g. "usr/bin/awk", "sbin/poweroff", "linuxrc".
  while IFS= read -r applet; do
    case $applet in */*) ;; *) continue ;; esac
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
  done < <("$BUSYBOX" --list-full)
  [ -e "$root/bin/sh" ] || die "busybox has no sh applet"
  ln -sf /proc/mounts "$root/etc/mtab"
  cp -R "$INITRAMFS_OVERLAY"/. "$root"/
  chmod 755 "$root/init" "$root"/tests/*.sh
  # The kernel opens /dev/console for /init before devtmpfs is mounted; /init reopens it
  # from devtmpfs if this node could not be made (not root).
  if [ "$(id -u)" -eq 0 ]; then
    mknod -m 600 "$root/dev/console" c 5 1
    mknod -m 666 "$root/dev/null" c 1 3
  else
    log "warning: not root, archive gets no /dev/console node (init falls back to devtmpfs)"
  fi
}

# initramfs_pack ROOT OUT: uncompressed newc cpio of ROOT, all files owned by root,
# sorted and with fixed mtimes so the archive is reproducible.
initramfs_pack() {
  local root=$1 out=$2
  find "$root" -exec touch -h -d @0 {} +
  (cd "$root" && find . -mindepth 1 -printf '%P\0' | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) > "$out"
  log "packed $(du -h --apparent-size "$out" | cut -f1) uncompressed cpio ($(cpio -it --quiet < "$out" | wc -l) entries): $out"
}
