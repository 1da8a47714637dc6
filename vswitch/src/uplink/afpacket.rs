//! AF_PACKET uplink: the switch on an existing Linux network device (a NIC, a VF, a veth) through
//! packet sockets, the fallback where AF_XDP is not available.
//!
//! ```text
//!  device ──recvmmsg (a burst per call)──▶ staging buffers ──(late copy)──▶ guest buffers
//!  device ◀──sendmmsg (a burst per call)── [vnet header][checked head][rest straight from the
//!                                            guest's buffers], per frame
//! ```
//!
//! Each queue is one `SOCK_RAW` socket bound to the device, with
//! - `PACKET_VNET_HDR` and `PACKET_VNET_HDR_SZ` = 12: the same virtio-net header a TAP port and
//!   the guests use, so TSO frames and partial checksums cross whole both ways (`offloads=on`;
//!   with `offloads=off` a device that coalesces received frames (GRO) hands over frames the
//!   switch then drops as malformed, counted: turn GRO off on it, `ethtool -K DEV gro off`);
//! - `PACKET_QDISC_BYPASS`: what the switch sends goes to the driver directly (the switch is
//!   the queueing discipline; a full driver queue is a counted drop);
//! - `PACKET_IGNORE_OUTGOING`: the socket does not see the switch's own transmits again;
//! - `PACKET_AUXDATA`: the kernel takes a received frame's VLAN tag off (as a NIC's VLAN
//!   offload does) and gives it beside the frame; the queue puts it back after the addresses;
//! - promiscuous membership: the device takes frames for the guests' MACs;
//! - with `queues=N`, `PACKET_FANOUT` by flow hash (with defragmentation) across the N sockets,
//!   one per queue, each polled like a TAP queue.
//!
//! Batching: `recvmmsg` takes up to a burst of frames in one system call, where TAP needs one
//! `read` per frame, and `sendmmsg` sends a burst's frames in one (measured against a `writev`
//! per frame: +25-28 % Mpps guests to the wire, benches/results/2026-12-06-afpacket-sendmmsg-ab.txt).
//! The mmap'ed rings were not chosen: the TPACKET_V3 receive ring holds frames in blocks the
//! kernel fills on its own timer (at low rates up to the block time-out in latency, and the late
//! copy would have to finish a whole block before handing it back); a TPACKET_V2 transmit ring
//! measured within the noise of `sendmmsg` (benches/results/2026-12-06-afpacket-txring-ab.txt),
//! needs the switch's CPU to copy each frame into it, and loses the drops of a full device
//! queue (the kernel frees such a frame and tells the switch nothing).
//!
//! The queues are [`TapQueue`]s over the sockets: the datapath does not know the difference.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use super::tap::{if_ioctl, kernel_caps, set_up, TapQueue, VNET_HDR};
use crate::offload::Caps;

/// `PACKET_FANOUT_FLAG_DEFRAG`: fragments are reassembled before hashing (all of a datagram
/// to one socket).
const FANOUT_FLAG_DEFRAG: u32 = 0x8000;

/// Why an AF_PACKET port could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// no such device
    #[error("no network device '{0}' in the switch's network namespace (see `ip link`)")]
    NoDevice(String),
    /// a socket call failed
    #[error("AF_PACKET on '{dev}': {what} failed: {source}{hint}")]
    Sock {
        /// The device.
        dev: String,
        /// The call.
        what: &'static str,
        /// Cause.
        source: io::Error,
        /// What to check.
        hint: &'static str,
    },
}

/// A device the switch reaches through packet sockets, one per queue.
pub struct PacketDevice {
    /// Interface name.
    pub name: String,
    files: Vec<Arc<File>>,
    caps: Caps,
}

fn sock_fail(dev: &str, what: &'static str) -> PacketError {
    let source = io::Error::last_os_error();
    let hint = match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (packet sockets need CAP_NET_RAW; promiscuous mode and MTU changes CAP_NET_ADMIN)"
        }
        Some(libc::ENOPROTOOPT) => " (this kernel lacks the option: PACKET_VNET_HDR_SZ needs Linux 6.2)",
        Some(libc::EINVAL) if what == "PACKET_FANOUT" => {
            " (another program's fanout group has this id; remove it or use queues=1)"
        }
        _ => "",
    };
    PacketError::Sock { dev: dev.to_string(), what, source, hint }
}

