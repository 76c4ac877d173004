#!/bin/sh
# ssi.test=disk: exercise the virtio-blk disk /dev/vda (ext4, whole device).
#   Mounts it on /mnt (read-only if ssi.disk=ro), prints SSI-VMM-DISK-READ=<first line of
#   /mnt/ssi-vmm-probe> if that file exists; unless read-only, writes the decoded ssi.token=
#   value (default "no-token") as one line to /mnt/ssi-vmm-written, syncs, reads it back and
#   prints SSI-VMM-DISK-WROTE=<token>; unmounts and prints SSI-VMM-DISK-OK.
#   Failures print SSI-VMM-DISK-FAILED=<reason> and exit 1.
#   ssi.diskwait=SECONDS (default 10): how long to wait for /dev/vda to appear.
# shellcheck disable=SC1091  # lives in the initramfs
. /etc/ssi-functions.sh

dev=/dev/vda
fail() { echo "SSI-VMM-DISK-FAILED=$1"; exit 1; }

wait_s=$(ssi_param ssi.diskwait) || wait_s=10
i=0
while [ ! -b "$dev" ] && [ "$i" -lt $((wait_s * 10)) ]; do
  usleep 100000
  i=$((i + 1))
done
[ -b "$dev" ] || fail "no-$dev"

mode=$(ssi_param ssi.disk) || mode=rw
if [ "$mode" = ro ]; then
  mount -t ext4 -o ro "$dev" /mnt || fail mount-ro
else
  mount -t ext4 "$dev" /mnt || fail mount
fi
echo "disk: mounted $dev on /mnt ($mode)"

if [ -f /mnt/ssi-vmm-probe ]; then
  echo "SSI-VMM-DISK-READ=$(head -n 1 /mnt/ssi-vmm-probe)"
fi

if [ "$mode" != ro ]; then
  if token=$(ssi_param ssi.token); then
    token=$(ssi_decode "$token")
  else
    token=no-token
  fi
  printf '%s\n' "$token" > /mnt/ssi-vmm-written || { umount /mnt; fail write; }
  sync
  back=$(head -n 1 /mnt/ssi-vmm-written)
  [ "$back" = "$token" ] || { umount /mnt; fail "readback:$back"; }
  echo "SSI-VMM-DISK-WROTE=$token"
fi

umount /mnt || fail umount
sync
echo "SSI-VMM-DISK-OK"
