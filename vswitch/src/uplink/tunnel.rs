//! VXLAN (RFC 7348) and Geneve (RFC 8926) ports: a guest L2 network stretched to other
//! machines over the host's IP stack (UDP sockets; the kernel routes, resolves and fragments
//! the outer packets).
//!
//! ```text
//!  UDP :4789 ──recvmmsg──▶ [.. tunnel header][inner frame]  (the header's last 12 bytes become
//!                           the virtio-net header: the frame is not moved) ──▶ the switch
//!  the switch ──sendmsg──▶ [tunnel header][inner frame straight from the sender's buffers]
//!                          to the remote VTEP, from one of N source ports chosen by the
//!                          inner flow's hash (entropy for the underlay's ECMP and RSS)
//! ```
//!
//! - **One VNI per port**; its frames are the port's, so the port's VLAN rule maps the VNI to a
//!   VLAN (`vlan=N`: the VNI is VLAN N in the switch, carried untagged in the tunnel). Ports
//!   for several VNIs share a UDP port: the kernel hands each its own datagrams (`vni_group`).
//! - **Remote VTEPs**: the port's (`vxlan:IP`, and more with `remote=IP`); frames from any other
//!   address, or for another VNI, are dropped and counted. With several remotes the port learns
//!   which remote each inner source MAC is behind; unicast for a learned MAC goes to its remote,
//!   broadcast, multicast and unknown unicast to every remote (head-end replication).
//! - **Offloads**: none are carried; the switch completes checksums and cuts TSO frames into
//!   segments before they are encapsulated. The outer UDP checksum is on by default (`csum=off`:
//!   zero, as Linux's VXLAN default for IPv4; IPv6 always has one).
//! - **Checksums from a local namespace**: a veth hands a packet over with its inner checksum
//!   still to be filled in by "hardware" (the kernel's own receive trusts it; a UDP socket
//!   gets the bytes as they are): turn checksum offload off on the sender's veth
//!   (`ethtool -K DEV tx off`), as Open vSwitch's userspace tests do. Packets from a real NIC
//!   are complete.
//! - **MTU**: the underlay's MTU less 50 bytes (VXLAN over IPv4; 70 over IPv6; Geneve the same
//!   without options) is the inner MTU that crosses unfragmented; a longer inner frame is sent
//!   and the kernel fragments the outer packet (the receiver reassembles it). A datagram the
//!   kernel refuses (over 64 KiB, or over a path MTU with DF) is a counted drop (`malformed`).

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::limits::BURST;
use crate::offload::Caps;

use super::tap::{Recv, Sent, TapQueue};

/// Source ports per port: the inner flow's hash picks one.
const SOURCES: usize = 8;
/// Slots of the learned MAC → remote table (several remotes only).
const MAC_SLOTS: usize = 4096;

/// The encapsulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelKind {
    /// RFC 7348, UDP 4789.
    Vxlan,
    /// RFC 8926, UDP 6081.
    Geneve,
}

impl TunnelKind {
    /// The IANA port.
    pub fn default_port(self) -> u16 {
        match self {
            TunnelKind::Vxlan => 4789,
            TunnelKind::Geneve => 6081,
        }
    }

    /// `vxlan` or `geneve`.
    pub fn name(self) -> &'static str {
        match self {
            TunnelKind::Vxlan => "vxlan",
            TunnelKind::Geneve => "geneve",
        }
    }
}

/// Why a tunnel port could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{kind} port to {remote}: {what} failed: {source}{hint}")]
pub struct TunnelError {
    kind: &'static str,
    remote: IpAddr,
    what: String,
    source: io::Error,
    hint: &'static str,
}

/// The tunnel header for `vni`, 8 bytes.
pub fn header(kind: TunnelKind, vni: u32) -> [u8; 8] {
    let v = (vni & 0xff_ffff) << 8;
    let v = v.to_be_bytes();
    match kind {
        // Flags: I (a valid VNI); the rest reserved.
        TunnelKind::Vxlan => [0x08, 0, 0, 0, v[0], v[1], v[2], 0],
        // Version 0, no options, protocol Transparent Ethernet Bridging (0x6558).
        TunnelKind::Geneve => [0, 0, 0x65, 0x58, v[0], v[1], v[2], 0],
    }
}

