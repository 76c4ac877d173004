#!/bin/sh
# ssi.test=nproc: report how many CPUs the guest kernel brought up.
# Markers: SSI-VMM-NPROC=<nproc>, SSI-VMM-CPUINFO-PROCESSORS=<processor lines in /proc/cpuinfo>,
#          SSI-VMM-CPUS-ONLINE=<contents of /sys/devices/system/cpu/online>.
echo "SSI-VMM-NPROC=$(nproc)"
echo "SSI-VMM-CPUINFO-PROCESSORS=$(grep -c '^processor' /proc/cpuinfo)"
if [ -r /sys/devices/system/cpu/online ]; then
  echo "SSI-VMM-CPUS-ONLINE=$(cat /sys/devices/system/cpu/online)"
fi
