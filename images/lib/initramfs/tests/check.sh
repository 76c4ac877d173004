#!/bin/sh
# ssi.test=check: the multi-threaded SMP correctness checker /bin/ssi-check (source:
# images/checker/ssi-check.c; only build-initramfs.sh's initramfs has it). One worker per
# online CPU, pinned: locked counters (mutex and spinlock), message rings between every pair
# of workers, a memory pattern written by one worker and verified by another.
#   ssi.check_seconds=S  time budget of the phases (default 20)
#   ssi.check_mem=MB     memory phase buffer in MiB (default 64; 0 skips the phase)
#   ssi.check_mem_own=1  each worker verifies only its own share of that buffer
# First, 5 s of `ssi-check --vector` (all user vector/FPU register state the CPU has across
# context switches) and 15 s of `ssi-check --tlb` (mprotect() flips whose TLB shootdowns must
# reach the other CPUs: their writes to the page must fault after every downgrade), each with
# a 120 s watchdog. Their result lines (SSI-CHECK-VECTOR: / SSI-CHECK-TLB:, printed by
# ssi-check also on mismatches and TIMEOUT) come before SSI-VMM-CHECK-FAILED=vector / =tlb
# (exit 1), which ends the test.
#   ssi.check_aggr=MB    afterwards, a second run with only the memory phase over MB MiB,
#                        each worker on its own share (memory aggregation across hosts);
#                        its result line starts with "SSI-CHECK-AGGR:"
# Prints ssi-check's output (ending in "SSI-CHECK: threads=N cpus=C ops=X mismatches=M"),
# then SSI-VMM-CHECK-OK (exit 0) or SSI-VMM-CHECK-FAILED=<ssi-check's exit status> (exit it;
# 127 if the binary is missing).
# shellcheck disable=SC1091  # lives in the initramfs
. /etc/ssi-functions.sh

secs=$(ssi_param ssi.check_seconds) || secs=
mem=$(ssi_param ssi.check_mem) || mem=
secs=${secs:-20}
mem=${mem:-64}
own=$(ssi_param ssi.check_mem_own) || own=
own=${own:-0}
aggr=$(ssi_param ssi.check_aggr) || aggr=
aggr=${aggr:-0}

if [ ! -x /bin/ssi-check ]; then
  echo "check: /bin/ssi-check missing (not built into this initramfs)"
  echo "SSI-VMM-CHECK-FAILED=127"
  exit 127
fi
echo "SSI-VMM-NPROC=$(nproc)"
# mode_failed NAME RC: ssi-check printed its result line (unless it was killed); the verdict.
mode_failed() {
  echo "check: ssi-check --$1 failed with exit status $2"
  echo "SSI-VMM-CHECK-FAILED=$1"
  exit 1
}
# Vector registers must survive context switches (see ssi-check --vector).
/bin/ssi-check --vector 5 --watchdog 120 || mode_failed vector $?
# TLB shootdowns across CPUs (hosts): after each mprotect(PROT_READ), writes from the other
# CPUs must fault; a lost shootdown IPI hangs the writer (the watchdog reports TIMEOUT).
/bin/ssi-check --tlb 15 --watchdog 120 || mode_failed tlb $?
echo "check: running ssi-check --seconds $secs --mem $mem --mem-own $own"
/bin/ssi-check --seconds "$secs" --mem "$mem" --mem-own "$own" --watchdog 1800
rc=$?
if [ "$rc" -eq 0 ] && [ "$aggr" -gt 0 ]; then
  echo "check: running ssi-check --seconds 1 --mem $aggr --mem-own 1 (aggregation)"
  /bin/ssi-check --seconds 1 --mem "$aggr" --mem-own 1 --watchdog 2400 > /tmp/aggr.out
  rc=$?
  sed 's/^SSI-CHECK:/SSI-CHECK-AGGR:/' /tmp/aggr.out
fi
if [ "$rc" -eq 0 ]; then
  echo "SSI-VMM-CHECK-OK"
else
  echo "SSI-VMM-CHECK-FAILED=$rc"
fi
exit "$rc"