/// Where the inner frame of a received datagram starts (bytes of tunnel header, 8 or more), if
/// it is a well-formed one for `vni`.
pub fn inner_at(kind: TunnelKind, vni: u32, d: &[u8]) -> Option<usize> {
    if d.len() < 8 {
        return None;
    }
    let got = u32::from_be_bytes([0, d[4], d[5], d[6]]);
    let at = match kind {
        TunnelKind::Vxlan => (d[0] & 0x08 != 0).then_some(8)?,
        TunnelKind::Geneve => {
            // Version 0 and an Ethernet payload; the options (length in 4-byte words) skipped.
            (d[0] >> 6 == 0 && d[2..4] == [0x65, 0x58]).then(|| 8 + 4 * usize::from(d[0] & 0x3f))?
        }
    };
    (got == vni && d.len() >= at + 14).then_some(at)
}

/// What a tunnel port's two sides share.
pub struct Tunnel {
    kind: TunnelKind,
    vni: u32,
    remotes: Vec<SocketAddr>,
    /// The same as the kernel takes them (made once, not per datagram).
    names: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    /// Learned inner source MAC → remote (several remotes only): MAC in the low 48 bits,
    /// remote index + 1 above.
    macs: Box<[AtomicU64]>,
}

impl Tunnel {
    fn remote_of(&self, ip: IpAddr) -> Option<usize> {
        self.remotes.iter().position(|r| r.ip() == ip)
    }

    fn slot(mac: &[u8]) -> usize {
        let m = u64::from_be_bytes([0, 0, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]]);
        (m.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 52) as usize % MAC_SLOTS
    }

    fn learn(&self, mac: &[u8], remote: usize) {
        if self.remotes.len() < 2 || mac[0] & 1 != 0 {
            return;
        }
        let m = u64::from_be_bytes([0, 0, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]]);
        self.macs[Self::slot(mac)].store(m | ((remote as u64 + 1) << 48), Ordering::Relaxed);
    }

    /// The remote a unicast frame for `mac` goes to, if the port knows it.
    fn lookup(&self, mac: &[u8]) -> Option<usize> {
        if self.remotes.len() == 1 {
            return Some(0);
        }
        if mac[0] & 1 != 0 {
            return None;
        }
        let m = u64::from_be_bytes([0, 0, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]]);
        let v = self.macs[Self::slot(mac)].load(Ordering::Relaxed);
        (v & 0xffff_ffff_ffff == m && v >> 48 != 0).then(|| (v >> 48) as usize - 1)
    }
}

/// A tunnel port: the socket it receives on and those it sends from.
pub struct TunnelDevice {
    /// `vxlan:REMOTE` as `ctl ports` shows it.
    pub label: String,
    rx: Arc<File>,
    tx: Arc<[File]>,
    shared: Arc<Tunnel>,
    /// Its place among the ports on its UDP port (left when the port goes).
    _member: super::vni_group::Member,
}

pub(crate) fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            let s = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = v.port().to_be();
            s.sin_addr.s_addr = u32::from(*v.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v) => {
            // SAFETY: as above, for a sockaddr_in6.
            let s = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = v.port().to_be();
            s.sin6_addr.s6_addr = v.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn ip_of(ss: &libc::sockaddr_storage) -> Option<IpAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET).
            let s = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(IpAddr::from(u32::from_be(s.sin_addr.s_addr).to_be_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6.
            let s = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(s.sin6_addr.s6_addr);
            // A v4 sender on a dual-stack socket.
            Some(ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4))
        }
        _ => None,
    }
}

