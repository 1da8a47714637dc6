#!/usr/bin/env bash
# tests/guest/build.sh: builds the Linux test guest and fetches the QEMU that runs it, from
# Debian packages only (`apt-get download` + `dpkg-deb -x`; nothing is installed on the host).
#
#   tests/guest/build.sh [OUT]        (default OUT: $GUESTKIT_DIR or /var/tmp/vswitch-guestkit)
#
# Writes into OUT:
#   vmlinux             the Debian cloud kernel, uncompressed (QEMU boots it through PVH,
#                       skipping the in-guest decompressor: ~1.5 s saved under TCG); vmlinuz
#                       when the lz4 tool is missing
#   initramfs.cpio.gz   busybox /init (below), the virtio modules, iperf3, ethtool
#   qemu/               qemu-system-x86_64 7.2 with its firmware and missing libraries
#   kit.env             KERNEL=, INITRD=, QEMU=, QEMU_LIBS=, QEMU_FIRMWARE= (colon-separated
#                       -L directories), KVER=: what the tests read
# Downloads are cached in OUT/debs; a second run with nothing new to fetch takes a second.
# QEMU is unpacked rather than installed because Debian 12's qemu-system-x86 conflicts with
# the newer qemu-utils this machine kind has (installing it would remove qemu-img).
#
# The guest's test is not baked in: /init reads `kit.*` words from the kernel command line
# (documented at the top of the /init script below) and prints one line
#   KIT-RESULT: PASS|FAIL name=.. role=.. key=value ...
# on the serial console, then powers off.
set -euo pipefail

OUT=${1:-${GUESTKIT_DIR:-/var/tmp/vswitch-guestkit}}
mkdir -p "$OUT/debs"
OUT=$(cd "$OUT" && pwd)
DEBS="$OUT/debs"
say() { echo "[guest/build] $*" >&2; }

# A lock: several test processes may ask for the kit at once.
exec 9>"$OUT/.lock"
flock -w 600 9 || { echo "guest/build: $OUT/.lock held for 10 minutes; is another build stuck?" >&2; exit 1; }

# The concrete kernel package behind the meta package (its name carries the ABI).
KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z "$KPKG" ]]; then
  echo "guest/build: apt does not know linux-image-cloud-amd64; run 'apt-get update' first" >&2
  exit 1
fi

GUEST_PKGS=("$KPKG" busybox-static iperf3 libiperf0 libsctp1 ethtool libmnl0)
QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu
  libcapstone4 libpmem1 libndctl6 libdaxctl1 librdmacm1 libslirp0 libvdeplug2 libfdt1 libibverbs1
  libpixman-1-0 liburing2 libaio1 libgnutls30 libusb-1.0-0 libnuma1)
