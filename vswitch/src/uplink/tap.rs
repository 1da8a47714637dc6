//! TAP uplink: a Linux network device the switch opens with `IFF_VNET_HDR`, so offload
//! requests cross in the same virtio-net header guests use.
//!
//! ```text
//!  kernel stack ──read()──▶ staging buffer ──(late copy)──▶ guest receive buffers
//!  kernel stack ◀─writev()── [vnet header][checked head][rest straight from the guest's buffers]
//! ```
//!
//! Every fd is non-blocking; a full device queue is a counted drop, never a wait. A device an
//! administrator deletes answers `EBADFD`: the queue marks itself broken (the port goes down)
//! and says so once. Moving the device into another network namespace changes nothing here:
//! the file stays the switch's.
//!
//! Reads are one syscall per frame: a TAP has no batched read (`recvmmsg` is for sockets), as
//! Open vSwitch's and DPDK's TAP ports also find.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use iommu::{Grant, Ro};

use crate::limits::{BURST, MAX_FRAME};
use crate::offload::{Caps, MAX_GSO_FRAME};

/// Length of the virtio-net header on the device (`TUNSETVNETHDRSZ`): the modern 12 bytes, as
/// guests use, so one header format crosses the switch.
pub const VNET_HDR: u32 = 12;
/// Largest MTU a TAP port may be given: a frame of this MTU plus Ethernet header and one VLAN
/// tag is [`MAX_FRAME`].
pub const MAX_MTU: u32 = MAX_FRAME - 18;

/// Why a TAP port could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// /dev/net/tun unavailable
    #[error("cannot open /dev/net/tun: {0} (the kernel needs CONFIG_TUN, and the switch CAP_NET_ADMIN)")]
    Open(#[source] io::Error),
    /// TUNSETIFF refused
    #[error("cannot create or attach TAP device '{name}': {source} (an existing device must be a TAP made without a packet-info header and, for queues > 1, with multi_queue; attaching to one owned by another user needs CAP_NET_ADMIN)")]
    Attach {
        /// Interface name.
        name: String,
        /// Cause.
        source: io::Error,
    },
    /// bad name
    #[error("TAP device name '{0}' must be 1-15 bytes without '/', ':' or whitespace")]
    Name(String),
    /// another ioctl failed
    #[error("TAP device '{name}': {what} failed: {source}")]
    Ioctl {
        /// Interface name.
        name: String,
        /// The operation.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
}

/// What the kernel's side of a virtio-net header takes and asks for: partial checksums and TCP
/// segmentation (v4, v6, ECN), both ways.
pub(crate) fn kernel_caps() -> Caps {
    Caps {
        tx_csum: true,
        tx_tso4: true,
        tx_tso6: true,
        tx_ecn: true,
        rx_csum: true,
        rx_tso4: true,
        rx_tso6: true,
        rx_ecn: true,
    }
}

/// A staging buffer's length for a source with `caps`: one byte more than the longest frame
/// taken (header included), so that a read that fills the buffer was cut.
fn staging_len(caps: Caps) -> usize {
    let big = caps.tx_tso4 || caps.tx_tso6;
    VNET_HDR as usize + if big { MAX_GSO_FRAME } else { MAX_FRAME } as usize + 1
}

/// A TAP device the switch holds: one file per queue pair. Dropping the last file of a device
/// the switch created removes the device.
pub struct TapDevice {
    /// Interface name (the kernel's, which may differ from the one asked for with `%d`).
    pub name: String,
    files: Vec<Arc<File>>,
    caps: Caps,
}

impl TapDevice {
    /// Creates the TAP device `name` (or attaches to an existing one) with `queues` queues,
    /// offloads negotiated with the kernel if `offloads`, the link up and, if given, its MTU.
    pub fn open(name: &str, queues: u16, offloads: bool, mtu: Option<u32>) -> Result<Self, TapError> {
        if name.is_empty()
            || name.len() > 15
            || name.contains(['/', ':'])
            || name.contains(char::is_whitespace)
        {
            return Err(TapError::Name(name.to_string()));
        }
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut files = Vec::new();
        let mut actual = name.to_string();
        for _ in 0..queues.max(1) {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::Open)?;
            let mut ifr = ifreq(&actual);
            ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes an ifreq, which `ifr` is.
            if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
                return Err(TapError::Attach { name: name.to_string(), source: io::Error::last_os_error() });
            }
            actual = ifname_of(&ifr);
            files.push(Arc::new(f));
        }
        let fail = |what, source| TapError::Ioctl { name: actual.clone(), what, source };
        // Offloads the kernel may hand us: checksum left to do and TCP segmentation (the switch
        // passes them on to a guest that takes them and does the work for one that does not).
        let tun_f = if offloads {
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
        } else {
            0
        };
        for f in &files {
            let sz: libc::c_int = VNET_HDR as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int.
            if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETVNETHDRSZ, &sz) } < 0 {
                return Err(fail("TUNSETVNETHDRSZ", io::Error::last_os_error()));
            }
            // SAFETY: TUNSETOFFLOAD takes the flags as its argument value.
            if unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETOFFLOAD, tun_f as libc::c_ulong) } < 0 {
                return Err(fail("TUNSETOFFLOAD", io::Error::last_os_error()));
            }
        }
        if let Some(m) = mtu {
            if_ioctl(&actual, libc::SIOCSIFMTU, |r| r.ifr_ifru.ifru_mtu = m as libc::c_int)
                .map_err(|e| fail("setting the MTU", e))?;
        }
        set_up(&actual).map_err(|e| fail("bringing the link up", e))?;
        let caps = if offloads { kernel_caps() } else { Caps::default() };
        Ok(TapDevice { name: actual, files, caps })
    }

    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.files.len()
    }

    /// Queue `i`'s source side (frames from the kernel).
    pub fn source(&self, i: usize) -> TapQueue {
        TapQueue::new(self, i, staging_len(self.caps))
    }

    /// Queue `i`'s sink side (frames to the kernel).
    pub fn sink(&self, i: usize) -> TapQueue {
        TapQueue::new(self, i, 0)
    }
}

