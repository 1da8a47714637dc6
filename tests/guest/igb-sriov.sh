#!/usr/bin/env bash
# tests/guest/igb-sriov.sh: an on-demand test of SR-IOV VF policy against the real Linux igb
# driver, on QEMU's emulated igb (an Intel 82576 with SR-IOV) in a TCG guest.
#
#   tests/guest/igb-sriov.sh [--tool PATH] [--out DIR] [--timeout S] [--kernel 6.1|6.12]
#                            [--netdev SPEC|none] [--build-only] [--hold]
#
#   --tool PATH     a VF-policy tool to test beside iproute2; it goes into the guest as
#                   /usr/bin/vftool with its shared libraries (the host's, found with ldd).
#                   `vftool vf PF N WORDS..` must take exactly iproute2's words after
#                   `ip link set PF vf N`, and `vftool vf PF show` print one line per VF.
#                   Without it, VF 1 is set with iproute2 too (the kit checks itself).
#   --out DIR       the kit and the logs (default $IGBKIT_DIR or /var/tmp/vswitch-igbkit)
#   --timeout S     bound on the whole QEMU run (default 300; TCG is slow)
#   --kernel V      Debian's generic kernel: 6.1 (bookworm, default) or 6.12 (bookworm-backports);
#                   a kit holds one kernel: give each its own --out to keep both built
#   --netdev SPEC   the igb port's backend (default `hubport,hubid=0`: a hub with nothing else on
#                   it, so nothing on the host network); `none` leaves the port unconnected;
#                   e.g. `dgram,local.type=unix,local.path=..,remote.type=unix,remote.path=..`
#                   wires it to a switch
#   --build-only    build (or check) the kit, do not run
#   --hold          interactive: the serial console on this terminal (Ctrl-A X quits), and a
#                   shell in the guest after the checks (use with a long --timeout)
#
# Everything comes from Debian packages (`apt-get download` + `dpkg-deb -x`, nothing installed
# on the host, the host's apt configuration untouched: a private sources list and state under
# DIR/apt): QEMU 10 from bookworm-backports (`-M q35 -accel tcg`, igb behind a pcie-root-port),
# the generic kernel (the cloud one has no igb) booted with -kernel/-initrd, its igb, igbvf and
# their `depends=` (and veth, bridge for the anti-spoof probe), busybox-static, iproute2's `ip`
# with its libraries. The guest's /init is tests/guest/igb-init.sh; the checks it runs and the lines it prints are described there.
# This script prints the guest's IGB-CHECK / IGB-OUT / IGB-RESULT lines and exits 0 only on
# `IGB-RESULT: PASS`. The serial log stays in DIR/last-run.log.
# Downloads are cached in DIR/debs, the kit in DIR (a stamp of the package versions and of
# these two scripts); the tool's layer of the initramfs is rebuilt when the tool changes.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INIT_SRC="$HERE/igb-init.sh"
OUT=${IGBKIT_DIR:-/var/tmp/vswitch-igbkit}
TOOL= TIMEOUT=300 KVER_WANT=6.1 NETDEV="hubport,hubid=0" BUILD_ONLY=0 HOLD=0
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --tool) TOOL=${2:?}; shift 2 ;;
    --out) OUT=${2:?}; shift 2 ;;
    --timeout) TIMEOUT=${2:?}; shift 2 ;;
    --kernel) KVER_WANT=${2:?}; shift 2 ;;
    --netdev) NETDEV=${2:?}; shift 2 ;;
    --build-only) BUILD_ONLY=1; shift ;;
    --hold) HOLD=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "igb-sriov: unknown argument $1" >&2; usage 2 >&2 ;;
  esac
done
if [[ -n "$TOOL" ]]; then
  [[ -f "$TOOL" && -x "$TOOL" ]] || { echo "igb-sriov: --tool $TOOL is not an executable file" >&2; exit 2; }
  TOOL=$(readlink -f "$TOOL")
fi
case "$KVER_WANT" in
  6.1) KSUITE= ;;   # apt's candidate: bookworm's or bookworm-security's, whichever is newer
  6.12) KSUITE=bookworm-backports ;;
  *) echo "igb-sriov: --kernel takes 6.1 or 6.12" >&2; exit 2 ;;
esac
mkdir -p "$OUT/debs" "$OUT/apt/lists/partial" "$OUT/apt/cache/archives/partial"
OUT=$(cd "$OUT" && pwd)
DEBS="$OUT/debs"
say() { echo "[igb-sriov] $*" >&2; }

