#!/bin/sh
# ssi.test=par: a CPU-parallel workload. The same user-mode busy loop (busybox sh arithmetic,
# no system calls) runs once alone on CPU 0, then once on every online CPU at the same time.
#   ssi.par_iters=N  loop iterations per CPU (default 1000000)
# Markers (times from /proc/uptime, 10 ms resolution; guest time is kvmclock, shared by hosts):
#   SSI-VMM-PAR-SINGLE-MS=<one CPU>  SSI-VMM-PAR-ALL-MS=<all CPUs>  SSI-VMM-PAR-CPUS=<n>
#   SSI-VMM-PAR-SPEEDUP-X100=<100 * n * single / all>
# shellcheck disable=SC1091  # lives in the initramfs
. /etc/ssi-functions.sh

iters=$(ssi_param ssi.par_iters) || iters=
iters=${iters:-1000000}
ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
spin() { taskset -c "$1" sh -c "i=0; while [ \$i -lt $iters ]; do i=\$((i+1)); done"; }

n=$(nproc)
t0=$(ms)
spin 0
t1=$(ms)
single=$((t1 - t0))
cpu=0
while [ "$cpu" -lt "$n" ]; do
  spin "$cpu" &
  cpu=$((cpu + 1))
done
wait
t2=$(ms)
all=$((t2 - t1))
echo "SSI-VMM-PAR-CPUS=$n"
echo "SSI-VMM-PAR-SINGLE-MS=$single"
echo "SSI-VMM-PAR-ALL-MS=$all"
[ "$all" -gt 0 ] && echo "SSI-VMM-PAR-SPEEDUP-X100=$((100 * n * single / all))"
exit 0