/// One queue of a TAP device (or of a packet socket: [`super::afpacket`]), as a polling
/// thread uses it (under its slot's lock).
pub struct TapQueue {
    file: Arc<File>,
    /// Device name, for the one message when it goes away.
    name: Arc<str>,
    /// Source side: where frames are read, [`BURST`] buffers of `buf_len`.
    bufs: Box<[u8]>,
    buf_len: usize,
    /// What the kernel may ask of the switch (`tx_*`) and takes from it (`rx_*`), in guest terms.
    pub caps: Caps,
    broken: bool,
    /// A socket's source side: frames read a burst per `recvmmsg`, handed out one by one.
    batch: Option<Box<Batch>>,
    /// A tunnel port's state (its receive decapsulates, its send encapsulates).
    tunnel: Option<Box<super::tunnel::Side>>,
    /// An XDP socket's half (the source's RX ring or the sink's TX ring).
    xsk: Option<Xsk>,
    /// A socket source's drop counter in the kernel (packet and XDP sockets).
    drops: Option<Box<KernelDrops>>,
    /// A packet socket's sink: a burst's frames go in one `sendmmsg` ([`TapQueue::send_many`]).
    send_batched: bool,
}

/// Bursts between two reads of a socket's drop counter under load (a `getsockopt` per
/// 4096 bursts: nothing against the burst's own cost); an idle queue reads it a millisecond
/// after the last read.
const DROP_POLLS: u32 = 4096;

/// Where a socket source's kernel counts the frames it could not hand the switch.
struct KernelDrops {
    /// `XDP_STATISTICS` (cumulative: `rx_dropped` + `rx_ring_full`, the last total kept)
    /// or `PACKET_STATISTICS` (`tp_drops`, reset by each read).
    xdp: bool,
    last: u64,
    polls: u32,
    at: u64,
}

impl KernelDrops {
    fn new(xdp: bool) -> Box<Self> {
        Box::new(KernelDrops { xdp, last: 0, polls: 0, at: 0 })
    }