deb() { ls -1 "$DEBS/$1"_*.deb 2>/dev/null | sort -V | tail -1; }
fetch() {
  local need=() p
  for p in "$@"; do [[ -n "$(deb "$p")" ]] || need+=("$p"); done
  ((${#need[@]})) || return 0
  say "apt-get download ${need[*]}"
  (cd "$DEBS" && apt-get -q -o APT::Sandbox::User=root download "${need[@]}" >&2) ||
    { echo "guest/build: could not download ${need[*]} (is the Debian mirror reachable?)" >&2; exit 1; }
}
fetch "${GUEST_PKGS[@]}" "${QEMU_PKGS[@]}"

# The stamp names every package version used: nothing changed, nothing to rebuild.
STAMP=$(for p in "${GUEST_PKGS[@]}" "${QEMU_PKGS[@]}"; do basename "$(deb "$p")"; done | sha256sum | cut -c1-16)
STAMP="$STAMP-$(sha256sum "$0" | cut -c1-16)"
if [[ -f "$OUT/kit.env" && "$(cat "$OUT/.stamp" 2>/dev/null)" == "$STAMP" ]]; then
  say "up to date: $OUT"
  exit 0
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/guestkit.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- QEMU ----------------------------------------------------------------------------------
rm -rf "$OUT/qemu"
mkdir -p "$WORK/qemu"
for p in "${QEMU_PKGS[@]}"; do dpkg-deb -x "$(deb "$p")" "$WORK/qemu"; done
mv "$WORK/qemu" "$OUT/qemu"
Q="$OUT/qemu"
QEMU_LIBS="$Q/usr/lib/x86_64-linux-gnu"
missing=$(LD_LIBRARY_PATH="$QEMU_LIBS" ldd "$Q/usr/bin/qemu-system-x86_64" | awk '/not found/ {print $1}')
if [[ -n "$missing" ]]; then
  echo "guest/build: the unpacked QEMU lacks libraries: $missing (add their packages to QEMU_PKGS)" >&2
  exit 1
fi

# --- kernel --------------------------------------------------------------------------------
dpkg-deb -x "$(deb "$KPKG")" "$WORK/k"
KVER=$(ls "$WORK/k/lib/modules")
CONFIG="$WORK/k/boot/config-$KVER"
KERNEL="$OUT/vmlinuz"
cp "$WORK/k/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
rm -f "$OUT/vmlinux"
# Debian's bzImage carries an LZ4 payload (legacy frame, magic 02 21 4c 18); unpacked, it is
# an ELF with a PVH entry point.
if grep -q '^CONFIG_PVH=y' "$CONFIG" && grep -q '^CONFIG_KERNEL_LZ4=y' "$CONFIG" && command -v lz4 >/dev/null; then
  at=$(grep -abo $'\x02\x21\x4c\x18' "$OUT/vmlinuz" | head -1 | cut -d: -f1)
  if [[ -n "$at" ]]; then
    tail -c +$((at + 1)) "$OUT/vmlinuz" | lz4 -dc > "$WORK/vmlinux" 2>/dev/null || true
    if [[ "$(head -c 4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' ')" == 7f454c46 ]]; then
      mv "$WORK/vmlinux" "$OUT/vmlinux"
      KERNEL="$OUT/vmlinux"
    fi
  fi
fi
[[ "$KERNEL" == */vmlinux ]] || say "booting the compressed kernel (no lz4 tool or not a PVH kernel): slower"

# Modules: the .deb has no modules.dep, so the load order comes from each module's
# `depends=` (in .modinfo); what the config builds in (=y) needs nothing.
declare -A KO=()
while IFS= read -r f; do b=${f##*/}; KO[${b%%.ko*}]=$f; done < <(find "$WORK/k/lib/modules/$KVER/kernel" -name '*.ko*')
unpack_ko() {
  case "$1" in
    *.xz) xz -dc "$1" ;; *.zst) zstd -dc "$1" ;; *.gz) gzip -dc "$1" ;; *) cat "$1" ;;
  esac
}
ORDER=()
declare -A SEEN=()
need_module() {
  local m=$1 d
  [[ -z "${SEEN[$m]:-}" ]] || return 0
  SEEN[$m]=1
  [[ -n "${KO[$m]:-}" ]] || { echo "guest/build: kernel $KVER has no module $m" >&2; exit 1; }
  for d in $(unpack_ko "${KO[$m]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -1 | tr ',' ' '); do
    need_module "$d"
  done
  ORDER+=("$m")
}
for m in virtio_pci virtio_mmio virtio_net; do
  case "$(sed -n "s/^CONFIG_${m^^}=//p" "$CONFIG")" in
    y) ;;
    m) need_module "$m" ;;
    *) echo "guest/build: kernel $KVER lacks CONFIG_${m^^}" >&2; exit 1 ;;
  esac
done

