#!/usr/bin/env bash
# Builds the ssi-vmm test initramfs: Debian's busybox-static with all applet links, an /init
# implementing the ssi-vmm test protocol, the tests in /tests (see images/README.md) and the
# SMP checker /bin/ssi-check (checker/ssi-check.c, compiled static with the host's gcc).
# For guest kernels with everything built in (no modules). Before packing, the checker's
# self-tests run on the host (a few seconds): the shipped binary must pass its normal,
# --tlb and --vector runs, and each -DBREAK_* build must report mismatches.
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

# Self-tests on the host (a few seconds): the binary we ship must pass where SMP is not in
# question, and every self-test build (-DBREAK_*, never shipped) must be caught: exit status
# non-zero and a result line with mismatches > 0. Their binaries and outputs stay in
# $selftest, which is removed before the entry is committed.
selftest=$CACHE_TMP/selftest
mkdir -p "$selftest"

# checker_run NAME pass|fail BINARY ARGS...: run one checker binary on the host (bounded by
# timeout, in case even its watchdog does not end it) and check its exit status and the
# mismatches= of its last result line (SSI-CHECK: / SSI-CHECK-TLB: / SSI-CHECK-VECTOR:).
checker_run() {
  local name=$1 expect=$2 bin=$3 out rc=0 m
  shift 3
  out=$selftest/$name.out
  timeout -k 10 300 "$bin" "$@" > "$out" 2>&1 || rc=$?
  m=$(sed -n 's/^SSI-CHECK[A-Z-]*: .* mismatches=\([0-9][0-9]*\)$/\1/p' "$out" | tail -n 1)
  if [ "$expect" = pass ]; then
    log "self-test $name: ssi-check $* (must pass):"
    sed 's/^/    /' "$out" >&2
    if [ "$rc" -ne 0 ] || [ "${m:-x}" != 0 ]; then
      die "self-test $name: ssi-check fails on the host (exit status $rc, mismatches=${m:-none})"
    fi
  else
    log "self-test $name: ssi-check $* (must report mismatches):"
    { grep -m 2 'MISMATCH' "$out" || true; grep '^SSI-CHECK' "$out" || true; } | sed 's/^/    /' >&2
    [ -n "$m" ] || die "self-test $name: no result line (exit status $rc)"
    if [ "$rc" -eq 0 ] || [ "$m" -eq 0 ]; then
      die "self-test $name: the -D$name build was not caught (exit status $rc," \
        "mismatches=$m): ssi-check misses what it exists to detect"
    fi
  fi
}

bin=$CACHE_TMP/root/bin/ssi-check
checker_run phases pass "$bin" --seconds 0.3 --threads 2 --mem 4 --watchdog 60
checker_run tlb pass "$bin" --tlb 0.5 --watchdog 60
checker_run vector pass "$bin" --vector 0.5 --watchdog 60
for variant in BREAK_LOCKS BREAK_RINGS BREAK_MEM BREAK_TLB BREAK_VECTOR; do
  gcc "${CHECKER_CFLAGS[@]}" "-D$variant" -o "$selftest/ssi-check-$variant" \
    "$CHECKER_DIR/ssi-check.c"
  case $variant in
    BREAK_TLB) args=(--tlb 0.3 --watchdog 60) ;;
    BREAK_VECTOR) args=(--vector 0.3 --watchdog 60) ;;
    # More threads than a 2-CPU host has: time slicing inside the broken critical sections
    # and ring updates, not only true parallelism, so they are caught on a loaded host too.
    *) args=(--seconds 0.5 --threads 4 --mem 4 --watchdog 60) ;;
  esac
  checker_run "$variant" fail "$selftest/ssi-check-$variant" "${args[@]}"
done

initramfs_pack "$CACHE_TMP/root" "$CACHE_TMP/initramfs.cpio"
rm -rf "$CACHE_TMP/root" "$selftest"
cache_commit
log "done in $((SECONDS - start)) s: $CACHE_OUT"
emit "$CACHE_OUT/initramfs.cpio"
