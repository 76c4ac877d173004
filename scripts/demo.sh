#!/usr/bin/env bash
# The main job on a fresh machine: install what is needed, build the guest kernel and the test
# initramfs (cached), build ssi-vmm, and boot the default guest with an interactive shell on the
# console (exit the shell to power the guest off). For now the machine runs on one host.
#   scripts/demo.sh [--cpus N] [--memory SIZE] [extra ssi-vmm run arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
cpus=2
memory=512M
while [ $# -gt 0 ]; do
  case $1 in
    --cpus) cpus=$2; shift 2 ;;
    --memory) memory=$2; shift 2 ;;
    *) break ;;
  esac
done
command -v cargo >/dev/null || { echo "cargo (Rust toolchain) is required" >&2; exit 1; }
kernel=$(bash guest-kernel-config/build.sh)
initrd=$(bash images/build-initramfs.sh)
cargo build --release -p vmm --bin ssi-vmm >&2
echo "booting $kernel with $cpus vCPUs and $memory (guest kernel code is emulated on this host: expect a minute or two)" >&2
exec target/release/ssi-vmm run --kernel "$kernel" --initrd "$initrd" --cpus "$cpus" --memory "$memory" "$@"
