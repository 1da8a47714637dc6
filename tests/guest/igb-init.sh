#!/bin/sh
# tests/guest/igb-init.sh: the /init of the igb SR-IOV guest that tests/guest/igb-sriov.sh builds
# (busybox sh; not meant to run on the host). It enables two VFs on QEMU's emulated igb (an
# 82576), drives VF policy through netlink with iproute2 (VF 0) and, when /usr/bin/vftool is in
# the image, with the tool under test (VF 1), checks what the real igb/igbvf drivers and the
# emulated device make of it, prints
#   IGB-CHECK: PASS|FAIL name=.. detail=..     one per check
#   IGB-OUT: ..                                `ip -d link show $PF` at the end
#   IGB-RESULT: PASS|FAIL ..                   last line
# on the serial console and powers off. Progress lines start `IGB t=<uptime>`.
# Kernel command-line words it reads (all optional):
#   kit.timeout=SECONDS (240)  watchdog: FAIL when it runs out
#   kit.hold=1                 a shell on the console instead of powering off
# The tool's interface: `vftool vf PF N WORDS..` takes exactly iproute2's words after
# `ip link set PF vf N`; `vftool vf PF show` prints one line per VF.
# What it showed (QEMU 10.0.2, Debian 6.1.0-57 and 6.12.95 kernels, iproute2 6.1):
# - the PF has carrier (1000 Mb/s full) with no peer at all: `-netdev hubport` or no netdev;
#   max_tx_rate needs it (igb_ndo_set_vf_bw: above the link speed, or with the PF down,
#   "RTNETLINK answers: Invalid argument");
# - igb has no ndo for `state` or `query_rss` ("Operation not supported") and refuses a
#   min_tx_rate ("Invalid argument"); nothing changes on the VF after either;
# - igbvf reads its MAC from the PF at probe: a MAC set later lands on the netdev only after
#   a rebind ("Reload the VF driver"); an untrusted VF cannot change it ("Cannot assign
#   requested address"), a trusted one can;
# - the device switches VF to VF (MAC steering, broadcast copies to the PF too) and applies
#   port VLANs (a VLAN on one side cuts the pair off; the same one on both works);
# - the device enforces neither the TX rate (1 Mb/s: 512 KiB in 0.1 s) nor anti-spoofing
#   (a frame with a foreign source MAC crosses with spoofchk on): IGB-INFO lines.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu
# Debian's busybox shell runs its own applets before PATH (FEATURE_SH_STANDALONE): `ip` must
# name iproute2's by its path.
ip() { /bin/ip "$@"; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/netns
# Kernel messages stay off the console (they would cut our lines in half); dmesg is dumped,
# prefixed, at the end.
echo 1 > /proc/sys/kernel/printk
uptime_s() { read -r u _ < /proc/uptime; echo "$u"; }
say() { echo "IGB t=$(uptime_s) $*"; }
TIMEOUT=240 HOLD=0
for w in $(cat /proc/cmdline); do
  v=${w#*=}
  case "$w" in
    kit.timeout=*) TIMEOUT=$v ;; kit.hold=*) HOLD=$v ;;
  esac
done
TOOL=
[ -x /usr/bin/vftool ] && TOOL=/usr/bin/vftool
OK=1
NCHECK=0 NFAIL=0
# check PASS|FAIL NAME DETAIL..   (spaces in DETAIL stay: the line's last field)
check() {
  r=$1 n=$2; shift 2
  NCHECK=$((NCHECK + 1))
  [ "$r" = PASS ] || { OK=0; NFAIL=$((NFAIL + 1)); }
  echo "IGB-CHECK: $r name=$n detail=$*"
}
pass_if() { # pass_if CONDITION-RC NAME DETAIL..
  c=$1; shift
  if [ "$c" = 0 ]; then check PASS "$@"; else check FAIL "$@"; fi
}
oneline() { tr '\n' '|' | sed 's/|$//'; }
dump_out() { # dump_out PREFIX
  [ -n "$PF" ] && ip -d link show "$PF" 2>&1 | sed "s/^/$1: /"
}
finish() {
  dump_out IGB-OUT-END
  dmesg | grep -iE 'igb|sriov|vf|pci 0000:0[1-9]' | sed 's/^/IGB-DMESG: /'
  echo "IGB-RESULT: $1 checks=$NCHECK failed=$NFAIL tool=${TOOL:-none}$2 uptime_s=$(uptime_s)"
  [ "$HOLD" = 1 ] && exec sh
  poweroff -f; sleep 2; reboot -f
}
( sleep "$TIMEOUT"; echo "IGB-RESULT: FAIL reason=watchdog-${TIMEOUT}s"; poweroff -f ) &