# --- initramfs -----------------------------------------------------------------------------
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,lib/modules,lib64}
dpkg-deb -x "$(deb busybox-static)" "$WORK/bb"
BB="$WORK/bb/bin/busybox"
cp "$BB" "$R/bin/busybox"
for a in $("$BB" --list); do [[ "$a" == busybox ]] || ln -sf busybox "$R/bin/$a"; done
for m in "${ORDER[@]}"; do unpack_ko "${KO[$m]}" > "$R/lib/modules/$m.ko"; done
printf '%s\n' "${ORDER[@]}" > "$R/etc/kit-modules"

# iperf3 and ethtool with their libraries: the unpacked ones first, the C library and libcrypto
# from the host (the same Debian release).
mkdir -p "$WORK/x"
for p in iperf3 libiperf0 libsctp1 ethtool libmnl0; do dpkg-deb -x "$(deb "$p")" "$WORK/x"; done
for bin in usr/bin/iperf3 sbin/ethtool; do
  [[ -e "$WORK/x/$bin" ]] || bin=usr/${bin}
  install -D "$WORK/x/$bin" "$R/usr/bin/${bin##*/}"
  LD_LIBRARY_PATH="$WORK/x/usr/lib/x86_64-linux-gnu:$WORK/x/lib/x86_64-linux-gnu" ldd "$WORK/x/$bin" |
    awk '/=> \// {print $3}' | while read -r lib; do
      dest="${lib#"$WORK/x"}"
      mkdir -p "$R${dest%/*}"
      cp -L "$lib" "$R$dest"
    done
done
cp -L /lib64/ld-linux-x86-64.so.2 "$R/lib64/"

cat > "$R/init" <<'INIT'
#!/bin/sh
# The test guest's /init. Kernel command-line words it reads (all optional):
#   kit.name=NAME              how result lines name this guest
#   kit.role=client|server|solo
#       client: waits for the peer, runs the tests, tells the server it is done (tcp/5999),
#               waits for its goodbye (tcp/5998)
#       server: runs an iperf3 server, waits for the client's done, pings back, says goodbye
#       solo:   PASS once eth0 is up (and pings PEER if given)
#       sink:   takes TCP transfers on port 6000 for ever, one after the other, each reported as
#               `KIT t=.. RECV bytes=N md5=SUM file=SUM diff=none|at=BYTE,n=COUNT,got=TEXT`
#               (md5 summed as the bytes streamed in, file= summed again from the file; diff=
#               the first byte that is not the feeder's numbers, how many differ and the text
#               found there); `KIT t=.. TICK rx=.. rx_dropped=.. tcp_csum_errors=..` every 2 s
#               (a live-migration target: nothing ends it)
#       feeder: pings PEER every kit.ping_i seconds in the background (busybox's `seq=N` lines)
#               and sends PEER:6000 one transfer of kit.blob_kb KiB after another (`seq` from
#               a random start, one number per line), each announced as
#               `KIT t=.. SEND n=K bytes=N md5=SUM` and, once the connection closed,
#               `KIT t=.. SENT n=K`
#   kit.ip=ADDR/PREFIX kit.peer=ADDR   addresses on eth0
#   kit.tests=ping,iperf3      what the client runs
#   kit.tests=...,iperf3x3     server: two more iperf3 servers (ports 5202, 5203)
#   kit.tests=pingloop         solo: ping PEER every kit.ping_i seconds until the watchdog, in
#                              one-second rounds, each headed by `KIT t=.. PINGLOOP round=N
#                              carrier=0|1`; each answer is busybox's `.. bytes from ..` line on
#                              the console; a round that fails (no carrier, no ARP answer) is
#                              just followed by the next
#   kit.ping_n=N (10)  kit.ping_i=SECONDS (0.2)  kit.loss_ok=PERCENT (0: any loss fails)
#   kit.iperf_t=SECONDS (5)  kit.iperf_p=STREAMS (1)  kit.blob_kb=KIB (1024)
#   kit.ethtool=ARGS           run `ethtool ARGS` on eth0 before the tests (commas become spaces)
#   kit.wait=SECONDS (30)      client: how long to wait for the peer
#   kit.timeout=SECONDS (120)  watchdog: FAIL when it runs out
#   kit.hold=1                 a shell instead of powering off
# Progress lines start `KIT t=<uptime>`; the last line is
#   KIT-RESULT: PASS|FAIL name=.. role=.. key=value ... uptime_s=..
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
uptime_s() { read u _ < /proc/uptime; echo "$u"; }
say() { echo "KIT t=$(uptime_s) $*"; }
NAME=guest ROLE=solo IP= PEER= TESTS=ping PING_N=10 PING_I=0.2 LOSS_OK=0 IPERF_T=5 IPERF_P=1
ETHTOOL= WAIT=30 TIMEOUT=120 HOLD=0 BLOB_KB=1024
for w in $(cat /proc/cmdline); do
  v=${w#*=}
  case "$w" in
    kit.name=*) NAME=$v ;;       kit.role=*) ROLE=$v ;;        kit.ip=*) IP=$v ;;
    kit.peer=*) PEER=$v ;;       kit.tests=*) TESTS=$v ;;      kit.ping_n=*) PING_N=$v ;;
    kit.ping_i=*) PING_I=$v ;;   kit.loss_ok=*) LOSS_OK=$v ;;  kit.iperf_t=*) IPERF_T=$v ;;
    kit.iperf_p=*) IPERF_P=$v ;; kit.ethtool=*) ETHTOOL=$v ;;  kit.wait=*) WAIT=$v ;;
    kit.timeout=*) TIMEOUT=$v ;; kit.hold=*) HOLD=$v ;;         kit.blob_kb=*) BLOB_KB=$v ;;
  esac