exec 9>"$OUT/.lock"
flock -w 900 9 || { echo "igb-sriov: $OUT/.lock held for 15 minutes; is another run stuck?" >&2; exit 1; }

# --- packages (private apt state: the host's sources have no bookworm-backports) ---------------
cat > "$OUT/apt/sources.list.new" <<'EOF'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main
EOF
if cmp -s "$OUT/apt/sources.list.new" "$OUT/apt/sources.list"; then rm "$OUT/apt/sources.list.new"
else mv "$OUT/apt/sources.list.new" "$OUT/apt/sources.list"; rm -f "$OUT/apt/lists/"*Packages*; fi
APT=(-q -o "Dir::Etc::SourceList=$OUT/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$OUT/apt/lists" -o "Dir::Cache=$OUT/apt/cache" -o APT::Sandbox::User=root)
apt_update() {
  say "apt-get update (private lists in $OUT/apt)"
  apt-get "${APT[@]}" update >&2 || { echo "igb-sriov: apt-get update failed (is deb.debian.org reachable?)" >&2; exit 1; }
}
ls "$OUT/apt/lists/"*bookworm-backports*Packages* > /dev/null 2>&1 || apt_update

# The concrete kernel package behind the meta package (its name carries the ABI).
kpkg() { apt-cache "${APT[@]}" depends "linux-image-amd64${KSUITE:+/$KSUITE}" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
KPKG=$(kpkg)
[[ -n "$KPKG" ]] || { apt_update; KPKG=$(kpkg); }
[[ -n "$KPKG" ]] || { echo "igb-sriov: apt knows no linux-image-amd64${KSUITE:+ in $KSUITE}" >&2; exit 1; }

# name[/suite]: the suite pins QEMU 10 (and its seabios) to bookworm-backports and keeps
# iproute2 and libbpf1 at bookworm's (the backports ones exist too).
BPO=bookworm-backports
QEMU_PKGS=(qemu-system-x86/$BPO qemu-system-common/$BPO qemu-system-data/$BPO seabios/$BPO ipxe-qemu
  libcapstone4 libpmem1 libndctl6 libdaxctl1 librdmacm1 libslirp0 libvdeplug2 libfdt1 libibverbs1
  libpixman-1-0 liburing2 libaio1 libgnutls30 libusb-1.0-0 libnuma1 libcacard0 libusbredirparser1
  libbrlapi0.8)
GUEST_PKGS=("$KPKG/$KSUITE" busybox-static iproute2/bookworm libbpf1/bookworm libelf1 libmnl0 libbsd0
  libmd0 libcap2 zlib1g libzstd1)
[[ -n "$KSUITE" ]] || GUEST_PKGS[0]=$KPKG
deb() { ls -1 "$DEBS/${1%%/*}"_*.deb 2>/dev/null | sort -V | tail -1; }
fetch() {
  local need=() p
  for p in "$@"; do [[ -n "$(deb "$p")" ]] || need+=("$p"); done
  ((${#need[@]})) || return 0
  say "apt-get download ${need[*]}"
  if ! (cd "$DEBS" && apt-get "${APT[@]}" download "${need[@]}" >&2); then
    apt_update   # stale lists: the mirror dropped a version
    (cd "$DEBS" && apt-get "${APT[@]}" download "${need[@]}" >&2) ||
      { echo "igb-sriov: could not download ${need[*]}" >&2; exit 1; }
  fi
}
fetch "${QEMU_PKGS[@]}" "${GUEST_PKGS[@]}"

STAMP=$( { for p in "${QEMU_PKGS[@]}" "${GUEST_PKGS[@]}"; do basename "$(deb "$p")"; done
  sha256sum "$0" "$INIT_SRC" | cut -c1-64; } | sha256sum | cut -c1-16)

# --- the kit: QEMU, kernel, base initramfs ---------------------------------------------------
if [[ -f "$OUT/kit.env" && "$(cat "$OUT/.stamp" 2>/dev/null)" == "$STAMP" ]]; then
  say "kit up to date: $OUT"
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/igbkit.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
  rm -f "$OUT/.stamp"

  rm -rf "$OUT/qemu"
  mkdir -p "$WORK/qemu"
  for p in "${QEMU_PKGS[@]}"; do dpkg-deb -x "$(deb "$p")" "$WORK/qemu"; done
  mv "$WORK/qemu" "$OUT/qemu"
  Q="$OUT/qemu"
  QEMU_LIBS="$Q/usr/lib/x86_64-linux-gnu"
  missing=$(LD_LIBRARY_PATH="$QEMU_LIBS" ldd "$Q/usr/bin/qemu-system-x86_64" | awk '/not found/ {print $1}')
  [[ -z "$missing" ]] || { echo "igb-sriov: the unpacked QEMU lacks libraries: $missing (add their packages to QEMU_PKGS)" >&2; exit 1; }
  LD_LIBRARY_PATH="$QEMU_LIBS" "$Q/usr/bin/qemu-system-x86_64" -device igb,help > /dev/null ||
    { echo "igb-sriov: this QEMU has no igb device" >&2; exit 1; }

  # Kernel. The bzImage's payload (setup header: setup_sects at 0x1f1, payload_offset at 0x248)
  # unpacked is an ELF with a PVH entry point: QEMU boots it without the in-guest
  # decompressor (seconds under TCG).
  dpkg-deb -x "$(deb "${GUEST_PKGS[0]}")" "$WORK/k"
  KVER=$(ls "$WORK/k/lib/modules")
  CONFIG="$WORK/k/boot/config-$KVER"
  for c in IGB IGBVF PCI_IOV PCIEPORTBUS NET_NS; do
    grep -Eq "^CONFIG_$c=[ym]" "$CONFIG" || { echo "igb-sriov: kernel $KVER lacks CONFIG_$c" >&2; exit 1; }
  done
  VMLINUZ="$WORK/k/boot/vmlinuz-$KVER"
  rm -f "$OUT/vmlinux" "$OUT/vmlinuz"
  KERNEL="$OUT/vmlinuz"
  if grep -q '^CONFIG_PVH=y' "$CONFIG"; then
    u8() { od -An -tu1 -j "$1" -N 1 "$VMLINUZ" | tr -d ' '; }
    u32() { od -An -tu4 -j "$1" -N 4 "$VMLINUZ" | tr -d ' '; }
    ss=$(u8 $((0x1f1))); ((ss)) || ss=4
    at=$(( (ss + 1) * 512 + $(u32 $((0x248))) ))
    len=$(u32 $((0x24c)))
    magic=$(od -An -tx1 -j "$at" -N 4 "$VMLINUZ" | tr -d ' ')
    case "$magic" in
      fd377a58) dec=(xz -dc --single-stream) ;;
      28b52ffd) dec=(zstd -dc) ;;
      02214c18) dec=(lz4 -dc) ;;
      1f8b*) dec=(gzip -dc) ;;
      *) dec=() ;;
    esac
    if ((${#dec[@]})) && command -v "${dec[0]}" > /dev/null; then
      tail -c +$((at + 1)) "$VMLINUZ" | head -c "$len" | "${dec[@]}" > "$WORK/vmlinux" 2>/dev/null || true
      if [[ "$(head -c 4 "$WORK/vmlinux" | od -An -tx1 | tr -d ' ')" == 7f454c46 ]]; then
        mv "$WORK/vmlinux" "$OUT/vmlinux"
        KERNEL="$OUT/vmlinux"
      fi
    fi
  fi
  [[ "$KERNEL" == */vmlinux ]] || { say "booting the compressed kernel (payload not unpacked): slower"; cp "$VMLINUZ" "$OUT/vmlinuz"; }

  # Modules: the .deb has no modules.dep; the load order comes from each module's `depends=`
  # in .modinfo. What the config builds in (=y) needs nothing.
  declare -A KO=()
  while IFS= read -r f; do b=${f##*/}; b=${b%%.ko*}; KO[${b//-/_}]=$f; done < <(find "$WORK/k/lib/modules/$KVER/kernel" -name '*.ko*')
  unpack_ko() {
    case "$1" in
      *.xz) xz -dc "$1" ;; *.zst) zstd -dc "$1" ;; *.gz) gzip -dc "$1" ;; *) cat "$1" ;;
    esac
  }
  ORDER=()
  declare -A SEEN=()
  need_module() {
    local m=${1//-/_} d
    [[ -z "${SEEN[$m]:-}" ]] || return 0
    SEEN[$m]=1
    [[ -n "${KO[$m]:-}" ]] || { echo "igb-sriov: kernel $KVER has no module $m" >&2; exit 1; }
    for d in $(unpack_ko "${KO[$m]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -1 | tr ',' ' '); do
      need_module "$d"
    done
    ORDER+=("$m")
  }
  for m in igb igbvf veth bridge; do need_module "$m"; done

  # Base initramfs.
  R="$WORK/root"
  mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,var,lib/modules,lib64}
  ln -s ../run "$R/var/run"   # iproute2's netns directory is /var/run/netns
  dpkg-deb -x "$(deb busybox-static)" "$WORK/bb"
  BB="$WORK/bb/bin/busybox"
  cp "$BB" "$R/bin/busybox"
  for a in $("$BB" --list); do [[ "$a" == busybox || "$a" == ip ]] || ln -sf busybox "$R/bin/$a"; done
  for m in "${ORDER[@]}"; do unpack_ko "${KO[$m]}" > "$R/lib/modules/$m.ko"; done
  printf '%s\n' "${ORDER[@]}" > "$R/etc/kit-modules"

  # iproute2's ip: its libraries from the unpacked packages, the C library from the host (the
  # same Debian release).
  mkdir -p "$WORK/x"
  for p in iproute2 libbpf1 libelf1 libmnl0 libbsd0 libmd0 libcap2 zlib1g libzstd1; do dpkg-deb -x "$(deb "$p")" "$WORK/x"; done
  install -D "$WORK/x/bin/ip" "$R/bin/ip"
  XL="$WORK/x/usr/lib/x86_64-linux-gnu:$WORK/x/lib/x86_64-linux-gnu"
  missing=$(LD_LIBRARY_PATH="$XL" ldd "$WORK/x/bin/ip" | awk '/not found/ {print $1}')
  [[ -z "$missing" ]] || { echo "igb-sriov: ip lacks libraries: $missing" >&2; exit 1; }
  LD_LIBRARY_PATH="$XL" ldd "$WORK/x/bin/ip" | awk '/=> \// {print $3}' | while read -r lib; do
    dest="${lib#"$WORK/x"}"
    mkdir -p "$R${dest%/*}"
    cp -L "$lib" "$R$dest"
  done
  cp -L /lib64/ld-linux-x86-64.so.2 "$R/lib64/"
  install -m 755 "$INIT_SRC" "$R/init"
  echo "root:x:0:0:root:/:/bin/sh" > "$R/etc/passwd"
  echo "127.0.0.1 localhost" > "$R/etc/hosts"
  # The unpacked busybox archives it: the host may have no cpio.
  (cd "$R" && find . -print0 | sort -z | "$BB" cpio -o -0 -H newc -R 0:0 2>/dev/null) | gzip -6 > "$OUT/base.cpio.gz"
  cp "$BB" "$OUT/busybox"   # the tool layer's archiver

  cat > "$OUT/kit.env" <<ENV
KERNEL=$KERNEL
BASE_INITRD=$OUT/base.cpio.gz
KVER=$KVER
MODULES="${ORDER[*]}"
QEMU=$Q/usr/bin/qemu-system-x86_64
QEMU_LIBS=$QEMU_LIBS
QEMU_FIRMWARE=$Q/usr/share/qemu:$Q/usr/share/seabios:$Q/usr/lib/ipxe/qemu
ENV
  echo "$STAMP" > "$OUT/.stamp"
  rm -f "$OUT/.tool-stamp"
  rm -rf "$WORK"; trap - EXIT
  say "kit built: kernel $KVER ($(basename "$KERNEL")), modules ${ORDER[*]}, base initramfs $(stat -c %s "$OUT/base.cpio.gz") bytes, $(LD_LIBRARY_PATH="$QEMU_LIBS" "$Q/usr/bin/qemu-system-x86_64" --version | head -1)"
fi
# shellcheck disable=SC1091
source "$OUT/kit.env"

# --- the tool's layer: a second cpio appended to the base one (the kernel unpacks both) ------
INITRD="$BASE_INITRD"
if [[ -n "$TOOL" ]]; then
  libs=$(ldd "$TOOL" 2>/dev/null | awk '/=> \// {print $3} /^\t\/lib64\// {print $1}' || true)
  if ldd "$TOOL" 2>/dev/null | grep -q 'not found'; then
    echo "igb-sriov: $TOOL lacks libraries on this host: $(ldd "$TOOL" | awk '/not found/ {print $1}')" >&2; exit 1
  fi
  TSTAMP=$( { cat "$OUT/.stamp"; sha256sum "$TOOL" | cut -c1-64; for l in $libs; do sha256sum "$l" | cut -c1-64; done; } | sha256sum | cut -c1-16)
  if [[ -f "$OUT/tool.cpio.gz" && "$(cat "$OUT/.tool-stamp" 2>/dev/null)" == "$TSTAMP" ]]; then
    say "tool layer up to date ($TOOL)"
  else
    TW=$(mktemp -d "${TMPDIR:-/tmp}/igbtool.XXXXXX")
    install -D -m 755 "$TOOL" "$TW/usr/bin/vftool"
    # A debug build carries ~70 MB of symbols the guest does not need.
    if command -v strip >/dev/null; then strip "$TW/usr/bin/vftool"; fi
    for l in $libs; do mkdir -p "$TW${l%/*}"; cp -L "$l" "$TW$l"; done
    (cd "$TW" && find . -print0 | sort -z | "$OUT/busybox" cpio -o -0 -H newc -R 0:0 2>/dev/null) | gzip -6 > "$OUT/tool.cpio.gz"
    rm -rf "$TW"
    echo "$TSTAMP" > "$OUT/.tool-stamp"
    say "tool layer built: $TOOL with ${libs:-no shared libraries}" 
  fi
  cat "$BASE_INITRD" "$OUT/tool.cpio.gz" > "$OUT/initrd-run.cpio.gz"
  INITRD="$OUT/initrd-run.cpio.gz"
fi
((BUILD_ONLY)) && { say "build only: $OUT"; exit 0; }

# --- run -----------------------------------------------------------------------------------
LOG="$OUT/last-run.log"
rm -f "$LOG" "$OUT/qemu.stderr"
L=()
IFS=: read -ra fw <<< "$QEMU_FIRMWARE"
for d in "${fw[@]}"; do L+=(-L "$d"); done
case "$NETDEV" in
  none) NIC=(-device igb,bus=rp1,mac=52:54:00:12:34:56,romfile=) ;;
  *) NIC=(-device igb,bus=rp1,netdev=n0,mac=52:54:00:12:34:56,romfile= -netdev "$NETDEV,id=n0") ;;
