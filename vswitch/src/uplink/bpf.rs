//! The switch's own BPF programs and maps, with `bpf(2)` and no libbpf or clang: the XDP
//! redirect of AF_XDP ports, and the socket selection that lets several tunnel ports (VNIs)
//! share one UDP port.
//!
//! The XDP program is libbpf's default AF_XDP redirect (libbpf `src/xsk.c`, after Linux 5.3), five
//! instructions assembled here:
//!
//! ```text
//!   r2 = *(u32 *)(r1 + 16)       ; ctx->rx_queue_index
//!   r1 = map[xsks]               ; LD_IMM64 with BPF_PSEUDO_MAP_FD
//!   r3 = XDP_PASS                ; what happens when no socket serves this queue
//!   call bpf_redirect_map
//!   exit
//! ```
//!
//! It is attached with a **BPF link** (`BPF_LINK_CREATE`, Linux 5.9), not with netlink's
//! `IFLA_XDP`: the link belongs to the switch's file descriptor, so the kernel detaches the
//! program when the switch closes it: on port removal, on exit and when the process is killed
//! (nothing is left behind to clean up on the next start), and a link can neither replace nor
//! be replaced by another program (the kernel answers `EBUSY`, and the switch names the holder).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `bpf(2)` commands.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ENABLE_STATS: libc::c_long = 32;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
/// The XDP attach type (`enum bpf_attach_type`).
const BPF_XDP: u32 = 37;
/// `BPF_F_XDP_HAS_FRAGS`: the program takes multi-buffer frames (jumbo frames, Linux 5.18).
const BPF_F_XDP_HAS_FRAGS: u32 = 1 << 5;
const BPF_PSEUDO_MAP_FD: u8 = 1;
/// `bpf_redirect_map`'s helper number.
const FN_REDIRECT_MAP: i32 = 51;
const XDP_PASS: i32 = 2;

/// Generic (skb) XDP: any device, after the kernel built its socket buffer.
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// Native XDP in the driver.
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// The program's name (what `ip link` and `bpftool` show beside its id).
pub const PROG_NAME: &str = "vswitch_xsk";

/// `union bpf_attr`, as bytes: every command's fields are written where the kernel reads them
/// and the rest stays zero (the kernel checks that what it does not know is zero).
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(mut self, off: usize, v: u32) -> Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, off: usize, v: u64) -> Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn name(mut self, off: usize, name: &str) -> Self {
        let n = name.len().min(15);
        self.0[off..off + n].copy_from_slice(&name.as_bytes()[..n]);
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a bpf_attr-sized buffer laid out for `cmd`; every pointer in it points
    // at memory of ours that outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, std::mem::size_of::<Attr>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

fn bpf_fd(cmd: libc::c_long, attr: &mut Attr) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: the commands used with this return a new file descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// One eBPF instruction (`struct bpf_insn`).
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst & 0xf) << 8
        | u64::from(src & 0xf) << 12
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