done
udp_rcvbuf_errors() {  # datagrams the guest's own UDP sockets had no room for (/proc/net/snmp)
  awk '/^Udp:/ { if (!c) { for (i = 2; i <= NF; i++) if ($i == "RcvbufErrors") c = i } else { print $c; exit } }' /proc/net/snmp
}
nic_counts() {  # rx/tx packets and drops of eth0
  s=/sys/class/net/eth0/statistics
  echo " rx_packets=$(cat $s/rx_packets) tx_packets=$(cat $s/tx_packets) rx_dropped=$(cat $s/rx_dropped) tx_dropped=$(cat $s/tx_dropped) rx_errors=$(cat $s/rx_errors) tx_errors=$(cat $s/tx_errors) udp_rcvbuf_errors=$(udp_rcvbuf_errors)"
}
finish() {
  extra=
  [ -e /sys/class/net/eth0 ] && extra=$(nic_counts)
  echo "KIT-RESULT: $1 name=$NAME role=$ROLE$2$extra uptime_s=$(uptime_s)"
  [ "$HOLD" = 1 ] && exec sh
  poweroff -f; sleep 2; reboot -f
}
wants() { case ",$TESTS," in *",$1,"*) return 0 ;; esac; return 1; }
say "init name=$NAME role=$ROLE ip=$IP peer=$PEER tests=$TESTS kernel=$(uname -r)"
( sleep "$TIMEOUT"; finish FAIL " reason=watchdog-${TIMEOUT}s" ) &
for m in $(cat /etc/kit-modules); do insmod "/lib/modules/$m.ko" || say "insmod $m failed"; done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
[ -e /sys/class/net/eth0 ] || finish FAIL " reason=no-eth0"
ip link set lo up
[ -n "$ETHTOOL" ] && { ethtool $(echo "$ETHTOOL" | tr ',' ' ') || say "ethtool $ETHTOOL failed"; }
[ -n "$IP" ] && ip addr add "$IP" dev eth0
ip link set eth0 up
say "READY eth0 mac=$(cat /sys/class/net/eth0/address) ip=$IP features=$(cat /sys/class/net/eth0/device/features 2>/dev/null)"
RES=
ok=1
ping_test() {
  out=$(ping -c "$PING_N" -i "$PING_I" -W 2 "$PEER" 2>&1)
  echo "$out"
  rtt=$(echo "$out" | sed -n 's|.*min/avg/max = [0-9.]*/\([0-9.]*\)/.*|\1|p')
  loss=$(echo "$out" | sed -n 's|.* \([0-9.]*\)% packet loss.*|\1|p')
  RES="$RES ping_avg_ms=${rtt:-none} ping_loss=${loss:-100}%"
  [ "${loss%%.*}" -le "$LOSS_OK" ] 2>/dev/null || ok=0
}
case "$ROLE" in
server)
  wants iperf3 && { iperf3 -s -f g > /tmp/iperf3.log 2>&1 & }
  # More servers (tcp/udp 5202, 5203) for streams that run beside the first one's.
  wants iperf3x3 && { iperf3 -s -p 5202 > /dev/null 2>&1 & iperf3 -s -p 5203 > /dev/null 2>&1 & }
  say "waiting for the client's done on tcp/5999"
  msg=$(timeout "$TIMEOUT" nc -l -p 5999 2>&1)
  say "client said: $msg"
  case "$msg" in done*) ;; *) finish FAIL " reason=no-done-message" ;; esac
  RES=" client=$(echo $msg | tr ' ' _)"
  [ -n "$PEER" ] && wants ping && { PING_N=3; ping_test; }
  for try in 1 2 3 4 5; do echo bye | timeout 5 nc "$PEER" 5998 && break; sleep 1; done
  ;;