esac
GTIMEOUT=$((TIMEOUT > 60 ? TIMEOUT - 20 : TIMEOUT))
APPEND="console=ttyS0 panic=-1 kit.timeout=$GTIMEOUT kit.hold=$HOLD"
say "booting: kernel $KVER, tcg, timeout ${TIMEOUT}s, netdev $NETDEV${TOOL:+, tool $TOOL}; serial log $LOG"
VM=(-nodefaults -no-user-config -M q35 -accel tcg -smp 2 -m 1024 -display none -no-reboot
  -kernel "$KERNEL" -initrd "$INITRD" -append "$APPEND"
  -device pcie-root-port,id=rp1,slot=1,chassis=1 "${NIC[@]}")
start=$(date +%s.%N)
set +e
if ((HOLD)); then
  LD_LIBRARY_PATH="$QEMU_LIBS" timeout --foreground -k 5 "$TIMEOUT" "$QEMU" "${L[@]}" "${VM[@]}" \
    -chardev "stdio,id=s0,mux=on,signal=off,logfile=$LOG" -serial chardev:s0 -mon chardev=s0
  qrc=$?
else
  LD_LIBRARY_PATH="$QEMU_LIBS" timeout -k 5 "$TIMEOUT" "$QEMU" "${L[@]}" "${VM[@]}" \
    -serial "file:$LOG" > "$OUT/qemu.stderr" 2>&1 &
  QPID=$!
  trap 'kill "$QPID" 2>/dev/null || true' EXIT
  wait "$QPID"; qrc=$?
  trap - EXIT
fi
set -e
touch "$LOG"
secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
tr -d '\r' < "$LOG" > "$LOG.tmp" && mv "$LOG.tmp" "$LOG"
grep -E '^IGB-(CHECK|OUT|OUT-END|INFO|RESULT|TOOL-SHOW):' "$LOG" || true
if grep -q '^IGB-RESULT: PASS' "$LOG"; then
  say "PASS in ${secs}s (QEMU exit $qrc)"
  exit 0
fi
((qrc == 124)) && say "QEMU ran past ${TIMEOUT}s and was killed"
[[ -s "$OUT/qemu.stderr" ]] && sed 's/^/[qemu] /' "$OUT/qemu.stderr" >&2
say "FAIL in ${secs}s (QEMU exit $qrc); the serial log: $LOG (last lines below)"
tail -n 15 "$LOG" >&2
exit 1
