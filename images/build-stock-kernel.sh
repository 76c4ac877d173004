#!/usr/bin/env bash
# Builds a guest kernel + initramfs pair from Debian's stock amd64 kernel, to test the VMM
# against an unmodified distribution kernel (everything the VMM needs is a module there).
#
#   * finds the linux-image-<abi>-amd64 package that linux-image-amd64 depends on,
#     `apt-get download`s it (it is NOT installed on the host) and unpacks it;
#   * extracts the ELF vmlinux from the bzImage /boot/vmlinuz-* (the way the kernel's
#     scripts/extract-vmlinux does: find the compressed-stream magic, decompress, check ELF);
#   * builds an uncompressed newc cpio initramfs with the same busybox userland and /init as
#     build-initramfs.sh (lib/initramfs-common.sh) plus the modules for virtio-mmio,
#     virtio-blk and ext4 (and their dependencies, resolved from modules.dep/modules.softdep
#     generated with depmod), listed in load order in /etc/ssi-modules; /init insmods them,
#     passing MODULE.param=value words of the kernel command line (virtio_mmio.device=...).
#
# Output (stdout, two lines): path of the ELF vmlinux, path of initramfs-stock.cpio.
#   The cache entry also holds vmlinuz-<ver> (the original bzImage), config-<ver> and
#   modules.txt (the module load order). (Debian's System.map is only a placeholder.)
# Cache: ${SSI_CACHE:-$HOME/.cache/ssi-vmm}/stock-kernel-<hash>/, hash over this script, the
#   shared initramfs files, the kernel package name + version and the busybox-static version.
set -euo pipefail
SSI_NAME=stock-kernel
# shellcheck source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"
# shellcheck source=lib/initramfs-common.sh
. "$SSI_IMAGES_DIR/lib/initramfs-common.sh"

# Modules wanted in the initramfs; dependencies are added automatically.
MODULES=(virtio virtio_ring virtio_mmio virtio_blk ext4)

initramfs_need_pkgs
need_pkgs apt kmod xz-utils file binutils

# linux-image-amd64 (metapackage) -> linux-image-<abi>-amd64.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
  awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }')
if [ -z "$kpkg" ]; then
  log "apt-cache knows no linux-image-amd64; running apt-get update"
  apt-get update -q >&2
  kpkg=$(apt-cache depends linux-image-amd64 |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }')
fi
[ -n "$kpkg" ] || die "cannot find the package linux-image-amd64 depends on"
kver_pkg=$(pkg_candidate_version "$kpkg")
log "stock kernel package: $kpkg $kver_pkg"

key=$({ initramfs_key_inputs; echo "kernel $kpkg $kver_pkg"; printf 'module %s\n' "${MODULES[@]}"; } |
  cache_key "$0" "${INITRAMFS_KEY_FILES[@]}")
if cache_lookup stock-kernel "$key"; then
  log "cached: $CACHE_OUT"
  emit "$CACHE_OUT/vmlinux" "$CACHE_OUT/initramfs-stock.cpio"
  exit 0
fi
cache_begin
if [ -n "$CACHE_HIT" ]; then
  emit "$CACHE_OUT/vmlinux" "$CACHE_OUT/initramfs-stock.cpio"
  exit 0
fi
start=$SECONDS
work=$CACHE_TMP/work
mkdir -p "$work/dl" "$work/pkg"

