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
# A file name that would forge a line of the kernel log if not escaped.
evil=$(printf '/tmp/x\nimmune: forged')
cp /tmp/dropper.sh "$evil"
echo "STEP block exec_newline"
/bin/guest_probe exec "$evil"

# The agent's policy, as immune.agent.kmod.apply_policy wrote it (the test
# put those files in /policy), in the order it writes them.
echo "STEP tunables"
for name in exec_dirs patterns files ports log_level monitor_network \
	monitor_files monitor_credentials block_mode enabled; do
	[ -f /policy/$name ] || continue
	cat /policy/$name > $S/$name
	echo "RESULT policy_$name rc=$?"
done
for name in enabled block_mode monitor_network monitor_files \
	monitor_credentials log_level exec_dirs patterns files ports; do
	echo "TUNABLE $name $(od -An -v -tx1 < $S/$name | tr -d ' \n')"
done
echo "bogus" > $S/ports
echo "RESULT ports_bad rc=$?"
echo "TUNABLE ports_after $(cat $S/ports)"
echo "STEP tunables connect_4444"
/bin/guest_probe connect 127.0.0.1 4444
echo "STEP tunables connect_7777"
/bin/guest_probe connect 127.0.0.1 7777
echo "STEP tunables exec_tmp"
/bin/guest_probe exec /tmp/dropper.sh
echo "STEP tunables dump"
/bin/guest_probe dump
echo 0 > $S/enabled
echo "STEP disabled exec_tmp"
/bin/guest_probe exec /tmp/dropper.sh
echo 1 > $S/enabled
echo "STEP disabled dump"
/bin/guest_probe dump
# Two CPUs: hooks fire on both while a reader drains the ring.
echo "STEP stress"
echo "TUNABLE cpus $(grep -c ^processor /proc/cpuinfo)"
/bin/guest_probe drain 2 &
/bin/guest_probe bench open 3000 /etc/shadow &
/bin/guest_probe bench connect 1000 &
/bin/guest_probe bench fork 300
wait
echo "STEP flood"
/bin/guest_probe open /etc/shadow 1100
echo "TUNABLE stats $(tr '\n' ' ' < $S/stats)"
/bin/guest_probe count
echo "STEP rmmod"
rmmod immune
echo "RESULT rmmod rc=$?"
dmesg | grep 'immune:' | sed 's/^/DMESG /'
dmesg | grep -E 'WARNING|BUG|Oops|protection fault|lockup|stall' |
	sed 's/^/KERN /'
echo "STEP poweroff"
poweroff -f
