#!/usr/bin/env bash
# Builds a Debian bookworm guest root file system for ssi-vmm as a raw ext4 image (whole
# device, no partition table) with debootstrap (--variant=minbase + systemd, udev, dbus,
# stress-ng, gcc/make/libc6-dev, procps, iproute2, kmod, util-linux, e2fsprogs) and
# `mkfs.ext4 -d` (no loop mounts). The image holds no kernel: boot it with the lean guest
# kernel, e.g. `console=ttyS0 root=/dev/vda rw`.
#
# Configuration: hostname ssi-guest; root with an empty password, auto-logged-in on ttyS0
# (serial getty, skipped when ssi.cmd= is given); fstab mounts /dev/vda on / (ext4); no
# networking; timers/services that only cost boot time are masked; ssi-vmm-run.service
# (after multi-user.target) prints SSI-VMM-MULTI-USER on ttyS0 and, with ssi.cmd=CMD on the
# kernel command line ("+" = space), runs CMD, prints SSI-VMM-CMD-EXIT=<rc>, keeps the
# output in /var/lib/ssi-vmm/last-run, syncs and powers off (see images/README.md).
#
# Output (stdout, one line): path of debian.img (sparse, SSI_DEBIAN_SIZE, default 3G).
#   The cache entry also holds packages.txt (the installed packages and versions).
# Cache: ${SSI_CACHE:-$HOME/.cache/ssi-vmm}/debian-<hash>/, hash over this script,
#   lib/common.sh, lib/debian/, the mirror, the image size, the debootstrap and e2fsprogs
#   versions and apt's candidate versions of the included packages. Downloaded .debs are
#   kept in ${SSI_CACHE}/debootstrap-debs/ for rebuilds.
# The mirror is the host's configured Debian mirror for bookworm (from apt's configuration,
#   `apt-get indextargets`), or SSI_DEBIAN_MIRROR if set. Takes several minutes.
set -euo pipefail
SSI_NAME=debian
# shellcheck source=lib/common.sh
. "$(dirname "$0")/lib/common.sh"

SUITE=bookworm
SIZE=${SSI_DEBIAN_SIZE:-3G}
INCLUDE=systemd,systemd-sysv,udev,dbus,stress-ng,gcc,libc6-dev,make,procps,iproute2,kmod,util-linux,e2fsprogs
# Units that only cost boot time in a VM (masked; some are not even installed).
# Under emulation every process start costs seconds, so what a VM with one disk and a serial
# port does not need is masked too (measured in a boot with the lean kernel: udev's coldplug
# trigger ran for more than 20 minutes; journal-flush hit its own 90 s timeout; the modprobe@
# units and systemd-modules-load have nothing to load, the lean kernel has no modules;
# systemd-sysctl fails on keys the lean kernel does not have). udevd itself still runs
# (hotplug); device units are not waited for: / is mounted by the kernel (no fstab entry)
# and the console getty uses /dev/console.
MASK=(systemd-timesyncd.service systemd-networkd-wait-online.service
  apt-daily.timer apt-daily.service apt-daily-upgrade.timer apt-daily-upgrade.service
  e2scrub_all.timer e2scrub_all.service e2scrub_reap.service man-db.timer man-db.service
  fstrim.timer dpkg-db-backup.timer dpkg-db-backup.service logrotate.timer
  systemd-tmpfiles-clean.timer
  systemd-udev-trigger.service systemd-udev-settle.service modprobe@.service
  systemd-modules-load.service systemd-journal-flush.service systemd-sysctl.service
  systemd-pstore.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount
  sys-kernel-debug.mount sys-kernel-tracing.mount sys-kernel-config.mount
  sys-fs-fuse-connections.mount dev-hugepages.mount serial-getty@ttyS0.service)
FILES=$SSI_IMAGES_DIR/lib/debian

need_pkgs debootstrap e2fsprogs debian-archive-keyring util-linux

detect_mirror() {
  local m
  # shellcheck disable=SC2016  # $(SITE) is apt's format syntax
  m=$(apt-get indextargets --format '$(SITE)' "Release: $SUITE" 'Identifier: Packages' | head -n 1)
  if [ -z "$m" ]; then
    # The host tracks another release: take its (non-security) Debian archive.
    # shellcheck disable=SC2016
    m=$(apt-get indextargets --format '$(SITE)' 'Identifier: Packages' 'Origin: Debian' |
      grep -v -- '-security' | head -n 1)
  fi
  printf '%s\n' "$m"
}
mirror=${SSI_DEBIAN_MIRROR:-$(detect_mirror)}
[ -n "$mirror" ] || die "found no Debian mirror in apt's configuration; set SSI_DEBIAN_MIRROR"
log "mirror $mirror, suite $SUITE"

