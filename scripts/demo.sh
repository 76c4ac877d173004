#!/usr/bin/env bash
# The main job on a fresh machine: install what is needed, build the guest kernel and the test
# initramfs (cached), build ssi-vmm, and boot the default guest across a local cluster of host
# processes (`ssi-vmm up --local N`, one vCPU each; host 0 has the console) with an interactive
# shell (exit the shell to power the guest off and stop every host).
#   scripts/demo.sh [--hosts N] [--cpus-per-host C] [--memory SIZE] [extra `ssi-vmm up` arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
hosts=2
cpus=1
memory=512M
while [ $# -gt 0 ]; do
  case $1 in
    --hosts) hosts=$2; shift 2 ;;
    --cpus-per-host) cpus=$2; shift 2 ;;
    --memory) memory=$2; shift 2 ;;
    *) break ;;
  esac
done
command -v cargo >/dev/null || { echo "cargo (Rust toolchain) is required" >&2; exit 1; }
kernel=$(bash guest-kernel-config/build.sh)
initrd=$(bash images/build-initramfs.sh)
cargo build --release -p vmm --bin ssi-vmm >&2
echo "booting $kernel on $hosts host processes x $cpus vCPU(s), $memory (guest kernel code is emulated on this host: expect several minutes; \`ssi-vmm status\` in another terminal shows the hosts)" >&2
exec target/release/ssi-vmm up --local "$hosts" --cpus-per-host "$cpus" --kernel "$kernel" --initrd "$initrd" --memory "$memory" "$@"
