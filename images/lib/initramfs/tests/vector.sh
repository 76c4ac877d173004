#!/bin/sh
# ssi.test=vector: user vector state must survive context switches: two threads per CPU keep
# patterns in xmm0-15, the upper halves of ymm0-15 and zmm0-15, zmm16-31, k0-7, the x87
# control word and MXCSR (what the CPU and XCR0 enable) across sched_yield(). Prints
# "SSI-CHECK-VECTOR: ... mismatches=M"; exit 0 iff M == 0 and rounds > 0.
#   ssi.vector_seconds=S (default 10)
# shellcheck disable=SC1091  # lives in the initramfs
. /etc/ssi-functions.sh
secs=$(ssi_param ssi.vector_seconds) || secs=
/bin/ssi-check --vector "${secs:-10}" --watchdog 120