impl TunnelDevice {
    /// Opens a `kind` port for `vni` to `remotes` (their port `dstport`), receiving on
    /// `local` (or every address), with the outer UDP checksum if `csum`.
    pub fn open(
        kind: TunnelKind,
        remotes: &[IpAddr],
        vni: u32,
        local: Option<IpAddr>,
        dstport: u16,
        csum: bool,
    ) -> Result<TunnelDevice, TunnelError> {
        let first = *remotes.first().expect("validated: one remote or more");
        let fail = |what: String, hint: &'static str| TunnelError {
            kind: kind.name(),
            remote: first,
            what,
            source: io::Error::last_os_error(),
            hint,
        };
        let v6 = first.is_ipv6();
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        let udp = || -> Result<File, TunnelError> {
            // SAFETY: plain socket(2); owned below.
            let fd = unsafe {
                libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
            };
            if fd < 0 {
                return Err(fail("socket".into(), ""));
            }
            // SAFETY: a new fd we own.
            Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
        };
        let any: IpAddr = if v6 { IpAddr::from([0u16; 8]) } else { IpAddr::from([0u8; 4]) };
        let bind = |f: &File, port: u16| -> Result<(), TunnelError> {
            let (ss, len) = sockaddr(SocketAddr::new(local.unwrap_or(any), port));
            // SAFETY: binding to a sockaddr of the given length.
            if unsafe { libc::bind(f.as_raw_fd(), (&ss as *const libc::sockaddr_storage).cast(), len) } < 0 {
                let hint = match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EADDRINUSE) => {
                        " (another program has this UDP port: give the port another dstport= or local=)"
                    }
                    Some(libc::EADDRNOTAVAIL) => " (local= must be an address of this host)",
                    _ => "",
                };
                return Err(fail(format!("binding UDP port {port}"), hint));
            }
            Ok(())
        };
        // The receive socket joins the group of this address's tunnel ports (one per VNI).
        let at = SocketAddr::new(local.unwrap_or(any), dstport);
        super::vni_group::probe(at).map_err(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::EADDRINUSE) => " (another program has this UDP port, or another switch: the kernel's own vxlan device, say; give the port another dstport= or local=)",
                Some(libc::EADDRNOTAVAIL) => " (local= must be an address of this host)",
                _ => "",
            };
            TunnelError { kind: kind.name(), remote: first, what: format!("binding UDP port {dstport}"), source: e, hint }
        })?;
        let rx = udp()?;
        super::vni_group::share(rx.as_raw_fd()).map_err(|_| fail("SO_REUSEPORT".into(), ""))?;
        bind(&rx, dstport)?;
        let member = super::vni_group::join(at, vni, rx.as_raw_fd()).map_err(|e| TunnelError {
            kind: kind.name(),
            remote: first,
            what: format!("serving VNI {vni} on UDP port {dstport}"),
            source: io::Error::new(io::ErrorKind::AddrInUse, e.0),
            hint: "",
        })?;
        let big: libc::c_int = 4 << 20;
        // SAFETY: setsockopt with an int.
        unsafe {
            libc::setsockopt(
                rx.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&big as *const libc::c_int).cast(),
                4,
            )
        };
        let mut tx = Vec::new();
        for _ in 0..SOURCES {
            let f = udp()?;
            bind(&f, 0)?;
            if !csum && !v6 {
                let on: libc::c_int = 1;
                // SAFETY: setsockopt with an int.
                unsafe {
                    libc::setsockopt(
                        f.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_NO_CHECK,
                        (&on as *const libc::c_int).cast(),
                        4,
                    )
                };
            }
            tx.push(f);
        }
        let shared = Arc::new(Tunnel {
            kind,
            vni,
            remotes: remotes.iter().map(|r| SocketAddr::new(*r, dstport)).collect(),
            names: remotes.iter().map(|r| sockaddr(SocketAddr::new(*r, dstport))).collect(),
            macs: (0..MAC_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        });
        let label = format!(
            "{}:{}",
            kind.name(),
            remotes.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("+")
        );
        Ok(TunnelDevice { label, rx: Arc::new(rx), tx: tx.into(), shared, _member: member })
    }

    /// The receiving side.
    pub fn source(&self) -> TapQueue {
        TapQueue::tunnel(self.rx.clone(), &self.label, true, Side::new(self.shared.clone(), self.tx.clone()))
    }

    /// The sending side.
    pub fn sink(&self) -> TapQueue {
        TapQueue::tunnel(self.rx.clone(), &self.label, false, Side::new(self.shared.clone(), self.tx.clone()))
    }
}

/// A tunnel queue's own state.
pub struct Side {
    t: Arc<Tunnel>,
    tx: Arc<[File]>,
    /// The senders of the last `recvmmsg`.
    names: [libc::sockaddr_storage; BURST],
    /// Where each received datagram's frame (virtio-net header first) starts and its length;
    /// None: dropped (another sender or VNI, malformed, cut).
    got: [Option<(u32, u32)>; BURST],
    count: usize,
    next: usize,
    /// Offload requests finished here.
    pub soft: super::soft::Soft,
}

impl Side {
    fn new(t: Arc<Tunnel>, tx: Arc<[File]>) -> Box<Side> {
        Box::new(Side {
            t,
            tx,
            // SAFETY: sockaddr_storage is plain data.
            names: unsafe { std::mem::zeroed() },
            got: [None; BURST],
            count: 0,
            next: 0,
            soft: Default::default(),
        })
    }
}