log "downloading $kpkg=$kver_pkg"
(cd "$work/dl" && apt-get download -q -o APT::Sandbox::User=root "$kpkg=$kver_pkg" >&2)
deb=$(echo "$work"/dl/*.deb)
[ -f "$deb" ] || die "download of $kpkg failed"
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$work/pkg"

moddir=$(echo "$work"/pkg/lib/modules/*)
[ -d "$moddir/kernel" ] || die "no lib/modules/<version>/kernel in $kpkg"
kver=$(basename "$moddir")
vmlinuz=$work/pkg/boot/vmlinuz-$kver
[ -f "$vmlinuz" ] || die "no /boot/vmlinuz-$kver in $kpkg"

# ---- vmlinux out of the bzImage ------------------------------------------------------------
# is_elf_vmlinux FILE: an x86-64 ELF executable?
is_elf_vmlinux() {
  readelf -h "$1" >/dev/null 2>&1 && file -b "$1" | grep -q '^ELF 64-bit LSB executable, x86-64'
}
# try_decompress MAGIC_REGEX TOOL...: decompress from each offset where MAGIC occurs.
try_decompress() {
  local magic=$1 off
  shift
  command -v "$1" >/dev/null || return 1
  while IFS=: read -r off _; do
    tail -c +$((off + 1)) "$vmlinuz" | "$@" > "$work/vmlinux" 2>/dev/null || true
    if is_elf_vmlinux "$work/vmlinux"; then
      log "found a $1 stream at offset $off of $(basename "$vmlinuz") holding an ELF vmlinux"
      return 0
    fi
  done < <(LC_ALL=C grep -obUaP "$magic" "$vmlinuz" | cut -d: -f1)
  return 1
}
try_decompress '\xfd7zXZ\x00' xz -dc --single-stream ||
  try_decompress '\x1f\x8b\x08' gzip -dc ||
  try_decompress '\x28\xb5\x2f\xfd' zstd -dcq ||
  die "no xz/gzip/zstd stream with an ELF vmlinux in $vmlinuz"
log "vmlinux: $(file -b "$work/vmlinux" | cut -c1-100)"
entry=$(readelf -h "$work/vmlinux" | awk '/Entry point/ { print $NF }')
pvh=$(readelf -n "$work/vmlinux" | awk '/Xen .*\(0x00000012\)/ { getline; a = ""; for (i = NF; i >= 3; i--) a = a $i; print "0x" a; exit }')
if [ -n "$pvh" ]; then
  log "vmlinux entry $entry; PVH entry (XEN_ELFNOTE_PHYS32_ENTRY note) $pvh"
else
  log "vmlinux entry $entry; no PVH entry note"
fi

# ---- modules --------------------------------------------------------------------------------
# Debian generates modules.dep etc. in the postinst; do it here for the unpacked tree.
depmod -b "$work/pkg" "$kver"
declare -A mod_path=() mod_deps=() mod_soft=() state=() builtin=()
modname() { local n=${1##*/}; n=${n%%.ko*}; printf '%s\n' "${n//-/_}"; }
while IFS= read -r line; do
  path=${line%%:*}
  n=$(modname "$path")
  mod_path[$n]=$path
  mod_deps[$n]=${line#*:}
done < "$moddir/modules.dep"
while IFS= read -r line; do
  builtin[$(modname "$line")]=1
done < "$moddir/modules.builtin"
# "softdep ext4 pre: crypto-crc32c" (ext4/jbd2 need a crc32c implementation at mount time).
while read -r word n rest; do
  [ "$word" = softdep ] || continue
  pre=$(printf '%s\n' "$rest" | sed -n 's/^pre: *\([^:]*\)\( post:.*\)\{0,1\}$/\1/p')
  mod_soft[$(modname "$n")]+=" $pre"
done < "$moddir/modules.softdep"
# resolve_alias NAME: a module for NAME (a module name or an alias; prefer *_generic).
resolve_alias() {
  local a=$1 n
  n=$(modname "$a")
  if [ -n "${mod_path[$n]:-}" ] || [ -n "${builtin[$n]:-}" ]; then
    printf '%s\n' "$n"
    return
  fi
  awk -v a="$a" '$1 == "alias" && $2 == a { print $3 }' "$moddir/modules.alias" |
    sort -u | awk '/_generic$/ { g = $0 } NR == 1 { f = $0 } END { print (g != "" ? g : f) }'
}
order=()
visit() {
  local n=$1 d s
  case ${state[$n]:-} in visited) return ;; active) die "module dependency cycle at $n" ;; esac
  if [ -n "${builtin[$n]:-}" ]; then
    log "module $n is built into the kernel"
    state[$n]=visited
    return
  fi
  [ -n "${mod_path[$n]:-}" ] || die "module $n not found in $kpkg"
  state[$n]=active
  for s in ${mod_soft[$n]:-}; do
    d=$(resolve_alias "$s")
    [ -n "$d" ] || die "softdep $s of $n: no module provides it"
    log "softdep: $n wants $s -> $d"
    visit "$d"
  done
  for d in ${mod_deps[$n]}; do visit "$(modname "$d")"; done
  state[$n]=visited
  order+=("$n")
}
for m in "${MODULES[@]}"; do visit "$m"; done
log "module load order: ${order[*]}"

# ---- initramfs ------------------------------------------------------------------------------
root=$work/root
initramfs_populate "$root"
: > "$root/etc/ssi-modules"
for n in "${order[@]}"; do
  src=$moddir/${mod_path[$n]}
  rel=${mod_path[$n]%.ko*}.ko
  dst=$root/lib/modules/$kver/$rel
  mkdir -p "$(dirname "$dst")"
  case $src in
    *.ko) cp "$src" "$dst" ;;
    *.ko.xz) xz -dc "$src" > "$dst" ;;
    *.ko.gz) gzip -dc "$src" > "$dst" ;;
    *.ko.zst) need_pkgs zstd; zstd -dcq "$src" > "$dst" ;;
    *) die "unknown module file type: $src" ;;
  esac
  vm=$(modinfo -F vermagic "$dst")
  case $vm in "$kver "*) ;; *) die "$rel: vermagic '$vm' is not for $kver" ;; esac
  echo "/lib/modules/$kver/$rel" >> "$root/etc/ssi-modules"
done
initramfs_pack "$root" "$CACHE_TMP/initramfs-stock.cpio"

mv "$work/vmlinux" "$CACHE_TMP/vmlinux"
cp "$vmlinuz" "$work/pkg/boot/config-$kver" "$CACHE_TMP/"
cp "$root/etc/ssi-modules" "$CACHE_TMP/modules.txt"
rm -rf "$work"
cache_commit
log "done in $((SECONDS - start)) s: $CACHE_OUT (kernel $kver, package $kpkg $kver_pkg)"
emit "$CACHE_OUT/vmlinux" "$CACHE_OUT/initramfs-stock.cpio"