    /// Drops counted since the last read, if it is time to read.
    #[inline]
    fn poll(&mut self, fd: libc::c_int, empty: bool) -> u64 {
        self.polls += 1;
        if self.polls < DROP_POLLS {
            if !empty {
                return 0;
            }
            let now = crate::clock::ticks();
            if now.wrapping_sub(self.at) < crate::clock::ticks_per_us() * 1000 {
                return 0;
            }
            self.at = now;
        }
        self.polls = 0;
        if self.xdp {
            // struct xdp_statistics (Linux 5.9): rx_dropped, rx_invalid_descs,
            // tx_invalid_descs, rx_ring_full, rx_fill_ring_empty_descs, tx_ring_empty_descs.
            let mut st = [0u64; 6];
            if getsockopt(fd, SOL_XDP, XDP_STATISTICS, &mut st).is_err() {
                return 0;
            }
            let total = st[0] + st[3];
            total.wrapping_sub(std::mem::replace(&mut self.last, total))
        } else {
            // struct tpacket_stats: tp_packets, tp_drops (both reset by the read).
            let mut st = [0u32; 2];
            match getsockopt(fd, libc::SOL_PACKET, libc::PACKET_STATISTICS, &mut st) {
                Ok(()) => u64::from(st[1]),
                Err(_) => 0,
            }
        }
    }
}

const SOL_XDP: libc::c_int = 283;
const XDP_STATISTICS: libc::c_int = 7;