sink)
  # nc's input never ends (a FIFO held open both ways): it must not half-close the
  # connection because the console it would otherwise read from went quiet.
  mkfifo /tmp/never && exec 3<> /tmp/never
  # A heartbeat every 2 s: shows that userspace and timers run (across a migration too), what
  # the NIC took and dropped, and TCP's checksum failures.
  ( s=/sys/class/net/eth0/statistics
    while :; do
      sleep 2
      say "TICK rx=$(cat $s/rx_packets) rx_dropped=$(cat $s/rx_dropped) tcp_csum_errors=$(awk '/^Tcp:/ { if (h) { print $NF; exit } h = 1 }' /proc/net/snmp)"
    done ) &
  while :; do
    # Counted and summed as the bytes stream in, in one pipeline the shell waits out (at most
    # 60 s: a TCG guest's process can hang across a migration, and the loop must go on); then
    # summed again from the file (file=): the bytes as they landed, by a process that did not
    # run across the switch-over.
    timeout 60 nc -l -p 6000 <&3 2>/dev/null | tee /tmp/in | md5sum > /tmp/sum
    f=$(timeout 30 md5sum < /tmp/in | cut -d' ' -f1)
    size=$(wc -c < /tmp/in | tr -d " ")
    # The feeder's transfers are `seq` from a first number it picks: regenerated here, the
    # first difference (and the bytes received there) says what went wrong where.
    first=$(head -n 1 /tmp/in)
    diff=none
    case "$first" in
      ''|*[!0-9]*) diff=unparsed ;;
      *) at=$(seq "$first" $((first + 400000)) | head -c "$size" | timeout 30 cmp - /tmp/in 2>&1 | sed -n 's/.*char \([0-9]*\).*/\1/p')
         [ -n "$at" ] && diff="at=$at,n=$(seq "$first" $((first + 400000)) | head -c "$size" | timeout 30 cmp -l - /tmp/in 2>/dev/null | wc -l),got=$(tail -c +$((at > 40 ? at - 40 : 1)) /tmp/in | head -c 160 | tr '\n ' '|_')" ;;
    esac
    say "RECV bytes=$size md5=$(cut -d' ' -f1 /tmp/sum) file=${f:-none} diff=$diff"
  done
  ;;