# apt's candidate versions of the included packages (only meaningful on a host of that release).
candidates() {
  local codename
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ "$codename" = "$SUITE" ] || return 0
  # shellcheck disable=SC2046
  apt-cache policy $(tr , ' ' <<< "$INCLUDE") 2>/dev/null |
    awk '/^[^ ]/ { p = $1 } $1 == "Candidate:" { print p, $2 }'
}
key=$({
  echo "mirror $mirror suite $SUITE size $SIZE include $INCLUDE mask ${MASK[*]}"
  echo "debootstrap $(pkg_installed_version debootstrap)"
  echo "e2fsprogs $(pkg_installed_version e2fsprogs)"
  candidates
} | cache_key "$0" "$SSI_IMAGES_DIR/lib/common.sh" "$FILES")
if cache_lookup debian "$key"; then
  log "cached: $CACHE_OUT"
  emit "$CACHE_OUT/debian.img"
  exit 0
fi
cache_begin
if [ -n "$CACHE_HIT" ]; then
  emit "$CACHE_OUT/debian.img"
  exit 0
fi
start=$SECONDS
root=$CACHE_TMP/root
debs=$SSI_CACHE_ROOT/debootstrap-debs
mkdir -p "$debs"

log "debootstrap --variant=minbase $SUITE (several minutes)"
debootstrap --variant=minbase --include="$INCLUDE" --components=main --cache-dir="$debs" \
  "$SUITE" "$root" "$mirror" >&2
umount_below "$root"   # in case debootstrap left /proc or /sys mounted
log "debootstrap done after $((SECONDS - start)) s; configuring"

chmod 755 "$root"
echo ssi-guest > "$root/etc/hostname"
cat > "$root/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	ssi-guest
::1		localhost ip6-localhost ip6-loopback
HOSTS
cat > "$root/etc/fstab" <<'FSTAB'
# ssi-vmm guest: the whole virtio-blk disk (/dev/vda) is the root file system, mounted
# read-write by the kernel (root=/dev/vda rw); no entry, so no unit waits for the device.
FSTAB
: > "$root/etc/resolv.conf"
sed -i 's/^root:[^:]*:/root::/' "$root/etc/shadow"   # empty root password
grep -q '^root::' "$root/etc/shadow" || die "could not clear root's password"

sysd=$root/etc/systemd/system
# Console: autologin root on /dev/console (console=ttyS0), no getty when ssi.cmd= runs a batch
# command. console-getty, not serial-getty@ttyS0: the latter waits for udev's dev-ttyS0.device.
mkdir -p "$sysd/console-getty.service.d" "$sysd/getty.target.wants" "$sysd/multi-user.target.wants"
install -m 644 "$FILES/console-getty-autologin.conf" "$sysd/console-getty.service.d/autologin.conf"
ln -sf /lib/systemd/system/console-getty.service "$sysd/getty.target.wants/console-getty.service"
# The batch runner.
install -m 755 "$FILES/ssi-vmm-run" "$root/usr/local/sbin/ssi-vmm-run"
install -m 644 "$FILES/ssi-vmm-run.service" "$sysd/ssi-vmm-run.service"
ln -sf /etc/systemd/system/ssi-vmm-run.service "$sysd/multi-user.target.wants/ssi-vmm-run.service"
ln -sf /lib/systemd/system/multi-user.target "$sysd/default.target"
for u in "${MASK[@]}"; do
  rm -f "$sysd/$u" "$sysd"/*.wants/"$u"
  ln -s /dev/null "$sysd/$u"
done
mkdir -p "$root/etc/systemd/system.conf.d"
# Guest kernel code is emulated on the project's machines: starting a unit or waiting for a
# device can take many minutes, so no start or device timeout (the defaults, 90 s, failed
# journald, udevd and dev-ttyS0 in a measured boot).
printf '[Manager]\nDefaultTimeoutStopSec=10s\nDefaultTimeoutStartSec=infinity\nDefaultDeviceTimeoutSec=infinity\n' > "$root/etc/systemd/system.conf.d/ssi-vmm.conf"

# Do at build time what systemd would otherwise do at first boot (ConditionNeedsUpdate=):
# hwdb, ldconfig; then mark /etc and /var as up to date.
chroot "$root" systemd-hwdb update
chroot "$root" ldconfig
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
  "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
touch "$root/etc/.updated" "$root/var/.updated"
dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Package} ${Version}\n' > "$CACHE_TMP/packages.txt"
log "rootfs: $(du -sh "$root" | cut -f1), $(wc -l < "$CACHE_TMP/packages.txt") packages"

log "mkfs.ext4 -d (size $SIZE, sparse)"
truncate -s "$SIZE" "$CACHE_TMP/debian.img"
mkfs.ext4 -q -F -L ssi-root -d "$root" "$CACHE_TMP/debian.img" >&2
rm -rf --one-file-system "$root"
e2fsck -fn "$CACHE_TMP/debian.img" >&2
cache_commit
log "done in $((SECONDS - start)) s: $CACHE_OUT/debian.img ($(du -h "$CACHE_OUT/debian.img" | cut -f1) used of $SIZE)"
emit "$CACHE_OUT/debian.img"
