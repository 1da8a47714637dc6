//! The far end of a Linux wire (`--wire tap|afpacket`): a network namespace holding the device's
//! other side, and the AF_PACKET sender there.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::frame::frame_seq;

/// A network namespace holding the wire's far end, deleted on drop.
pub(super) struct Netns(pub(super) String);

impl Netns {
    pub(super) fn new(ifname: &str) -> Result<Netns, String> {
        let name = format!("vswb-tiers-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name])?;
        let ns = Netns(name);
        ip(&["link", "set", ifname, "netns", &ns.0])?;
        ip(&["-n", &ns.0, "link", "set", ifname, "up"])?;
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

pub(super) fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e} (iproute2 needed)"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())),
    }
}

pub(super) fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The wire's sender: frames out of `ifname` in namespace `ns` from an AF_PACKET socket
/// (queueing disciplines bypassed), 32 per `sendmmsg`, each stamped with the send time.
/// `pps` 0: as fast as it goes. Returns frames sent.
pub(super) fn send_wire(
    ns: &str,
    ifname: &str,
    frames: Vec<Vec<u8>>,
    pps: u64,
    stop: Arc<AtomicBool>,
) -> Result<u64, String> {
    let path = format!("/var/run/netns/{ns}");
    let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: setns on this thread only, with a namespace file we hold open.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: plain socket(2), checked, owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!("AF_PACKET socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: an int option.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&one as *const i32).cast(),
            4,
        )
    };
    let name = std::ffi::CString::new(ifname).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: plain data; zeroes are valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = index as i32;
    sll.sll_halen = 6;
    let mut frames = frames;
    let n = frames.len();
    const B: usize = 32;
    let mut sent = 0u64;
    let start = Instant::now();
    let mut k = 0usize;
    while !stop.load(Ordering::Relaxed) {
        if pps > 0 {
            let due = Duration::from_secs_f64(sent as f64 / pps as f64);
            let el = start.elapsed();
            if el < due {
                std::thread::sleep((due - el).min(Duration::from_millis(1)));
                continue;
            }
        }
        let t = now_ns();
        let mut iov: [libc::iovec; B] = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; B];
        // SAFETY: plain data; zeroes are valid.
        let mut msgs: [libc::mmsghdr; B] = unsafe { std::mem::zeroed() };
        let batch = if pps > 0 { ((pps / 10_000).clamp(1, B as u64)) as usize } else { B };
        for j in 0..batch {
            let f = &mut frames[(k + j) % n];
            if let Some(off) = frame_seq(f).map(|_| crate::frame::SEQ_OFFSET) {
                f[off..off + 8].copy_from_slice(&t.to_be_bytes());
            }
            iov[j] = libc::iovec { iov_base: f.as_mut_ptr().cast(), iov_len: f.len() };
            msgs[j].msg_hdr.msg_iov = &mut iov[j];
            msgs[j].msg_hdr.msg_iovlen = 1;
            msgs[j].msg_hdr.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
            msgs[j].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        }
        // SAFETY: every message points at a live frame and at `sll`.
        let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), batch as u32, 0) };
        if r > 0 {
            sent += r as u64;
            k = (k + r as usize) % n;
        }
    }
    Ok(sent)
}