say "init kernel=$(uname -r) tool=${TOOL:-none} timeout=$TIMEOUT"
for m in $(cat /etc/kit-modules); do insmod "/lib/modules/$m.ko" || say "insmod $m failed"; done
ip link set lo up

# --- the PF ------------------------------------------------------------------------------
PF=
i=0
while [ -z "$PF" ] && [ $i -lt 300 ]; do
  for d in /sys/bus/pci/drivers/igb/*/net/*; do [ -e "$d" ] && PF=${d##*/}; done
  [ -n "$PF" ] || { sleep 0.1; i=$((i + 1)); }
done
[ -n "$PF" ] || finish FAIL " reason=no-igb-netdev"
PFDEV=$(readlink -f /sys/class/net/$PF/device)
say "PF $PF at ${PFDEV##*/} vendor:device=$(cat $PFDEV/vendor):$(cat $PFDEV/device) sriov_totalvfs=$(cat $PFDEV/sriov_totalvfs 2>/dev/null)"

wait_carrier() { # wait_carrier TENTHS: 0 when the PF reports carrier
  j=0
  while [ "$(cat /sys/class/net/$PF/carrier 2>/dev/null)" != 1 ] && [ $j -lt "$1" ]; do sleep 0.1; j=$((j + 1)); done
  [ "$(cat /sys/class/net/$PF/carrier 2>/dev/null)" = 1 ]
}
# The PF goes up first: igbvf's probe asks the PF (mailbox, handled in the PF's interrupt)
# for its MAC, and the PF answers only when it is up.
ip link set "$PF" up
wait_carrier 200; c=$?
pass_if $c pf-link "carrier=$(cat /sys/class/net/$PF/carrier 2>/dev/null) operstate=$(cat /sys/class/net/$PF/operstate) speed=$(cat /sys/class/net/$PF/speed 2>/dev/null) duplex=$(cat /sys/class/net/$PF/duplex 2>/dev/null) after_s=$(uptime_s)"

echo 2 > "$PFDEV/sriov_numvfs"; c=$?
pass_if $c sriov-enable "sriov_numvfs=$(cat $PFDEV/sriov_numvfs) rc=$c"
[ "$(cat $PFDEV/sriov_numvfs)" = 2 ] || finish FAIL " reason=sriov_numvfs"
vfnet() { # vfnet N: the igbvf netdev of VF N in this namespace (empty when none yet)
  for d in "$PFDEV/virtfn$1"/net/*; do [ -e "$d" ] && { echo "${d##*/}"; return; }; done
}
i=0
while { [ -z "$(vfnet 0)" ] || [ -z "$(vfnet 1)" ]; } && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
VF0=$(vfnet 0) VF1=$(vfnet 1)
[ -n "$VF0" ] && [ -n "$VF1" ]; c=$?
pass_if $c vf-netdevs "vf0=$VF0($(readlink -f $PFDEV/virtfn0 | sed 's|.*/||')) vf1=$VF1($(readlink -f $PFDEV/virtfn1 | sed 's|.*/||')) driver=$(readlink $PFDEV/virtfn0/driver | sed 's|.*/||')"
[ $c = 0 ] || finish FAIL " reason=no-vf-netdevs"
# Enabling SR-IOV re-opens the PF (igb_sriov_reinit): wait for its link again.
wait_carrier 200
say "after sriov: carrier=$(cat /sys/class/net/$PF/carrier) speed=$(cat /sys/class/net/$PF/speed 2>/dev/null)"

# vfset N WORDS..: iproute2 for VF 0, the tool (when there is one) for VF 1.
vfset() {
  n=$1; shift
  if [ "$n" = 1 ] && [ -n "$TOOL" ]; then "$TOOL" vf "$PF" "$n" "$@"; else ip link set "$PF" vf "$n" "$@"; fi
}
setter() { if [ "$1" = 1 ] && [ -n "$TOOL" ]; then echo tool; else echo ip; fi; }
vfline() { # vfline N: VF N's line in `ip -d link show PF`, spaces squeezed
  ip -d link show "$PF" | sed -n "s/^ *\(vf $1 .*\)/\1/p" | tr -s ' '
}
# What VF N's line becomes when written as VF 0's: the index, the MAC's last octet and the
# VLAN id (100+N) are the values set per VF.
normalize() { # normalize N  (stdin: VF N's line)
  sed -e "s/^vf $1 /vf X /" -e "s/02:00:00:00:00:0$1/02:00:00:00:00:0X/" -e "s/vlan 10$1,/vlan 10X,/"
}

