#!/bin/sh
# ssi.test=boot: what the boot tests check in one run: the CPU count (nproc.sh markers) and
# basic userspace sanity on every CPU (smoke.sh), a fork/exec loop pinned to each CPU, and
# (where /bin/ssi-check exists) 3 s of the vector-register check.
# Prints SSI-VMM-BOOT-OK or SSI-VMM-BOOT-FAILED.
fail=0
sh /tests/nproc.sh || fail=1
sh /tests/smoke.sh || fail=1
n=$(nproc)
cpu=0
while [ "$cpu" -lt "$n" ]; do
  # 50 fork+exec+exit cycles on this CPU: each is several syscalls through the VMM.
  out=$(taskset -c "$cpu" sh -c 'i=0; while [ $i -lt 50 ]; do /bin/true || exit 1; i=$((i+1)); done; echo ok' 2>&1)
  if [ "$out" = ok ]; then
    echo "boot: cpu $cpu fork/exec ok"
  else
    echo "boot: cpu $cpu fork/exec FAILED: $out"
    fail=1
  fi
  cpu=$((cpu + 1))
done
# User vector registers (AVX-512 where the CPU has it) must survive context switches.
if [ -x /bin/ssi-check ]; then /bin/ssi-check --vector 3 --watchdog 120 || fail=1; fi
if [ "$fail" -eq 0 ]; then echo "SSI-VMM-BOOT-OK"; else echo "SSI-VMM-BOOT-FAILED"; fi
exit "$fail"
