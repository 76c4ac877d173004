#!/bin/sh
# ssi.test=smoke: basic userspace sanity. Prints SSI-VMM-SMOKE-OK (exit 0) or
# SSI-VMM-SMOKE-FAILED (exit 1) at the end.
fail=0
bad() { echo "smoke: FAILED: $*"; fail=1; }

echo "== uname -a";   uname -a || bad uname
echo "== free";       free || bad free
echo "== mount";      mount || bad mount
echo "== dmesg | tail"; dmesg | tail -n 10
echo "== date";       date || bad date

echo "== arithmetic"
n=$((6 * 7))
[ "$n" -eq 42 ] || bad "6*7 = $n"
sum=$(seq 1 1000 | awk '{ s += $1 } END { print s }')
[ "$sum" = 500500 ] || bad "sum 1..1000 = $sum"
echo "6*7=$n sum(1..1000)=$sum"

echo "== file in /tmp"
f=/tmp/ssi-smoke.$$
printf 'ssi-vmm smoke %s\n' "$n" > "$f" || bad "write $f"
line=
read -r line < "$f" || bad "read $f"
[ "$line" = "ssi-vmm smoke 42" ] || bad "read back '$line'"
echo "read back: $line"
rm -f "$f"
[ ! -e "$f" ] || bad "rm $f"

if [ "$fail" -eq 0 ]; then
  echo "SSI-VMM-SMOKE-OK"
else
  echo "SSI-VMM-SMOKE-FAILED"
fi
exit "$fail"