# --- check 1: the policy words every VF takes ---------------------------------------------
for n in 0 1; do
  s=$(setter $n) fails=
  for words in "mac 02:00:00:00:00:0$n" "vlan 10$n qos 3" "spoofchk off" "spoofchk on" "trust on" "max_tx_rate 100"; do
    # shellcheck disable=SC2086
    err=$(vfset $n $words 2>&1); rc=$?
    [ $rc = 0 ] || fails="$fails [$words: rc=$rc $(echo "$err" | oneline)]"
    # After spoofchk off, the line must say so (then it is turned back on).
    [ "$words" = "spoofchk off" ] && { vfline $n | grep -q 'spoof checking off' || fails="$fails [spoofchk off not shown]"; }
  done
  line=$(vfline $n)
  eval "LINE$n=\$line"
  want="vf $n link/ether 02:00:00:00:00:0$n"
  for frag in "$want" "vlan 10$n, qos 3" "max_tx_rate 100Mbps" "spoof checking on" "trust on"; do
    case "$line" in *"$frag"*) ;; *) fails="$fails [line lacks '$frag']" ;; esac
  done
  if [ -z "$fails" ]; then check PASS "set-vf$n-$s" "$line"; else check FAIL "set-vf$n-$s" "$fails :: $line"; fi
done
n0=$(echo "$LINE0" | normalize 0) n1=$(echo "$LINE1" | normalize 1)
if [ -n "$n0" ] && [ "$n0" = "$n1" ]; then
  check PASS "vf-lines-equal-ip-vs-$(setter 1)" "$n0"
else
  check FAIL "vf-lines-equal-ip-vs-$(setter 1)" "vf0=[$n0] vf1=[$n1]"
fi
dump_out IGB-OUT
if [ -n "$TOOL" ]; then
  out=$("$TOOL" vf "$PF" show 2>&1); rc=$?
  echo "$out" | sed 's/^/IGB-TOOL-SHOW: /'
  echo "$out" | grep -i 'vf 1' | grep -qi '02:00:00:00:00:01'; c=$?
  [ $rc = 0 ] || c=1
  pass_if $c tool-show "rc=$rc lines=$(echo "$out" | wc -l) vf1=[$(echo "$out" | grep -i 'vf 1' | head -1)]"
fi

# --- check 2: what igb has no op for, or refuses ------------------------------------------
BEFORE0=$(vfline 0) BEFORE1=$(vfline 1)
for words in "state enable" "query_rss on" "min_tx_rate 10 max_tx_rate 100"; do
  name=unsupported-$(echo "$words" | cut -d' ' -f1)
  # shellcheck disable=SC2086
  ierr=$(ip link set "$PF" vf 0 $words 2>&1); irc=$?
  iline=$(echo "$ierr" | grep 'RTNETLINK answers' | head -1)
  if [ $irc != 0 ] && [ -n "$iline" ]; then
    check PASS "$name-ip" "rc=$irc stderr=[$(echo "$ierr" | oneline)]"
  else
    check FAIL "$name-ip" "rc=$irc stderr=[$(echo "$ierr" | oneline)] (expected a failure with an RTNETLINK line)"
  fi
  if [ -n "$TOOL" ]; then
    # shellcheck disable=SC2086
    terr=$("$TOOL" vf "$PF" 1 $words 2>&1 >/dev/null); trc=$?
    case "$terr" in *"$iline"*) has=1 ;; *) has=0 ;; esac
    if [ $trc != 0 ] && [ -n "$iline" ] && [ $has = 1 ]; then
      check PASS "$name-tool" "rc=$trc stderr=[$(echo "$terr" | oneline)]"
    else
      check FAIL "$name-tool" "rc=$trc stderr=[$(echo "$terr" | oneline)] (want rc!=0 and stderr containing [$iline])"
    fi
  fi
done
[ "$(vfline 0)" = "$BEFORE0" ] && [ "$(vfline 1)" = "$BEFORE1" ]; c=$?
pass_if $c unsupported-left-no-trace "vf0=[$(vfline 0)] vf1=[$(vfline 1)]"