feeder)
  ping -i "$PING_I" "$PEER" &
  n=0
  while :; do
    n=$((n + 1))
    # Numbers from a random start (each transfer its own), one per line: the sink can
    # regenerate them and say where bytes went wrong.
    first=$(( ($(head -c 2 /dev/urandom | od -An -tu2 | tr -d ' ') % 1000) * 1000000 + 1000000 ))
    seq "$first" $((first + 400000)) | head -c $((BLOB_KB * 1024)) > /tmp/blob
    say "SEND n=$n bytes=$(wc -c < /tmp/blob | tr -d " ") md5=$(md5sum < /tmp/blob | cut -d' ' -f1)"
    until timeout 60 nc "$PEER" 6000 < /tmp/blob; do sleep 0.5; done
    say "SENT n=$n"
    sleep 0.2
  done
  ;;
client)
  n=0
  until ping -c 1 -W 1 "$PEER" > /dev/null 2>&1; do
    n=$((n + 1)); [ $n -ge "$WAIT" ] && finish FAIL " reason=peer-unreachable"
  done
  say "peer $PEER answers (after $n unanswered probes)"
  wants ping && ping_test
  if wants iperf3; then
    for try in 1 2 3; do out=$(iperf3 -c "$PEER" -t "$IPERF_T" -P "$IPERF_P" -f g 2>&1) && break; sleep 1; done
    echo "$out"
    gbps=$(echo "$out" | awk '/receiver/ {for (i = 2; i <= NF; i++) if ($i == "Gbits/sec") v = $(i - 1)} END {print v}')
    retr=$(echo "$out" | awk '/sender/ {for (i = 2; i <= NF; i++) if ($i == "Gbits/sec") v = $(i + 1)} END {print v}')
    RES="$RES iperf3_gbps=${gbps:-none} iperf3_retr=${retr:-none}"
    [ -n "$gbps" ] || ok=0
  fi
  ( timeout 30 nc -l -p 5998 > /tmp/bye 2>&1 ) &
  byepid=$!
  for try in 1 2 3 4 5; do echo "done ok=$ok" | timeout 5 nc "$PEER" 5999 && break; sleep 1; done
  wait $byepid
  say "server said: $(cat /tmp/bye)"
  ;;
*)
  [ -n "$PEER" ] && wants ping && ping_test
  if [ -n "$PEER" ] && wants pingloop; then
    r=0
    while :; do
      r=$((r + 1))
      say "PINGLOOP round=$r carrier=$(cat /sys/class/net/eth0/carrier)"
      ping -i "$PING_I" -w 1 "$PEER" 2>&1 || sleep "$PING_I"
    done
  fi
  ;;
esac
[ $ok = 1 ] && finish PASS "$RES" || finish FAIL "$RES"
INIT
chmod 755 "$R/init"
echo "root:x:0:0:root:/:/bin/sh" > "$R/etc/passwd"
echo "127.0.0.1 localhost" > "$R/etc/hosts"
# The unpacked busybox archives it: the host may have no cpio.
(cd "$R" && find . -print0 | sort -z | "$BB" cpio -o -0 -H newc -R 0:0 2>/dev/null) | gzip -6 > "$OUT/initramfs.cpio.gz"

cat > "$OUT/kit.env" <<ENV
KERNEL=$KERNEL
INITRD=$OUT/initramfs.cpio.gz
KVER=$KVER
QEMU=$Q/usr/bin/qemu-system-x86_64
QEMU_LIBS=$QEMU_LIBS
QEMU_FIRMWARE=$Q/usr/share/qemu:$Q/usr/share/seabios:$Q/usr/lib/ipxe/qemu
ENV
echo "$STAMP" > "$OUT/.stamp"
say "kernel $KVER ($(basename "$KERNEL")), modules: ${ORDER[*]}, initramfs $(stat -c %s "$OUT/initramfs.cpio.gz") bytes, QEMU $(LD_LIBRARY_PATH="$QEMU_LIBS" "$Q/usr/bin/qemu-system-x86_64" --version 2>/dev/null | head -1 || true)"
echo "$OUT"