fn setsockopt<T>(fd: i32, level: i32, opt: i32, val: &T) -> io::Result<()> {
    // SAFETY: `val` points at a live T of the given size, which the kernel only reads.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (val as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl PacketDevice {
    /// Opens `queues` packet sockets on the existing device `name`: offloads negotiated if
    /// `offloads`, the device's MTU set if given, its link brought up.
    pub fn open(name: &str, queues: u16, offloads: bool, mtu: Option<u32>) -> Result<Self, PacketError> {
        let cname = std::ffi::CString::new(name).map_err(|_| PacketError::NoDevice(name.into()))?;
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(PacketError::NoDevice(name.into()));
        }
        let fail = |what| sock_fail(name, what);
        if let Some(m) = mtu {
            if_ioctl(name, libc::SIOCSIFMTU, |r| r.ifr_ifru.ifru_mtu = m as libc::c_int)
                .map_err(|_| fail("setting the MTU"))?;
        }
        set_up(name).map_err(|_| fail("bringing the link up"))?;
        // A fanout group id of this device and process.
        let group = (std::process::id() ^ ifindex.rotate_left(8)) & 0xffff;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let mut files = Vec::new();
        for _ in 0..queues.max(1) {
            // SAFETY: plain socket(2); owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    proto.into(),
                )
            };
            if fd < 0 {
                return Err(fail("socket(AF_PACKET)"));
            }
            // SAFETY: a new fd we own.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            let on: libc::c_int = 1;
            // The header frames every packet as on a TAP, offloads or not (`offloads=off` only
            // says the switch neither asks for nor takes them).
            setsockopt(fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &on)
                .map_err(|_| fail("PACKET_VNET_HDR"))?;
            let sz = VNET_HDR as libc::c_int;
            setsockopt(fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR_SZ, &sz)
                .map_err(|_| fail("PACKET_VNET_HDR_SZ"))?;
            setsockopt(fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, &on)
                .map_err(|_| fail("PACKET_QDISC_BYPASS"))?;
            setsockopt(fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &on)
                .map_err(|_| fail("PACKET_IGNORE_OUTGOING"))?;
            // A received frame's VLAN tag is taken off by the kernel (as a NIC's VLAN offload
            // does) and comes beside it: the queue puts it back.
            setsockopt(fd, libc::SOL_PACKET, libc::PACKET_AUXDATA, &on)
                .map_err(|_| fail("PACKET_AUXDATA"))?;
            // Room for bursts while the polling thread sleeps (capped by net.core.rmem_max).
            let buf: libc::c_int = 4 << 20;
            let _ = setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &buf);
            // SAFETY: sockaddr_ll is plain data.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: binding to a sockaddr_ll of the right size.
            let r = unsafe {
                libc::bind(
                    fd,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(fail("bind"));
            }
            let mr = libc::packet_mreq {
                mr_ifindex: ifindex as i32,
                mr_type: libc::PACKET_MR_PROMISC as u16,
                mr_alen: 0,
                mr_address: [0; 8],
            };
            setsockopt(fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &mr)
                .map_err(|_| fail("promiscuous mode"))?;
            if queues > 1 {
                let v: u32 = group | ((libc::PACKET_FANOUT_HASH | FANOUT_FLAG_DEFRAG) << 16);
                setsockopt(fd, libc::SOL_PACKET, libc::PACKET_FANOUT, &v)
                    .map_err(|_| fail("PACKET_FANOUT"))?;
            }
            files.push(Arc::new(File::from(sock)));
        }
        let caps = if offloads { kernel_caps() } else { Caps::default() };
        Ok(PacketDevice { name: name.to_string(), files, caps })
    }

    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.files.len()
    }

    /// Queue `i`'s source side (frames from the device), read a burst per `recvmmsg`.
    pub fn source(&self, i: usize) -> TapQueue {
        TapQueue::over(self.files[i].clone(), &self.name, self.caps, true)
    }

    /// Queue `i`'s sink side (frames to the device).
    pub fn sink(&self, i: usize) -> TapQueue {
        TapQueue::over(self.files[i].clone(), &self.name, self.caps, false)
    }
}