# --- check 3: steering and VF-to-VF switching inside the device -----------------------------
# The VF netdevs took their MACs from the PF at probe time (before check 1): a rebind makes
# igbvf ask again and pick up the administratively set ones.
for n in 0 1; do
  vfset $n vlan 0 || check FAIL "vlan-clear-vf$n" "rc=$?"
  a=$(readlink -f "$PFDEV/virtfn$n"); a=${a##*/}
  echo "$a" > /sys/bus/pci/drivers/igbvf/unbind
  echo "$a" > /sys/bus/pci/drivers/igbvf/bind
done
i=0
while { [ -z "$(vfnet 0)" ] || [ -z "$(vfnet 1)" ]; } && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
VF0=$(vfnet 0) VF1=$(vfnet 1)
m0=$(cat /sys/class/net/$VF0/address 2>/dev/null) m1=$(cat /sys/class/net/$VF1/address 2>/dev/null)
[ "$m0" = 02:00:00:00:00:00 ] && [ "$m1" = 02:00:00:00:00:01 ]; c=$?
pass_if $c vf-admin-mac-on-netdev "$VF0=$m0 $VF1=$m1"

ip netns add ns0 && ip netns add ns1 || check FAIL netns "ip netns add failed"
ip link set "$VF0" netns ns0
ip link set "$VF1" netns ns1
ip -n ns0 link set lo up; ip -n ns1 link set lo up
ip -n ns0 addr add 10.0.0.1/24 dev "$VF0"; ip -n ns1 addr add 10.0.0.2/24 dev "$VF1"
ip -n ns0 link set "$VF0" up; ip -n ns1 link set "$VF1" up
i=0
while [ $i -lt 100 ]; do
  c0=$(ip netns exec ns0 cat /sys/class/net/$VF0/carrier 2>/dev/null)
  c1=$(ip netns exec ns1 cat /sys/class/net/$VF1/carrier 2>/dev/null)
  [ "$c0" = 1 ] && [ "$c1" = 1 ] && break
  sleep 0.1; i=$((i + 1))
done
say "VF carriers: $VF0=$c0 $VF1=$c1"
stat() { # stat NS DEV: rx/tx packets
  if [ "$1" = - ]; then p=; else p="ip netns exec $1"; fi
  echo "$2:rx=$($p cat /sys/class/net/$2/statistics/rx_packets),tx=$($p cat /sys/class/net/$2/statistics/tx_packets)"
}
counters() { echo "$(stat - "$PF") $(stat ns0 "$VF0") $(stat ns1 "$VF1")"; }
ping01() { ip netns exec ns0 ping -c 3 -W 2 10.0.0.2 2>&1; }
received() { echo "$1" | sed -n 's/.* \([0-9]*\) packets received.*/\1/p'; }

b=$(counters); out=$(ping01); a=$(counters); r=$(received "$out")
echo "$out" | sed 's/^/IGB-PING: /'
[ "${r:-0}" -ge 1 ]; pass_if $? ping-vf0-to-vf1 "received=${r:-0}/3 before=[$b] after=[$a]"

vfset 1 vlan 200; c=$?
b=$(counters); out=$(ping01); a=$(counters); r=$(received "$out")
[ $c = 0 ] && [ "${r:-0}" = 0 ]; pass_if $? ping-stops-vf1-port-vlan-200 "set_rc=$c received=${r:-0}/3 vf1=[$(vfline 1)] before=[$b] after=[$a]"

vfset 1 vlan 0; c=$?
ip netns exec ns0 ping -c 1 -W 1 10.0.0.2 > /dev/null 2>&1 # refreshes ARP after the pause
b=$(counters); out=$(ping01); a=$(counters); r=$(received "$out")
[ $c = 0 ] && [ "${r:-0}" -ge 1 ]; pass_if $? ping-back-vlan-cleared "set_rc=$c received=${r:-0}/3 before=[$b] after=[$a]"

# Both on port VLAN 300: the device tags on TX and strips on RX for both, so they talk again.
vfset 0 vlan 300; c0=$?; vfset 1 vlan 300; c1=$?
ip netns exec ns0 ping -c 1 -W 1 10.0.0.2 > /dev/null 2>&1
b=$(counters); out=$(ping01); a=$(counters); r=$(received "$out")
[ $c0 = 0 ] && [ $c1 = 0 ] && [ "${r:-0}" -ge 1 ]; pass_if $? ping-both-port-vlan-300 "set_rc=$c0,$c1 received=${r:-0}/3 before=[$b] after=[$a]"
vfset 0 vlan 0; vfset 1 vlan 0

# Trust: a VF whose MAC the PF set may change it only when trusted (the PF driver decides,
# on the VF's mailbox request).
ip link set "$PF" vf 0 trust off
ip -n ns0 link set "$VF0" down
e1=$(ip -n ns0 link set "$VF0" address 02:00:00:00:00:99 2>&1); r1=$?
ip link set "$PF" vf 0 trust on
e2=$(ip -n ns0 link set "$VF0" address 02:00:00:00:00:99 2>&1); r2=$?
m=$(ip netns exec ns0 cat /sys/class/net/$VF0/address)
ip -n ns0 link set "$VF0" address 02:00:00:00:00:00 2>/dev/null
ip -n ns0 link set "$VF0" up
[ $r1 != 0 ] && [ $r2 = 0 ] && [ "$m" = 02:00:00:00:00:99 ]; pass_if $? trust-gates-vf-mac-change "untrusted: rc=$r1 [$(echo "$e1" | oneline)]; trusted: rc=$r2 [$(echo "$e2" | oneline)] mac=$m"

# --- fidelity probes: what the emulated 82576 enforces. IGB-INFO lines; they do not decide
# the result (QEMU models neither the TX rate limiters nor the anti-spoof check).
dd if=/dev/zero of=/tmp/blob bs=1024 count=512 2>/dev/null
xfer() { # seconds to send /tmp/blob (512 KiB) from VF 0 to VF 1 over TCP
  ip netns exec ns1 timeout 40 nc -l -p 5000 > /dev/null 2>&1 &
  lp=$!
  sleep 0.5
  t0=$(uptime_s)
  ip netns exec ns0 timeout 30 nc 10.0.0.2 5000 < /tmp/blob; xrc=$?
  wait $lp
  t1=$(uptime_s)
  echo "rc=$xrc secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')"
}
ip link set "$PF" vf 0 max_tx_rate 1; c=$?
lim=$(xfer)
ip link set "$PF" vf 0 max_tx_rate 0
unl=$(xfer)
s=$(echo "$lim" | sed 's/.*secs=//')
enf=no; awk -v s="$s" 'BEGIN {exit !(s >= 3.5)}' && enf=yes
echo "IGB-INFO: rate-limit vf0 max_tx_rate=1Mbps(set_rc=$c): 512KiB $lim; unlimited: $unl; enforced=$enf (1 Mbit/s needs >= 4.2 s)"
ip link set "$PF" vf 0 max_tx_rate 100

# Anti-spoof: VF 0 forwards, through a bridge, frames whose source MAC (02:..:77, a veth in
# ns2) the PF never gave it. VF 1 learning that MAC for 10.0.0.3 (from the ARP request) means
# the frame left VF 0 and crossed the device's switch.
ip netns add ns2
ip link add vA type veth peer name vB
ip link set vA netns ns0; ip link set vB netns ns2
ip -n ns0 link add br0 type bridge
ip -n ns0 addr flush dev "$VF0"
ip -n ns0 link set vA master br0; ip -n ns0 link set "$VF0" master br0
ip -n ns0 link set vA up; ip -n ns0 link set br0 up
ip -n ns2 link set vB address 02:00:00:00:00:77
ip -n ns2 addr add 10.0.0.3/24 dev vB; ip -n ns2 link set vB up; ip -n ns2 link set lo up
sleep 1
for sc in on off; do
  ip link set "$PF" vf 0 spoofchk "$sc"; c=$?
  ip -n ns1 neigh flush all 2>/dev/null
  b=$(counters)
  ip netns exec ns2 ping -c 2 -W 1 10.0.0.2 > /dev/null 2>&1
  a=$(counters)
  n=$(ip -n ns1 neigh show 10.0.0.3 | head -1)
  case "$n" in *02:00:00:00:00:77*) crossed=yes ;; *) crossed=no ;; esac
  echo "IGB-INFO: spoofchk-$sc(set_rc=$c) frame from unassigned src 02:00:00:00:00:77 via vf0 reached vf1: $crossed [vf1 neigh: ${n:-none}] before=[$b] after=[$a]"
done
ip link set "$PF" vf 0 spoofchk on

# The rate needs the PF's link: igb_ndo_set_vf_bw checks max_tx_rate against the link speed
# (0 while down).
e=$(ip link set "$PF" vf 0 max_tx_rate 2000 2>&1); r=$?
echo "IGB-INFO: max_tx_rate 2000 (above the ${PF} link's $(cat /sys/class/net/$PF/speed) Mbps): rc=$r [$(echo "$e" | oneline)]"
ip link set "$PF" down
sleep 0.5
e=$(ip link set "$PF" vf 0 max_tx_rate 50 2>&1); r=$?
echo "IGB-INFO: max_tx_rate 50 with the PF down (operstate=$(cat /sys/class/net/$PF/operstate)): rc=$r [$(echo "$e" | oneline)] vf0=[$(vfline 0)]"
ip link set "$PF" up
wait_carrier 100

[ $OK = 1 ] && finish PASS "" || finish FAIL ""