/// `getsockopt` into a plain array.
fn getsockopt<T: Copy, const N: usize>(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    out: &mut [T; N],
) -> io::Result<()> {
    let mut len = std::mem::size_of_val(out) as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `out`, an array of plain integers.
    let r = unsafe { libc::getsockopt(fd, level, name, out.as_mut_ptr().cast(), &mut len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An XDP socket's half a queue runs on.
enum Xsk {
    Rx(Box<super::afxdp::ring::XskRx>),
    Tx(Box<super::afxdp::ring::XskTx>),
}

/// Frames one `recvmmsg` read: (length, cut by the kernel) per staging buffer, in order, and
/// each one's control data (a packet socket's `PACKET_AUXDATA`: the VLAN tag the kernel took
/// off the frame).
struct Batch {
    got: [(u32, bool); BURST],
    count: usize,
    next: usize,
    ctl: [[u64; 8]; BURST],
}

/// The tag a packet socket's `PACKET_AUXDATA` says the kernel took off a frame (TPID, TCI).
fn aux_vlan(m: &libc::msghdr) -> Option<(u16, u16)> {
    // SAFETY: walking the control data the kernel wrote into this message's buffer, within
    // `msg_controllen`, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                let a: libc::tpacket_auxdata = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                if a.tp_status & libc::TP_STATUS_VLAN_VALID == 0 {
                    return None;
                }
                let tpid =
                    if a.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 { a.tp_vlan_tpid } else { 0x8100 };
                return Some((tpid, a.tp_vlan_tci));
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
    None
}

/// What a read from the device gave.
pub enum Recv {
    /// A frame (virtio-net header first) in staging buffer `i`.
    Frame(Grant<Ro>),
    /// A frame longer than the staging buffer (cut by the kernel): dropped.
    Truncated,
    /// Nothing more now.
    Empty,
    /// The device is gone; the queue is broken.
    Gone,
}

/// What a write to the device did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// Taken by the kernel.
    Ok,
    /// The device's queue is full (or the kernel is short of memory): dropped, counted.
    Full,
    /// The kernel refused the frame (a bad offload request, memory that faulted).
    Refused,
    /// The device is gone; the queue is broken.
    Gone,
}

impl TapQueue {
    /// A queue over `file` (of device `name`) with `buf_len`-byte staging buffers (0: a sink).
    fn with(file: Arc<File>, name: &str, caps: Caps, buf_len: usize) -> Self {
        TapQueue {
            file,
            name: name.into(),
            bufs: vec![0u8; buf_len * if buf_len > 0 { BURST } else { 0 }].into_boxed_slice(),
            buf_len,
            caps,
            broken: false,
            batch: None,
            tunnel: None,
            xsk: None,
            drops: None,
            send_batched: false,
        }
    }

    fn new(dev: &TapDevice, i: usize, buf_len: usize) -> Self {
        Self::with(dev.files[i].clone(), &dev.name, dev.caps, buf_len)
    }

    /// A tunnel port's queue over its receive socket (`source`: the side that reads).
    pub(crate) fn tunnel(file: Arc<File>, name: &str, source: bool, side: Box<super::tunnel::Side>) -> Self {
        let caps = super::tunnel::caps();
        // Room for a Geneve header's options before the frame.
        let mut q = Self::with(file, name, caps, if source { staging_len(caps) + 256 } else { 0 });
        q.tunnel = Some(side);
        q
    }

    /// A queue over a packet socket bound to device `name` (`source`: the side that reads,
    /// a burst per `recvmmsg`).
    pub(crate) fn over(file: Arc<File>, name: &str, caps: Caps, source: bool) -> Self {
        // Four bytes more for a VLAN tag put back (`recv_batched`).
        let mut q = Self::with(file, name, caps, if source { staging_len(caps) + 4 } else { 0 });
        q.batch = source
            .then(|| Box::new(Batch { got: [(0, false); BURST], count: 0, next: 0, ctl: [[0; 8]; BURST] }));
        q.drops = source.then(|| KernelDrops::new(false));
        q.send_batched = !source;
        q
    }

    /// An XDP socket's receive half (a source: frames are handed on where the kernel put
    /// them in the UMEM).
    pub(crate) fn xsk(file: Arc<File>, name: &str, rx: Box<super::afxdp::ring::XskRx>) -> Self {
        let mut q = Self::with(file, name, super::tunnel::caps(), 0);
        q.xsk = Some(Xsk::Rx(rx));
        q.drops = Some(KernelDrops::new(true));
        q
    }

    /// An XDP socket's transmit half (a sink).
    pub(crate) fn xsk_sink(file: Arc<File>, name: &str, tx: Box<super::afxdp::ring::XskTx>) -> Self {
        let mut q = Self::with(file, name, super::tunnel::caps(), 0);
        q.xsk = Some(Xsk::Tx(tx));
        q
    }

    /// Whether the device has gone away.
    #[inline(always)]
    pub fn broken(&self) -> bool {
        self.broken || matches!(&self.xsk, Some(Xsk::Tx(t)) if t.broken())
    }

    /// Ends a burst of sends (an XDP socket's transmit is kicked once for all of them).
    #[inline(always)]
    pub fn flush(&mut self) {
        if let Some(Xsk::Tx(t)) = self.xsk.as_mut() {
            t.flush();
        }
    }

    /// Frames a socket source's kernel dropped for want of room in the switch's rings or
    /// buffers since the last call (read now and then; 0 in between and for other queues).
    /// `empty`: the burst found nothing.
    #[inline(always)]
    pub fn kernel_drops(&mut self, empty: bool) -> u64 {
        match self.drops.as_deref_mut() {
            Some(d) => d.poll(self.file.as_raw_fd(), empty),
            None => 0,
        }
    }

    /// The device file (the polling thread's epoll watches it for frames).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Reads one frame into staging buffer `i` (`i < BURST`, a source queue: `i` counts the
    /// frames the burst holds so far).
    #[inline]
    pub fn recv(&mut self, i: usize) -> Recv {
        if let Some(Xsk::Rx(r)) = self.xsk.as_mut() {
            return r.recv(i);
        }
        if self.batch.is_some() {
            return self.recv_batched(i);
        }
        if let Some(t) = self.tunnel.as_deref_mut() {
            return super::tunnel::recv(t, &self.file, &mut self.bufs, self.buf_len, i);
        }
        let Some(buf) = self.bufs.get_mut(i * self.buf_len..(i + 1) * self.buf_len) else {
            return Recv::Empty;
        };
        // SAFETY: reading into our own buffer, within its length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            // The kernel cuts a frame longer than the buffer to fit (and says it read the
            // buffer's length): a full buffer means a frame too long to take, dropped.
            if n as usize >= buf.len() {
                return Recv::Truncated;
            }
            // SAFETY: the buffer is ours, lives as long as this queue (whose slot lock the
            // burst holds while the grant is used) and holds `n` bytes.
            return Recv::Frame(unsafe { Grant::from_raw(buf.as_mut_ptr(), n as u32) });
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::EIO) => Recv::Empty,
            Some(e) => self.gone(e).map_or(Recv::Empty, |_| Recv::Gone),
            None => Recv::Empty,
        }
    }

    /// A socket's frames: a burst read with one `recvmmsg` when the burst starts (`i == 0`:
    /// no staging buffer is in use), then handed out in order; the burst ends where they do.
    fn recv_batched(&mut self, i: usize) -> Recv {
        let b = self.batch.as_deref_mut().expect("a batched queue");
        if b.next == b.count {
            if i != 0 || self.buf_len == 0 {
                return Recv::Empty;
            }
            let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BURST];
            // SAFETY: mmsghdr is plain data; all zeroes is a valid value.
            let mut msgs: [libc::mmsghdr; BURST] = unsafe { std::mem::zeroed() };
            let b = self.batch.as_deref_mut().expect("a batched queue");
            for (k, ((v, m), ctl)) in iov.iter_mut().zip(msgs.iter_mut()).zip(b.ctl.iter_mut()).enumerate() {
                v.iov_base = self.bufs[k * self.buf_len..].as_mut_ptr().cast();
                // Room for a tag put back (below).
                v.iov_len = self.buf_len - 4;
                m.msg_hdr.msg_iov = v;
                m.msg_hdr.msg_iovlen = 1;
                m.msg_hdr.msg_control = ctl.as_mut_ptr().cast();
                m.msg_hdr.msg_controllen = std::mem::size_of_val(ctl);
            }
            // SAFETY: each message's one iovec is a distinct staging buffer of ours, within its
            // length; the kernel writes only there.
            let n = unsafe {
                libc::recvmmsg(
                    self.file.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    BURST as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                let e = io::Error::last_os_error().raw_os_error();
                return match e {
                    Some(libc::EAGAIN | libc::EINTR | libc::ENETDOWN) | None => Recv::Empty,
                    Some(e) if n < 0 => self.gone(e).map_or(Recv::Empty, |_| Recv::Gone),
                    _ => Recv::Empty,
                };
            }
            let b = self.batch.as_deref_mut().expect("a batched queue");
            for (k, (g, m)) in b.got.iter_mut().zip(&msgs[..n as usize]).enumerate() {
                *g = (m.msg_len, m.msg_hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0);
                // The kernel keeps a received tag beside the frame: put it back where the
                // frame had it, after the addresses (the frame moves 4 bytes on).
                let (len, hdr) = (m.msg_len as usize, VNET_HDR as usize);
                if let Some((tpid, tci)) = aux_vlan(&m.msg_hdr).filter(|_| len >= hdr + 12 && !g.1) {
                    let buf = &mut self.bufs[k * self.buf_len..(k + 1) * self.buf_len];
                    buf.copy_within(hdr + 12..len, hdr + 16);
                    buf[hdr + 12..hdr + 14].copy_from_slice(&tpid.to_be_bytes());
                    buf[hdr + 14..hdr + 16].copy_from_slice(&tci.to_be_bytes());
                    g.0 += 4;
                }
            }
            (b.count, b.next) = (n as usize, 0);
        }
        let b = self.batch.as_deref_mut().expect("a batched queue");
        let k = b.next;
        b.next += 1;
        let (len, cut) = b.got[k];
        if cut || len as usize >= self.buf_len {
            return Recv::Truncated;
        }
        let buf = &mut self.bufs[k * self.buf_len..];
        // SAFETY: staging buffer `k` is ours, lives as long as this queue (whose slot lock the
        // burst holds while the grant is used), holds `len` bytes, and is not read into again
        // before the next burst starts.
        Recv::Frame(unsafe { Grant::from_raw(buf.as_mut_ptr(), len) })
    }

    /// Writes one frame, given as pieces (header first).
    #[inline]
    pub fn send(&mut self, iov: &[libc::iovec]) -> Sent {
        if let Some(Xsk::Tx(t)) = self.xsk.as_mut() {
            return t.send(iov);
        }
        if let Some(t) = self.tunnel.as_deref_mut() {
            return super::tunnel::send(t, iov);
        }
        // SAFETY: every iovec points into a grant (checked guest memory the burst holds
        // mapped) or into the caller's stack; the kernel only reads them, and a fault in guest
        // memory comes back as EFAULT, not a signal.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n >= 0 {
            return Sent::Ok;
        }
        match io::Error::last_os_error().raw_os_error() {
            // EIO (a TAP) or ENETDOWN (a packet socket): the link is down (an administrator's
            // choice, or the device is between two network namespaces): nothing can go now, and
            // it may come back up.
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::ENOMEM) | Some(libc::EINTR)
            | Some(libc::EIO) | Some(libc::ENETDOWN) => Sent::Full,
            Some(e) => self.gone(e).map_or(Sent::Refused, |_| Sent::Gone),
            None => Sent::Refused,
        }
    }

    /// Offloads a sink finished in software since the last call (a tunnel's or an XDP socket's:
    /// their other side takes no virtio-net header): (TSO frames segmented, checksums
    /// completed); (0, 0) for the others.
    #[inline]
    pub fn soft_counts(&mut self) -> (u64, u64) {
        match (self.tunnel.as_deref_mut(), self.xsk.as_mut()) {
            (Some(t), _) => t.soft.take_counts(),
            (None, Some(Xsk::Tx(t))) => t.soft_counts(),
            _ => (0, 0),
        }
    }

    /// Whether this queue sends a burst per system call ([`TapQueue::send_many`]) rather than a
    /// frame per [`TapQueue::send`].
    #[inline(always)]
    pub fn sends_batched(&self) -> bool {
        self.send_batched
    }

    /// Writes `frames` (each as pieces, header first) with one `sendmmsg` per run of frames the
    /// kernel takes; `sent[k]` says what became of frame `k`. A frame the kernel refuses is
    /// passed over and the call repeated for the rest; a full device queue drops the rest of the
    /// burst (it would refuse them too, a system call each).
    pub fn send_many(&mut self, frames: &[&[libc::iovec]], sent: &mut [Sent]) {
        let n = frames.len().min(sent.len()).min(BURST);
        // SAFETY: mmsghdr is plain data; all zeroes is a valid value.
        let mut msgs: [libc::mmsghdr; BURST] = unsafe { std::mem::zeroed() };
        for (m, f) in msgs.iter_mut().zip(&frames[..n]) {
            m.msg_hdr.msg_iov = f.as_ptr() as *mut libc::iovec;
            m.msg_hdr.msg_iovlen = f.len();
        }
        let mut k = 0;
        while k < n {
            // SAFETY: every iovec points into a grant (checked guest memory the burst holds
            // mapped) or into the caller's frames; the kernel only reads them, and a fault in
            // guest memory comes back as EFAULT, not a signal.
            let r = unsafe {
                libc::sendmmsg(
                    self.file.as_raw_fd(),
                    msgs[k..n].as_mut_ptr(),
                    (n - k) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                sent[k..k + r as usize].fill(Sent::Ok);
                k += r as usize;
                continue;
            }
            let e = io::Error::last_os_error().raw_os_error();
            match e {
                // ENETDOWN: the device is down (an administrator's choice): nothing can go now.
                Some(
                    libc::EAGAIN | libc::ENOBUFS | libc::ENOMEM | libc::EINTR | libc::EIO | libc::ENETDOWN,
                )
                | None => {
                    sent[k..n].fill(Sent::Full);
                    return;
                }
                Some(e) if self.gone(e).is_some() => {
                    sent[k..n].fill(Sent::Gone);
                    return;
                }
                Some(_) => {
                    sent[k] = Sent::Refused;
                    k += 1;
                }
            }
        }
    }

    /// Whether errno `e` means the device is gone; marks the queue broken (said once).
    #[cold]
    fn gone(&mut self, e: i32) -> Option<()> {
        // The kernel answers EBADFD once the device is deleted (the file is detached from it).
        if !matches!(e, libc::EBADFD | libc::ENODEV | libc::ENXIO) {
            return None;
        }
        if !self.broken {
            tracing::warn!(device = %self.name, "TAP device is gone (deleted?): its port is down until it is re-added");
        }
        self.broken = true;
        Some(())
    }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
        *d = s as libc::c_char;
    }
    ifr
}

fn ifname_of(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr.ifr_name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// An interface ioctl through a throw-away socket of this network namespace.
pub(crate) fn if_ioctl(
    name: &str,
    req: libc::Ioctl,
    set: impl FnOnce(&mut libc::ifreq),
) -> io::Result<libc::ifreq> {
    // SAFETY: plain socket(2); closed below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: we own `s`.
    let _s = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(s) };
    let mut ifr = ifreq(name);
    set(&mut ifr);
    // SAFETY: interface ioctls read and write an ifreq.
    if unsafe { libc::ioctl(s, req, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ifr)
}

pub(crate) fn set_up(name: &str) -> io::Result<()> {
    let cur = if_ioctl(name, libc::SIOCGIFFLAGS, |_| {})?;
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = unsafe { cur.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    if_ioctl(name, libc::SIOCSIFFLAGS, |r| r.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short)
        .map(drop)
}

/// Checks a name as `IFNAMSIZ` allows, for config validation.
pub fn valid_name(name: &str) -> bool {
    CString::new(name).is_ok() && !name.is_empty() && name.len() < libc::IFNAMSIZ
}