/// The switch's view of a tunnel: it takes TSO frames and partial checksums (and does the
/// work itself, [`send`]), and hands over only finished frames.
pub fn caps() -> Caps {
    Caps { rx_csum: true, rx_tso4: true, rx_tso6: true, rx_ecn: true, ..Caps::default() }
}

/// A tunnel's receive: a burst of datagrams per `recvmmsg` when the burst starts, each read
/// 4 bytes into its staging buffer so that an 8-byte tunnel header ends where the 12-byte
/// virtio-net header does; the header's bytes are then zeroed into that header.
pub(super) fn recv(s: &mut Side, fd: &File, bufs: &mut [u8], buf_len: usize, i: usize) -> Recv {
    const PRE: usize = 4;
    if s.next == s.count {
        if i != 0 || buf_len == 0 {
            return Recv::Empty;
        }
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BURST];
        // SAFETY: mmsghdr is plain data; all zeroes is a valid value.
        let mut msgs: [libc::mmsghdr; BURST] = unsafe { std::mem::zeroed() };
        for (k, ((v, m), name)) in iov.iter_mut().zip(msgs.iter_mut()).zip(s.names.iter_mut()).enumerate() {
            v.iov_base = bufs[k * buf_len + PRE..].as_mut_ptr().cast();
            v.iov_len = buf_len - PRE;
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_name = (name as *mut libc::sockaddr_storage).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        // SAFETY: each message's iovec is a distinct staging buffer of ours past PRE, within
        // its length, and its name a sockaddr_storage of ours.
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                BURST as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            return Recv::Empty;
        }
        for (k, m) in msgs[..n as usize].iter().enumerate() {
            let len = m.msg_len as usize;
            let buf = &mut bufs[k * buf_len..(k + 1) * buf_len];
            let whole = m.msg_hdr.msg_flags & libc::MSG_TRUNC == 0 && len < buf_len - PRE;
            // Only the port's remotes are heard.
            let from = ip_of(&s.names[k]).and_then(|ip| s.t.remote_of(ip)).filter(|_| whole);
            s.got[k] = from.and_then(|r| {
                let at = inner_at(s.t.kind, s.t.vni, &buf[PRE..PRE + len])?;
                // The 12 bytes before the inner frame become its (empty) virtio-net header.
                let start = PRE + at - 12;
                buf[start..PRE + at].fill(0);
                s.t.learn(&buf[PRE + at + 6..PRE + at + 12], r);
                Some((start as u32, (PRE + len - start) as u32))
            });
        }
        (s.count, s.next) = (n as usize, 0);
    }
    let k = s.next;
    s.next += 1;
    match s.got[k] {
        Some((start, len)) => {
            let buf = &mut bufs[k * buf_len + start as usize..];
            // SAFETY: within staging buffer `k` (ours, alive as long as the queue, whose slot
            // lock the burst holds), `len` bytes, not read into again before the next burst.
            Recv::Frame(unsafe { iommu::Grant::from_raw(buf.as_mut_ptr(), len) })
        }
        None => Recv::Truncated,
    }
}

/// A tunnel's send: the frame's virtio-net header (`iov[0]`) gives way to the tunnel header,
/// and the datagram goes to the remote the inner destination is behind, or to every remote.
/// A TSO frame is cut into segments and a partial checksum completed first (the NIC models'
/// engines, on a copy: nothing beyond the tunnel finishes them); a plain frame goes straight
/// from the sender's buffers.
pub(super) fn send(s: &mut Side, iov: &[libc::iovec]) -> Sent {
    let Side { t, tx, soft, .. } = s;
    soft.send(iov, |f| send_one(t, tx, f))
}

