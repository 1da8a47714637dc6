//! vhost-user control plane: connecting, feature negotiation, memory
//! registration and vring setup, in the order QEMU and DPDK virtio-user use.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend as VhostConn, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::config::FrontendConfig;
use super::error::{proto, Error, Result};
use super::memory::GuestMemory;
use super::ring::SplitRing;
use super::viommu::SharedCtl;
use super::watchdog::Watchdog;
use std::sync::{Arc, Mutex};

/// `VIRTIO_NET_F_MAC`.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_MRG_RXBUF`.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// `VIRTIO_NET_F_MQ`.
pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
/// `VIRTIO_F_ANY_LAYOUT` (legacy devices).
pub const VIRTIO_F_ANY_LAYOUT: u64 = 1 << 27;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// `VHOST_USER_F_PROTOCOL_FEATURES`.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_ACCESS_PLATFORM` (the device sits behind a vIOMMU).
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;

/// `VHOST_USER_GET_QUEUE_NUM`.
const REQ_GET_QUEUE_NUM: u32 = 17;
const HDR_VERSION: u32 = 0x1;
const HDR_REPLY: u32 = 0x4;

/// Outcome of the negotiation.
pub(crate) struct Negotiated {
    /// Acked virtio features (including `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub features: u64,
    /// Acked protocol features (0 without `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub protocol: VhostUserProtocolFeatures,
    /// Device MAC from the config space, when available.
    pub mac: Option<[u8; 6]>,
}

impl Negotiated {
    /// Whether `f` was acked.
    pub fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    /// virtio-net header length: 12 bytes with VERSION_1 or MRG_RXBUF, else 10.
    pub fn hdr_len(&self) -> usize {
        if self.has(VIRTIO_F_VERSION_1) || self.has(VIRTIO_NET_F_MRG_RXBUF) {
            12
        } else {
            10
        }
    }
}

/// Connects to a listening backend, retrying while the socket is missing or
/// refusing, until `timeout`.
pub(crate) fn connect(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => {
                if Instant::now() >= deadline {
                    return Err(Error::ConnectTimeout {
                        path: path.to_owned(),
                        timeout_ms: timeout.as_millis(),
                    });
                }
                thread::sleep(Duration::from_millis(10));
            }
            Err(source) => return Err(Error::Socket { path: path.to_owned(), source }),
        }
    }
}

/// Listens on `path` (replacing a stale socket file) and accepts one
/// connection within `timeout`. The listening socket and its file are
/// removed afterwards, whatever the outcome (reconnecting is not supported).
pub(crate) fn listen_accept(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let sock_err = |source| Error::Socket { path: path.to_owned(), source };
    if let Ok(md) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if md.file_type().is_socket() {
            std::fs::remove_file(path).map_err(sock_err)?;
        }
    }
    let listener = UnixListener::bind(path).map_err(sock_err)?;
    let res = accept_within(&listener, path, timeout);
    drop(listener);
    let _ = std::fs::remove_file(path);
    res
}

fn accept_within(listener: &UnixListener, path: &Path, timeout: Duration) -> Result<UnixStream> {
    let sock_err = |source| Error::Socket { path: path.to_owned(), source };
    listener.set_nonblocking(true).map_err(sock_err)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(sock_err)?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(Error::ConnectTimeout {
                        path: path.to_owned(),
                        timeout_ms: timeout.as_millis(),
                    });
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(sock_err(e)),
        }
    }
}

/// The control connection: the vhost crate's frontend endpoint, a second
/// handle on the same socket (for the request we send by hand) and the
/// watchdog that bounds every request by `timeout`.
pub(crate) struct Control {
    conn: VhostConn,
    /// The socket for hand-made requests, shared with the vIOMMU's miss server; held for
    /// every request and its reply, so the two never read each other's replies.
    raw: SharedCtl,
    wd: Watchdog,
    timeout: Duration,
}

impl Control {
    /// Takes over a connected socket.
    pub(crate) fn new(stream: UnixStream, nvrings: u64, timeout: Duration) -> Result<Control> {
        let io_err = |source| Error::RawProtocol { request: "socket setup", source };
        // Also bounds the raw request; the vhost crate retries on EAGAIN, so
        // for its requests the watchdog does the bounding.
        stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
        stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let raw = stream.try_clone().map_err(io_err)?;
        let wd = Watchdog::new(stream.try_clone().map_err(io_err)?).map_err(io_err)?;
        let raw = Arc::new(Mutex::new(raw));
        Ok(Control { conn: VhostConn::from_stream(stream, nvrings), raw, wd, timeout })
    }

    /// Runs one request under the watchdog and names it in any error.
    fn call<T>(
        &mut self,
        request: &'static str,
        f: impl FnOnce(&mut VhostConn) -> vhost::Result<T>,
    ) -> Result<T> {
        let res = {
            let _turn = self.raw.lock().unwrap_or_else(|e| e.into_inner());
            let _armed = self.wd.arm(self.timeout);
            f(&mut self.conn)
        };
        res.map_err(|source| {
            if self.wd.fired() {
                Error::ControlTimeout { request, timeout_ms: self.timeout.as_millis() }
            } else {
                proto(request)(source)
            }
        })
    }

