//! The switch's own XDP program and its lifetime, with `bpf(2)` and no libbpf or clang.
//!
//! The program is libbpf's default AF_XDP redirect (libbpf `src/xsk.c`, after Linux 5.3), five
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
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;

const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
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

/// An `XSKMAP` with room for `entries` queues.
pub fn socket_map(entries: u32) -> io::Result<OwnedFd> {
    let mut a =
        Attr::new().u32(0, BPF_MAP_TYPE_XSKMAP).u32(4, 4).u32(8, 4).u32(12, entries).name(28, "vswitch_xsks");
    bpf_fd(BPF_MAP_CREATE, &mut a)
}

/// Puts socket `sock` in `map` for queue `queue`.
pub fn map_set(map: &OwnedFd, queue: u32, sock: RawFd) -> io::Result<()> {
    let (k, v) = (queue, sock as u32);
    let mut a = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, &k as *const u32 as u64)
        .u64(16, &v as *const u32 as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(drop)
}

/// Takes queue `queue`'s socket out of `map`.
pub fn map_clear(map: &OwnedFd, queue: u32) -> io::Result<()> {
    let k = queue;
    let mut a = Attr::new().u32(0, map.as_raw_fd() as u32).u64(8, &k as *const u32 as u64);
    bpf(BPF_MAP_DELETE_ELEM, &mut a).map(drop)
}

/// Loads the redirect program over `map`; `frags`: it takes multi-buffer frames. On failure,
/// the verifier's log comes with the error.
pub fn load(map: &OwnedFd, frags: bool) -> Result<OwnedFd, (io::Error, String)> {
    let insns = program(map.as_raw_fd());
    let license = c"Dual MIT/GPL";
    let mut log = vec![0u8; 4096];
    let mut a = Attr::new()
        .u32(0, BPF_PROG_TYPE_XDP)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .u32(44, if frags { BPF_F_XDP_HAS_FRAGS } else { 0 })
        .name(48, PROG_NAME)
        .u32(68, BPF_XDP);
    bpf_fd(BPF_PROG_LOAD, &mut a).map_err(|e| {
        let text =
            CStr::from_bytes_until_nul(&log).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default();
        (e, text)
    })
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
}