/// One finished frame (`frame`: its pieces) to its remote, or to every remote.
fn send_one(t: &Tunnel, tx: &[File], frame: &[libc::iovec]) -> Sent {
    let mut hdr = header(t.kind, t.vni);
    let mut v = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; virtq::chain::MAX_SEGS + 2];
    if frame.is_empty() || frame.len() >= v.len() {
        return Sent::Refused;
    }
    v[0] = libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: hdr.len() };
    v[1..=frame.len()].copy_from_slice(frame);
    // The frame's first 64 bytes (its addresses and flow), from however many pieces.
    let (mut hb, mut got) = ([0u8; 64], 0);
    for p in frame {
        let k = p.iov_len.min(hb.len() - got);
        // SAFETY: each piece is the switch's checked head, a grant the burst holds, or a
        // finished frame of ours, of `iov_len` bytes.
        hb[got..got + k].copy_from_slice(unsafe { std::slice::from_raw_parts(p.iov_base as *const u8, k) });
        got += k;
    }
    if got < 14 {
        return Sent::Refused;
    }
    let head = &hb[..got];
    // The inner flow picks the source port.
    let h =
        head.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    let sock = &tx[(h % tx.len() as u64) as usize];
    let one = t.lookup(&head[..6]);
    let mut result = Sent::Ok;
    for (r, (ss, len)) in t.names.iter().enumerate() {
        if one.is_some_and(|o| o != r) {
            continue;
        }
        // SAFETY: msghdr is plain data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (ss as *const libc::sockaddr_storage).cast_mut().cast();
        msg.msg_namelen = *len;
        msg.msg_iov = v.as_mut_ptr();
        msg.msg_iovlen = frame.len() + 1;
        // SAFETY: every iovec points at the header above or at the frame's pieces (see
        // above); the kernel only reads them.
        if unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_DONTWAIT) } < 0 {
            result = match io::Error::last_os_error().raw_os_error() {
                Some(libc::EMSGSIZE) | Some(libc::EINVAL) | Some(libc::EFAULT) => Sent::Refused,
                _ => Sent::Full,
            };
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(h: &[u8], inner_len: usize) -> Vec<u8> {
        let mut d = h.to_vec();
        d.extend(std::iter::repeat_n(0xab, inner_len));
        d
    }

    #[test]
    fn headers_are_the_rfcs_and_parse_back() {
        // RFC 7348 5: flags 0x08 (I), 24 reserved bits, the VNI, 8 reserved bits.
        assert_eq!(header(TunnelKind::Vxlan, 0x123456), [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        // RFC 8926 3.4: version 0, no options, protocol 0x6558, the VNI.
        assert_eq!(header(TunnelKind::Geneve, 42), [0, 0, 0x65, 0x58, 0, 0, 42, 0]);
        for k in [TunnelKind::Vxlan, TunnelKind::Geneve] {
            let d = datagram(&header(k, 42), 60);
            assert_eq!(inner_at(k, 42, &d), Some(8));
            assert_eq!(inner_at(k, 43, &d), None, "another VNI");
            assert_eq!(inner_at(k, 42, &d[..8 + 13]), None, "shorter than an Ethernet header");
        }
        let mut d = datagram(&header(TunnelKind::Vxlan, 42), 60);
        d[0] = 0;
        assert_eq!(inner_at(TunnelKind::Vxlan, 42, &d), None, "no I flag");
    }

    #[test]
    fn geneve_options_are_skipped_and_other_versions_or_payloads_refused() {
        let mut h = header(TunnelKind::Geneve, 7).to_vec();
        h[0] = 2; // 2 words (8 bytes) of options
        h.extend([0xff; 8]);
        let d = datagram(&h, 60);
        assert_eq!(inner_at(TunnelKind::Geneve, 7, &d), Some(16));
        let mut v1 = d.clone();
        v1[0] |= 0x40;
        assert_eq!(inner_at(TunnelKind::Geneve, 7, &v1), None, "version 1");
        let mut ip = d;
        ip[2..4].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(inner_at(TunnelKind::Geneve, 7, &ip), None, "an IP payload, not Ethernet");
    }

    #[test]
    fn several_remotes_learn_unicast_macs_and_flood_the_rest() {
        let t = Tunnel {
            kind: TunnelKind::Vxlan,
            vni: 1,
            remotes: vec!["10.0.0.1:4789".parse().unwrap(), "10.0.0.2:4789".parse().unwrap()],
            names: Vec::new(),
            macs: (0..MAC_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        };
        let (a, b, group) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [1, 0, 0x5e, 0, 0, 1]);
        assert_eq!(t.lookup(&a), None, "unknown: every remote");
        t.learn(&a, 1);
        t.learn(&b, 0);
        t.learn(&group, 0);
        assert_eq!((t.lookup(&a), t.lookup(&b), t.lookup(&group)), (Some(1), Some(0), None));
        assert_eq!(t.remote_of("10.0.0.2".parse().unwrap()), Some(1));
        assert_eq!(t.remote_of("10.0.0.3".parse().unwrap()), None);
    }
}
