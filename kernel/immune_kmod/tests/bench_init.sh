#!/bin/busybox sh
# /init of the benchmark guest (benchmarks/kmod_overhead.py): the cost of
# hooked operations without the module, with it in audit mode, with it
# loaded but disabled, and after unloading it (a first round warms up
# QEMU's translation cache). Prints "PHASE name" then "BENCH ..." lines.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
ip link set lo up
S=/sys/class/misc/immune
N=${N:-20000}

bench() {
	echo "PHASE $1"
	guest_probe bench open "$N" /init
	guest_probe bench open "$N" /etc/shadow
	guest_probe bench connect $((N / 4))
	guest_probe bench fork $((N / 10))
}

bench warmup
bench none
insmod /immune.ko
echo 0 > $S/log_level
bench audit
echo 0 > $S/enabled
bench disabled
rmmod immune
bench unloaded
poweroff -f