    /// Runs SET_OWNER, feature and protocol-feature negotiation,
    /// GET_QUEUE_NUM and (optionally) GET_CONFIG.
    pub(crate) fn negotiate(&mut self, cfg: &FrontendConfig) -> Result<Negotiated> {
        self.call("SET_OWNER", |c| c.set_owner())?;
        let offered = self.call("GET_FEATURES", |c| c.get_features())?;
        tracing::debug!("backend virtio features {offered:#x}");

        let mut protocol = VhostUserProtocolFeatures::empty();
        if offered & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let pf = self.call("GET_PROTOCOL_FEATURES", |c| c.get_protocol_features())?;
            tracing::debug!("backend protocol features {:#x}", pf.bits());
            let mut want = VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG;
            if cfg.mem_slots {
                want |= VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
            }
            if cfg.iommu.is_some() {
                want |= VhostUserProtocolFeatures::BACKEND_REQ;
            }
            protocol = pf & want;
            self.call("SET_PROTOCOL_FEATURES", |c| c.set_protocol_features(protocol))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // From now on every request asks for an ack, so failures
                // surface on the request that caused them.
                self.conn.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }

        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let max = self.get_queue_num()?;
            tracing::debug!("backend GET_QUEUE_NUM = {max}");
            if max < u64::from(cfg.queue_pairs) {
                return Err(Error::Unsupported(format!(
                    "{} queue pairs (GET_QUEUE_NUM = {max})",
                    cfg.queue_pairs
                )));
            }
        } else if cfg.queue_pairs > 1 {
            return Err(Error::Unsupported(format!(
                "{} queue pairs (no MQ protocol feature)",
                cfg.queue_pairs
            )));
        }

        let mut want = VIRTIO_NET_F_MAC | VIRTIO_F_ANY_LAYOUT | VHOST_USER_F_PROTOCOL_FEATURES;
        if cfg.version_1 {
            want |= VIRTIO_F_VERSION_1;
        }
        if cfg.mrg_rxbuf {
            want |= VIRTIO_NET_F_MRG_RXBUF;
        }
        if cfg.event_idx {
            want |= VIRTIO_RING_F_EVENT_IDX;
        }
        if cfg.indirect {
            want |= VIRTIO_RING_F_INDIRECT_DESC;
        }
        if cfg.iommu.is_some() {
            if offered & VIRTIO_F_ACCESS_PLATFORM == 0
                || !protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ)
            {
                return Err(Error::Unsupported("a vIOMMU (ACCESS_PLATFORM with BACKEND_REQ)".into()));
            }
            want |= VIRTIO_F_ACCESS_PLATFORM;
        }
        if cfg.queue_pairs > 1 {
            want |= VIRTIO_NET_F_MQ;
            if offered & VIRTIO_NET_F_MQ == 0 {
                return Err(Error::Unsupported("VIRTIO_NET_F_MQ".into()));
            }
        }
        let features = offered & want;
        self.call("SET_FEATURES", |c| c.set_features(features))?;
        tracing::debug!("acked virtio features {features:#x}");

        let mut neg = Negotiated { features, protocol, mac: None };
        if protocol.contains(VhostUserProtocolFeatures::CONFIG) && neg.has(VIRTIO_NET_F_MAC) {
            let res =
                self.call("GET_CONFIG", |c| c.get_config(0, 6, VhostUserConfigFlags::empty(), &[0u8; 6]));
            match res {
                Ok((_, payload)) if payload.len() == 6 => {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(&payload);
                    neg.mac = Some(mac);
                }
                Ok(_) => tracing::warn!("GET_CONFIG returned a short payload"),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        Ok(neg)
    }

    /// Sends `VHOST_USER_GET_QUEUE_NUM` directly on the socket.
    ///
    /// Not through the vhost crate: it takes the answer as a vring count and
    /// then refuses higher vring indices, but DPDK answers in queue pairs
    /// (and 22.11 answers 128 whatever the port's `queues=`).
    fn get_queue_num(&mut self) -> Result<u64> {
        let _armed = self.wd.arm(self.timeout);
        let err = |source| Error::RawProtocol { request: "GET_QUEUE_NUM", source };
        let mut req = [0u8; 12];
        req[0..4].copy_from_slice(&REQ_GET_QUEUE_NUM.to_le_bytes());
        req[4..8].copy_from_slice(&HDR_VERSION.to_le_bytes());
        let mut raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        raw.write_all(&req).map_err(err)?;
        let mut reply = [0u8; 20];
        raw.read_exact(&mut reply).map_err(err)?;
        let word = |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
        if word(0) != REQ_GET_QUEUE_NUM || word(4) & HDR_REPLY == 0 || word(8) != 8 {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "unexpected reply header (request {}, flags {:#x}, size {})",
                    word(0),
                    word(4),
                    word(8)
                ),
            )));
        }
        let mut v = [0u8; 8];
        v.copy_from_slice(&reply[12..20]);
        Ok(u64::from_le_bytes(v))
    }

    /// Opens the backend channel (SET_BACKEND_REQ_FD) and returns our end.
    pub(crate) fn backend_channel(&mut self) -> Result<UnixStream> {
        let (ours, theirs) =
            UnixStream::pair().map_err(|source| Error::RawProtocol { request: "socketpair", source })?;
        self.call("SET_BACKEND_REQ_FD", |c| c.set_backend_request_fd(&theirs))?;
        Ok(ours)
    }

    /// The shared control socket.
    pub(crate) fn shared(&self) -> SharedCtl {
        self.raw.clone()
    }

    /// Registers the guest memory region: `ADD_MEM_REG` when
    /// `CONFIGURE_MEM_SLOTS` was negotiated, `SET_MEM_TABLE` otherwise.
    pub(crate) fn register_memory(&mut self, neg: &Negotiated, mem: &GuestMemory) -> Result<()> {
        let region = mem.region_info();
        if neg.protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            let slots = self.call("GET_MAX_MEM_SLOTS", |c| c.get_max_mem_slots())?;
            if slots == 0 {
                return Err(Error::Unsupported("any memory slot (GET_MAX_MEM_SLOTS = 0)".into()));
            }
            self.call("ADD_MEM_REG", |c| c.add_mem_region(&region))?;
        } else {
            self.call("SET_MEM_TABLE", |c| c.set_mem_table(&[region]))?;
        }
        Ok(())
    }

    /// SET_VRING_NUM, SET_VRING_BASE 0, SET_VRING_ADDR, SET_VRING_KICK and
    /// SET_VRING_CALL for vring `index`.
    pub(crate) fn setup_vring(&mut self, index: usize, ring: &SplitRing, addrs: &VringAddrs) -> Result<()> {
        let size = ring.size();
        self.call("SET_VRING_NUM", |c| c.set_vring_num(index, size))?;
        self.call("SET_VRING_BASE", |c| c.set_vring_base(index, 0))?;
        let cfg = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: addrs.desc,
            used_ring_addr: addrs.used,
            avail_ring_addr: addrs.avail,
            log_addr: None,
        };
        self.call("SET_VRING_ADDR", |c| c.set_vring_addr(index, &cfg))?;
        self.call("SET_VRING_KICK", |c| c.set_vring_kick(index, ring.kick_fd()))?;
        self.call("SET_VRING_CALL", |c| c.set_vring_call(index, ring.call_fd()))?;
        Ok(())
    }

    /// SET_VRING_KICK, SET_VRING_CALL or SET_VRING_ERR for vring `index` with any file (hostile
    /// tests: nothing here checks that it is an eventfd).
    pub(crate) fn set_vring_file(&mut self, index: usize, which: VringFile, fd: RawFd) -> Result<()> {
        // SAFETY: the vhost crate only reads the number to attach it to the message; the
        // ManuallyDrop keeps the caller's fd from being closed here.
        let efd = std::mem::ManuallyDrop::new(unsafe { EventFd::from_raw_fd(fd) });
        match which {
            VringFile::Kick => self.call("SET_VRING_KICK", |c| c.set_vring_kick(index, &efd)),
            VringFile::Call => self.call("SET_VRING_CALL", |c| c.set_vring_call(index, &efd)),
            VringFile::Err => self.call("SET_VRING_ERR", |c| c.set_vring_err(index, &efd)),
        }
    }

    /// SET_VRING_ENABLE 1 for vrings `0..n` (only meaningful, and only sent,
    /// with `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub(crate) fn enable_vrings(&mut self, neg: &Negotiated, n: usize) -> Result<()> {
        if !neg.has(VHOST_USER_F_PROTOCOL_FEATURES) {
            return Ok(());
        }
        for i in 0..n {
            self.call("SET_VRING_ENABLE", |c| c.set_vring_enable(i, true))?;
        }
        Ok(())
    }

    /// GET_VRING_BASE for vrings `0..n`; the backend stops each ring.
    pub(crate) fn stop_vrings(&mut self, n: usize) -> Result<Vec<u32>> {
        (0..n).map(|i| self.call("GET_VRING_BASE", |c| c.get_vring_base(i))).collect()
    }
}

/// Which file of a vring [`Control::set_vring_file`] replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VringFile {
    /// The guest's notifications to the backend.
    Kick,
    /// The backend's interrupts to the guest.
    Call,
    /// The backend's error notifications.
    Err,
}

/// Addresses of one vring as sent in `SET_VRING_ADDR` (our virtual addresses).
pub(crate) struct VringAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// Names of the virtio feature bits this frontend knows, joined with `|`
/// (for logs and test messages).
pub fn feature_names(features: u64) -> String {
    let names = [
        (VIRTIO_NET_F_MAC, "MAC"),
        (VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"),
        (VIRTIO_NET_F_MQ, "MQ"),
        (VIRTIO_F_ANY_LAYOUT, "ANY_LAYOUT"),
        (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
        (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
        (VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
        (VIRTIO_F_VERSION_1, "VERSION_1"),
    ];
    names.iter().filter(|(b, _)| features & b != 0).map(|(_, n)| *n).collect::<Vec<_>>().join("|")
}
