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
        let caps = if offloads {
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
        } else {
            Caps::default()
        };
        Ok(TapDevice { name: actual, files, caps })
    }

    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.files.len()
    }

    /// Queue `i`'s source side (frames from the kernel).
    pub fn source(&self, i: usize) -> TapQueue {
        let big = self.caps.tx_tso4 || self.caps.tx_tso6;
        // One byte more than the longest frame taken: a read that fills the buffer was cut.
        let buf_len = VNET_HDR as usize + if big { MAX_GSO_FRAME } else { MAX_FRAME } as usize + 1;
        TapQueue::new(self, i, buf_len)
    }

    /// Queue `i`'s sink side (frames to the kernel).
    pub fn sink(&self, i: usize) -> TapQueue {
        TapQueue::new(self, i, 0)
    }
}

/// One queue of a TAP device, as a polling thread uses it (under its slot's lock).
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
    fn new(dev: &TapDevice, i: usize, buf_len: usize) -> Self {
        TapQueue {
            file: dev.files[i].clone(),
            name: dev.name.as_str().into(),
            bufs: vec![0u8; buf_len * if buf_len > 0 { BURST } else { 0 }].into_boxed_slice(),
            buf_len,
            caps: dev.caps,
            broken: false,
        }
    }

    /// Whether the device has gone away.
    #[inline(always)]
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// The device file (the polling thread's epoll watches it for frames).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Reads one frame into staging buffer `i` (`i < BURST`, a source queue).
    #[inline]
    pub fn recv(&mut self, i: usize) -> Recv {
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

    /// Writes one frame, given as pieces (header first).
    #[inline]
    pub fn send(&mut self, iov: &[libc::iovec]) -> Sent {
        // SAFETY: every iovec points into a grant (checked guest memory the burst holds
        // mapped) or into the caller's stack; the kernel only reads them, and a fault in guest
        // memory comes back as EFAULT, not a signal.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n >= 0 {
            return Sent::Ok;
        }
        match io::Error::last_os_error().raw_os_error() {
            // EIO: the link is down (an administrator's choice, or the device is between two
            // network namespaces): nothing can go now, and it may come back up.
            Some(libc::EAGAIN) | Some(libc::ENOBUFS) | Some(libc::ENOMEM) | Some(libc::EINTR)
            | Some(libc::EIO) => Sent::Full,
            Some(e) => self.gone(e).map_or(Sent::Refused, |_| Sent::Gone),
            None => Sent::Refused,
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
fn if_ioctl(name: &str, req: libc::Ioctl, set: impl FnOnce(&mut libc::ifreq)) -> io::Result<libc::ifreq> {
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

fn set_up(name: &str) -> io::Result<()> {
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