/// The redirect program over the socket map `map_fd`.
pub fn program(map_fd: RawFd) -> [u64; 6] {
    const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const LD_DW_IMM: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW
    const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    [
        insn(LDX_W, 2, 1, 16, 0),
        insn(LD_DW_IMM, 1, BPF_PSEUDO_MAP_FD, 0, map_fd),
        0,
        insn(MOV64_K, 3, 0, 0, XDP_PASS),
        insn(CALL, 0, 0, 0, FN_REDIRECT_MAP),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// A map of `kind` (`BPF_MAP_TYPE_*`) with `key`- and `value`-byte entries.
fn map_create(kind: u32, key: u32, value: u32, entries: u32, name: &str) -> io::Result<OwnedFd> {
    let mut a = Attr::new().u32(0, kind).u32(4, key).u32(8, value).u32(12, entries).name(28, name);
    bpf_fd(BPF_MAP_CREATE, &mut a)
}

/// Sets `key` to `value` in `map` (u32 both).
fn map_update(map: &OwnedFd, key: u32, value: u32) -> io::Result<()> {
    let mut a = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, &key as *const u32 as u64)
        .u64(16, &value as *const u32 as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(drop)
}

/// Takes `key` out of `map`.
fn map_delete(map: &OwnedFd, key: u32) -> io::Result<()> {
    let mut a = Attr::new().u32(0, map.as_raw_fd() as u32).u64(8, &key as *const u32 as u64);
    bpf(BPF_MAP_DELETE_ELEM, &mut a).map(drop)
}

/// An `XSKMAP` with room for `entries` queues.
pub fn socket_map(entries: u32) -> io::Result<OwnedFd> {
    map_create(BPF_MAP_TYPE_XSKMAP, 4, 4, entries, "vswitch_xsks")
}

/// Puts socket `sock` in `map` for queue `queue`.
pub fn map_set(map: &OwnedFd, queue: u32, sock: RawFd) -> io::Result<()> {
    map_update(map, queue, sock as u32)
}

/// Takes queue `queue`'s socket out of `map`.
pub fn map_clear(map: &OwnedFd, queue: u32) -> io::Result<()> {
    map_delete(map, queue)
}

/// Loads `insns` as a program of `kind`; on failure, the verifier's log comes with the error.
fn prog_load(
    kind: u32,
    insns: &[u64],
    flags: u32,
    name: &str,
    attach: u32,
) -> Result<OwnedFd, (io::Error, String)> {
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 4096];
    let mut a = Attr::new()
        .u32(0, kind)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .u32(44, flags)
        .name(48, name)
        .u32(68, attach);
    bpf_fd(BPF_PROG_LOAD, &mut a).map_err(|e| {
        let text =
            CStr::from_bytes_until_nul(&log).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        (e, text)
    })
}

/// Loads the redirect program over `map`; `frags`: it takes multi-buffer frames. On failure,
/// the verifier's log comes with the error.
pub fn load(map: &OwnedFd, frags: bool) -> Result<OwnedFd, (io::Error, String)> {
    let insns = program(map.as_raw_fd());
    prog_load(BPF_PROG_TYPE_XDP, &insns, if frags { BPF_F_XDP_HAS_FRAGS } else { 0 }, PROG_NAME, BPF_XDP)
}

/// The socket selection of a reuseport group of tunnel sockets: the VNI (bytes 4-6 of the
/// VXLAN and of the Geneve header, after the 8-byte UDP header the context's data starts
/// with) is looked up in `vnis` (VNI → slot), and the slot's socket in `socks` takes the
/// datagram. A VNI no port serves, or a datagram too short to hold one, is left to the
/// kernel's hash (its port then drops it, counted).
///
/// ```text
///   r6 = r1                              ; the context
///   r2 = 12; r3 = r10 - 8; r4 = 4
///   call bpf_skb_load_bytes              ; the header's second word
///   if r0 != 0 goto pass
///   r1 = *(u32 *)(r10 - 8); r1 = be32 r1; r1 >>= 8
///   *(u32 *)(r10 - 4) = r1               ; the VNI
///   r1 = map[vnis]; r2 = r10 - 4
///   call bpf_map_lookup_elem
///   if r0 == 0 goto pass
///   r1 = *(u32 *)(r0 + 0); *(u32 *)(r10 - 8) = r1
///   r1 = r6; r2 = map[socks]; r3 = r10 - 8; r4 = 0
///   call bpf_sk_select_reuseport
/// pass:
///   r0 = SK_PASS
///   exit
/// ```
pub fn vni_select_program(vnis: RawFd, socks: RawFd) -> Vec<u64> {
    const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const MOV64_K: u8 = 0xb7;
    const ADD64_K: u8 = 0x07; // BPF_ALU64 | BPF_ADD | BPF_K
    const RSH64_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
    const TO_BE: u8 = 0xdc; // BPF_ALU | BPF_END | BPF_TO_BE
    const LDX_W: u8 = 0x61;
    const STX_W: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W
    const LD_DW_IMM: u8 = 0x18;
    const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
    const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const FN_MAP_LOOKUP: i32 = 1;
    const FN_SKB_LOAD_BYTES: i32 = 26;
    const FN_SK_SELECT_REUSEPORT: i32 = 82;
    const SK_PASS: i32 = 1;
    vec![
        insn(MOV64_X, 6, 1, 0, 0),
        insn(MOV64_K, 2, 0, 0, 12),
        insn(MOV64_X, 3, 10, 0, 0),
        insn(ADD64_K, 3, 0, 0, -8),
        insn(MOV64_K, 4, 0, 0, 4),
        insn(CALL, 0, 0, 0, FN_SKB_LOAD_BYTES),
        insn(JNE_K, 0, 0, 19, 0), // to pass (26)
        insn(LDX_W, 1, 10, -8, 0),
        insn(TO_BE, 1, 0, 0, 32),
        insn(RSH64_K, 1, 0, 0, 8),
        insn(STX_W, 10, 1, -4, 0),
        insn(LD_DW_IMM, 1, BPF_PSEUDO_MAP_FD, 0, vnis),
        0,
        insn(MOV64_X, 2, 10, 0, 0),
        insn(ADD64_K, 2, 0, 0, -4),
        insn(CALL, 0, 0, 0, FN_MAP_LOOKUP),
        insn(JEQ_K, 0, 0, 9, 0), // to pass (26)
        insn(LDX_W, 1, 0, 0, 0),
        insn(STX_W, 10, 1, -8, 0),
        insn(MOV64_X, 1, 6, 0, 0),
        insn(LD_DW_IMM, 2, BPF_PSEUDO_MAP_FD, 0, socks),
        0,
        insn(MOV64_X, 3, 10, 0, 0),
        insn(ADD64_K, 3, 0, 0, -8),
        insn(MOV64_K, 4, 0, 0, 0),
        insn(CALL, 0, 0, 0, FN_SK_SELECT_REUSEPORT),
        insn(MOV64_K, 0, 0, 0, SK_PASS),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// A reuseport group's selection by VNI: the program and its two maps.
pub struct VniSelect {
    /// VNI → slot.
    vnis: OwnedFd,
    /// Slot → socket.
    socks: OwnedFd,
    prog: OwnedFd,
}

/// The VNI selection program's name.
pub const VNI_PROG_NAME: &str = "vswitch_vni";

/// Slots (tunnel ports) one UDP port may serve.
pub const VNI_SLOTS: u32 = 1024;

impl VniSelect {
    /// The maps and the program; on failure, what failed and the verifier's log.
    pub fn new() -> Result<VniSelect, (io::Error, String)> {
        let vnis =
            map_create(BPF_MAP_TYPE_HASH, 4, 4, VNI_SLOTS, "vswitch_vnis").map_err(|e| (e, String::new()))?;
        let socks = map_create(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 4, VNI_SLOTS, "vswitch_vnisk")
            .map_err(|e| (e, String::new()))?;
        let insns = vni_select_program(vnis.as_raw_fd(), socks.as_raw_fd());
        let prog = prog_load(BPF_PROG_TYPE_SK_REUSEPORT, &insns, 0, VNI_PROG_NAME, 0)?;
        Ok(VniSelect { vnis, socks, prog })
    }

    /// Makes the program the group's (`sock` is a bound member with `SO_REUSEPORT`).
    pub fn attach(&self, sock: RawFd) -> io::Result<()> {
        const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;
        let fd = self.prog.as_raw_fd();
        // SAFETY: setsockopt with an int.
        let r = unsafe {
            libc::setsockopt(
                sock,
                libc::SOL_SOCKET,
                SO_ATTACH_REUSEPORT_EBPF,
                (&fd as *const RawFd).cast(),
                4,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Datagrams for `vni` go to `sock`, in `slot`.
    pub fn set(&self, slot: u32, vni: u32, sock: RawFd) -> io::Result<()> {
        map_update(&self.socks, slot, sock as u32)?;
        map_update(&self.vnis, vni, slot)
    }

    /// `vni` is served no more (its slot is free).
    pub fn clear(&self, slot: u32, vni: u32) {
        let _ = map_delete(&self.vnis, vni);
        let _ = map_delete(&self.socks, slot);
    }
}

/// Attaches `prog` to device `ifindex` in `mode` (`XDP_FLAGS_*`) with a link, which detaches
/// it when closed.
pub fn attach(prog: &OwnedFd, ifindex: u32, mode: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new().u32(0, prog.as_raw_fd() as u32).u32(4, ifindex).u32(8, BPF_XDP).u32(12, mode);
    bpf_fd(BPF_LINK_CREATE, &mut a)
}

/// The name of program `id` (another program holding a device), if it can be read.
pub fn prog_name(id: u32) -> Option<String> {
    let mut a = Attr::new().u32(0, id);
    let fd = bpf_fd(BPF_PROG_GET_FD_BY_ID, &mut a).ok()?;
    // struct bpf_prog_info up to its name (offset 64, 16 bytes).
    let mut info = [0u8; 80];
    let mut a =
        Attr::new().u32(0, fd.as_raw_fd() as u32).u32(4, info.len() as u32).u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).ok()?;
    let name = CStr::from_bytes_until_nul(&info[64..80]).ok()?;
    Some(name.to_string_lossy().into_owned())
}

/// Turns on the kernel's run-time statistics of every BPF program while the returned file is
/// open (`BPF_ENABLE_STATS`, `BPF_STATS_RUN_TIME`; the `kernel.bpf_stats_enabled` sysctl without
/// changing it for good). Needs `CAP_SYS_ADMIN`. For measurements: the kernel then times every
/// run of every program.
pub fn enable_run_time_stats() -> io::Result<OwnedFd> {
    let mut a = Attr::new().u32(0, 0);
    bpf_fd(BPF_ENABLE_STATS, &mut a)
}

/// Runs and the time they took (ns) of every loaded program called `name`, summed, while
/// statistics are on ([`enable_run_time_stats`]); (0, 0) if there is none.
pub fn prog_run_time(name: &str) -> (u64, u64) {
    let (mut runs, mut ns, mut id) = (0u64, 0u64, 0u32);
    loop {
        let mut a = Attr::new().u32(0, id);
        if bpf(BPF_PROG_GET_NEXT_ID, &mut a).is_err() {
            return (runs, ns);
        }
        id = u32::from_ne_bytes(a.0[4..8].try_into().expect("4 bytes"));
        let mut a = Attr::new().u32(0, id);
        let Ok(fd) = bpf_fd(BPF_PROG_GET_FD_BY_ID, &mut a) else { continue };
        // struct bpf_prog_info up to run_cnt: name at 64 (16 bytes), run_time_ns at 192,
        // run_cnt at 200.
        let mut info = [0u8; 208];
        let mut a = Attr::new()
            .u32(0, fd.as_raw_fd() as u32)
            .u32(4, info.len() as u32)
            .u64(8, info.as_mut_ptr() as u64);
        if bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).is_err() {
            continue;
        }
        if CStr::from_bytes_until_nul(&info[64..80]).is_ok_and(|n| n.to_bytes() == name.as_bytes()) {
            ns += u64::from_ne_bytes(info[192..200].try_into().expect("8 bytes"));
            runs += u64::from_ne_bytes(info[200..208].try_into().expect("8 bytes"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The encoding of libbpf's program, as `llvm-objdump` prints libbpf's own object
    /// (`xsk_def_xdp_prog_5.3.o` less its fallback branch): little-endian byte order.
    #[test]
    fn program_bytes_match_libbpf() {
        let p = program(7);
        let bytes: Vec<u8> = p.iter().flat_map(|i| i.to_le_bytes()).collect();
        assert_eq!(
            bytes,
            [
                0x61, 0x12, 0x10, 0, 0, 0, 0, 0, // r2 = *(u32 *)(r1 + 16)
                0x18, 0x11, 0, 0, 7, 0, 0, 0, // r1 = map fd 7 (ld_imm64, pseudo map fd)
                0, 0, 0, 0, 0, 0, 0, 0, //
                0xb7, 0x03, 0, 0, 2, 0, 0, 0, // r3 = 2
                0x85, 0, 0, 0, 51, 0, 0, 0, // call 51
                0x95, 0, 0, 0, 0, 0, 0, 0, // exit
            ]
        );
    }

    /// Both early exits of the VNI selection land on `r0 = SK_PASS; exit`, and the map fds sit
    /// in their LD_IMM64 pairs (the kernel's verifier checks the rest when a tunnel port opens).
    #[test]
    fn vni_select_jumps_land_on_pass() {
        let p = vni_select_program(5, 6);
        let pass = p.len() - 2;
        assert_eq!(p[pass], insn(0xb7, 0, 0, 0, 1));
        for (pc, i) in p.iter().enumerate() {
            let code = (*i & 0xff) as u8;
            if code == 0x55 || code == 0x15 {
                let off = ((*i >> 16) & 0xffff) as u16 as i16;
                assert_eq!(pc as i64 + 1 + i64::from(off), pass as i64, "jump at {pc}");
            }
        }
        let imm = |pc: usize| (p[pc] >> 32) as i32;
        assert_eq!((p[11] & 0xff, imm(11), p[12]), (0x18, 5, 0));
        assert_eq!((p[20] & 0xff, imm(20), p[21]), (0x18, 6, 0));
    }
}
