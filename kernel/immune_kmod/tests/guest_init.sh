#!/bin/busybox sh
# /init of the test guest: load the module, trigger each hook in audit mode
# and in block mode, dump the records, unload, power off. Every line the
# test reads starts with an upper-case tag (STEP, RESULT, REC, ...).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /var/tmp /dev/shm
ip link set lo up
chmod 1777 /tmp

S=/sys/class/misc/immune
echo "STEP insmod"
insmod /immune.ko
echo "RESULT insmod rc=$?"
echo "TUNABLE stats $(tr '\n' ' ' < $S/stats)"

printf '#!/bin/sh\necho SCRIPT-RAN\n' > /tmp/dropper.sh
chmod 755 /tmp/dropper.sh

hooks() {
	phase=$1
	echo "STEP $phase exec_tmp"
	/bin/guest_probe exec /tmp/dropper.sh
	echo "STEP $phase exec_pattern"
	/bin/guest_probe exec /bin/sh -c "nc 127.0.0.1 4444; echo PATTERN-RAN"
	echo "STEP $phase exec_ok"
	/bin/guest_probe exec /bin/true
	echo "RESULT exec_ok rc=$?"
	echo "STEP $phase connect_blocked"
	/bin/guest_probe connect 127.0.0.1 4444
	echo "STEP $phase connect_ok"
	/bin/guest_probe connect 127.0.0.1 8080
	echo "STEP $phase bind_priv"
	/bin/guest_probe -u 1000 bind 80
	echo "STEP $phase open_shadow"
	/bin/guest_probe open /etc/shadow
	echo "STEP $phase setuid"
	/bin/guest_probe setuid
	echo "STEP $phase dump"
	/bin/guest_probe dump
}

echo 0 > $S/block_mode
hooks audit
echo 1 > $S/block_mode
hooks block

echo "STEP tunables"
echo 7777 > $S/ports
echo "RESULT ports_write rc=$?"
echo "TUNABLE ports $(cat $S/ports)"
echo "bogus" > $S/ports
echo "RESULT ports_bad rc=$?"
echo "TUNABLE ports_after $(cat $S/ports)"
/bin/guest_probe connect 127.0.0.1 4444
/bin/guest_probe connect 127.0.0.1 7777
echo 0 > $S/enabled
/bin/guest_probe exec /tmp/dropper.sh
echo 1 > $S/enabled
echo "TUNABLE stats $(tr '\n' ' ' < $S/stats)"
/bin/guest_probe dump
echo "STEP rmmod"
rmmod immune
echo "RESULT rmmod rc=$?"
dmesg | grep 'immune:' | sed 's/^/DMESG /'
echo "STEP poweroff"
poweroff -f
