//! The far end of a Linux wire (`--wire tap|afpacket`): a network namespace holding the device's
//! other side, and the AF_PACKET sender there.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

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
    let fd = packet_socket_in(ns, 0)?;
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

/// An AF_PACKET socket for `proto` (network order; 0: it only sends) opened by this thread after
/// it joined namespace `ns` (the thread stays there).
fn packet_socket_in(ns: &str, proto: u16) -> Result<OwnedFd, String> {
    let path = format!("/var/run/netns/{ns}");
    let f = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: setns on this thread only, with a namespace file we hold open.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: plain socket(2), checked, owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto.into()) };
    if fd < 0 {
        return Err(format!("AF_PACKET socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the wire's far end received: frames from the guests, and (while `timed`) their one-way
/// latency, sender's clock to this thread's.
pub(super) struct FarRx<'a> {
    pub(super) frames: &'a AtomicU64,
    pub(super) hist: &'a mut Histogram<u64>,
    pub(super) timed: &'a AtomicBool,
}

/// The wire's receiver (the way back): first `hello` out of `ifname` in namespace `ns` (so the
/// switch learns where the far end is and does not flood), then every frame from a source in
/// `from` counted, a burst per `recvmmsg` (blocking up to 10 ms, so an idle receiver leaves the
/// CPUs to the switch and the guests), until `stop`.
pub(super) fn recv_wire(
    ns: &str,
    ifname: &str,
    hello: &[u8],
    from: &[[u8; 6]],
    rx: FarRx<'_>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let fd = packet_socket_in(ns, (libc::ETH_P_ALL as u16).to_be())?;
    let name = std::ffi::CString::new(ifname).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(format!("no interface {ifname} in namespace {ns}"));
    }
    // SAFETY: plain data; zeroes are valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = index as i32;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: binding to a sockaddr_ll of the right size.
    if unsafe { libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), len) } < 0 {
        return Err(format!("bind to {ifname}: {}", std::io::Error::last_os_error()));
    }
    let tv = libc::timeval { tv_sec: 0, tv_usec: 10_000 };
    let buf: libc::c_int = 8 << 20;
    // SAFETY: options of the right sizes, only read by the kernel.
    unsafe {
        let p = |v: *const libc::c_void| v;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            p((&tv as *const libc::timeval).cast()),
            16,
        );
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            // As root, past net.core.rmem_max (which would cap SO_RCVBUF at a few hundred
            // frames): the receiver must not be what drops.
            libc::SO_RCVBUFFORCE,
            p((&buf as *const i32).cast()),
            4,
        );
    }
    // SAFETY: the frame and `sll` outlive the call.
    unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            hello.as_ptr().cast(),
            hello.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            len,
        )
    };
    const B: usize = 64;
    const L: usize = 2048;
    let mut bufs = vec![0u8; B * L];
    while !stop.load(Ordering::Relaxed) {
        let mut iov: [libc::iovec; B] = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; B];
        // SAFETY: plain data; zeroes are valid.
        let mut msgs: [libc::mmsghdr; B] = unsafe { std::mem::zeroed() };
        for (j, (v, m)) in iov.iter_mut().zip(msgs.iter_mut()).enumerate() {
            *v = libc::iovec { iov_base: bufs[j * L..].as_mut_ptr().cast(), iov_len: L };
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: each message's one iovec is a distinct buffer of ours, within its length.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                B as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        let (on, t) = (rx.timed.load(Ordering::Relaxed), now_ns());
        let mut k = 0u64;
        for (j, m) in msgs[..n as usize].iter().enumerate() {
            let f = &bufs[j * L..j * L + (m.msg_len as usize).min(L)];
            if f.len() < 14 || !from.iter().any(|s| f[6..12] == *s) {
                continue;
            }
            k += 1;
            if on {
                if let Some(sent) = frame_seq(f) {
                    let _ = rx.hist.record(t.saturating_sub(sent).max(1));
                }
            }
        }
        rx.frames.fetch_add(k, Ordering::Relaxed);
    }
    Ok(())
}
