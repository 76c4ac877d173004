#!/usr/bin/env bash
# The ssi-vmm test command (README; .ci/run calls exactly this).
#   scripts/test.sh          format + lint + unit tests + CLI tests + lean-kernel boot tests +
#                            cluster tests + a benchmark smoke run (a few samples of each bench)
#   scripts/test.sh --slow   also the slow guest tests (stock Debian kernel, Debian image)
# Installs what it needs (Debian packages via the build scripts) and builds the guest kernel and
# images into the cache (${SSI_CACHE:-~/.cache/ssi-vmm}) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
slow=0
[ "${1:-}" = "--slow" ] && slow=1

step() { echo; echo "=== $* ($(date +%T))"; }

step "host packages"
# mkfs.ext4/debugfs for the virtio-blk test; the kernel and image scripts install their own.
if ! command -v mkfs.ext4 >/dev/null || ! command -v debugfs >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends e2fsprogs || { apt-get update -q && apt-get install -y -q --no-install-recommends e2fsprogs; }
fi
step "rustfmt"
cargo fmt --all --check
step "clippy"
cargo clippy --workspace --all-targets --release -- -D warnings
step "build ssi-vmm (release)"
cargo build --release -p vmm --bin ssi-vmm
export SSI_VMM_BIN=$PWD/target/release/ssi-vmm
step "guest kernel (cached)"
bash guest-kernel-config/build.sh >/dev/null
step "test initramfs (cached)"
bash images/build-initramfs.sh >/dev/null
if [ "$slow" = 1 ]; then
  step "stock Debian kernel + initramfs (cached)"
  bash images/build-stock-kernel.sh >/dev/null
  step "Debian image (cached)"
  bash images/build-debian.sh >/dev/null
fi
step "benchmark smoke (few samples: the benchmarks keep working; numbers not recorded)"
cargo bench -p dsm-vm --bench dsm -- --quick
cargo bench -p vmm --bench ipi -- --quick
cargo run --release -p ssi-tests --bin bench -- boot --smoke
step "tests"
# Guest boots are CPU-bound and this machine has 2 cores: one test at a time.
if [ "$slow" = 1 ]; then
  cargo test --workspace --release -- --include-ignored --test-threads=1
else
  cargo test --workspace --release -- --test-threads=1
fi
