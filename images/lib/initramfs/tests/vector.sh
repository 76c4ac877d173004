#!/bin/sh
# ssi.test=vector: user vector registers (zmm16 / ymm7 / xmm7, the widest the CPU reports
# usable) must survive context switches: two threads per CPU keep a pattern in the register
# across sched_yield(). Prints "SSI-CHECK-VECTOR: ... mismatches=M"; exit 0 iff M == 0.
#   ssi.vector_seconds=S (default 10)
# shellcheck disable=SC1091  # lives in the initramfs
. /etc/ssi-functions.sh
secs=$(ssi_param ssi.vector_seconds) || secs=
/bin/ssi-check --vector "${secs:-10}"
