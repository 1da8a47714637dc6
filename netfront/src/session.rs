//! The vhost-user frontend session: every message a frontend sends, once, in the order QEMU
//! and DPDK virtio-user send them.
//!
//! ```text
//! Endpoint::open ─▶ Session::new: SET_OWNER, GET_FEATURES, [GET/SET_PROTOCOL_FEATURES]
//!                 ─▶ [queue_num] ─▶ set_features ─▶ [get_config, backend_channel]
//!                 ─▶ set_memory: SET_MEM_TABLE, or GET_MAX_MEM_SLOTS + ADD_MEM_REG each
//!                 ─▶ setup_vring each: NUM, BASE, ADDR, KICK, CALL ─▶ enable_vrings
//!                 ─▶ ... stop_vring (GET_VRING_BASE)
//! ```
//!
//! Users: the polling [`Frontend`](crate::Frontend), which owns its memory and rings, and
//! hostvm, whose guest's driver chooses ring addresses and whose eventfds are KVM
//! ioeventfds and irqfds. Reconnecting is opening the [`Endpoint`](crate::Endpoint) again
//! and replaying the same steps on a new session; a [`PeerWatch`] tells when to.
//!
//! Every request is bounded by the control timeout: the vhost crate retries on `EAGAIN`, so
//! a watchdog thread shuts the socket down when a request overstays, and the request (and
//! every later one) fails with [`Error::ControlTimeout`].

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend as VhostConn, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{proto, Error, Result};
use crate::features::VHOST_USER_F_PROTOCOL_FEATURES;
use crate::viommu::SharedCtl;
use crate::watchdog::Watchdog;

/// `VHOST_USER_GET_QUEUE_NUM`.
const REQ_GET_QUEUE_NUM: u32 = 17;
const HDR_VERSION: u32 = 0x1;
const HDR_REPLY: u32 = 0x4;

/// One vring as `setup_vring` hands it to the backend.
#[derive(Clone, Copy, Debug)]
pub struct VringSetup<'a> {
    /// Number of descriptors.
    pub size: u16,
    /// Where the backend starts in the available ring (0 on a fresh ring; after a
    /// reconnect, the used index, so what the old backend took but never returned is
    /// offered again).
    pub base: u16,
    /// Descriptor table, in the frontend's virtual addresses (or IOVAs behind a vIOMMU).
    pub desc: u64,
    /// Available ring, likewise.
    pub avail: u64,
    /// Used ring, likewise.
    pub used: u64,
    /// The frontend's notifications to the backend.
    pub kick: &'a EventFd,
    /// The backend's interrupts to the frontend.
    pub call: &'a EventFd,
}

/// Which file of a vring [`Session::set_vring_file`] replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VringFile {
    /// The guest's notifications to the backend.
    Kick,
    /// The backend's interrupts to the guest.
    Call,
    /// The backend's error notifications.
    Err,
}

/// A connected, handshaken vhost-user control connection.
pub struct Session {
    conn: VhostConn,
    /// The socket for hand-made requests, shared with the vIOMMU's miss server; held for
    /// every request and its reply, so the two never read each other's replies.
    raw: SharedCtl,
    wd: Watchdog,
    timeout: Duration,
    offered: u64,
    protocol: VhostUserProtocolFeatures,
    features: u64,
}

impl Session {
    /// Takes over a connected socket for a device of up to `max_vrings` vrings and runs the
    /// handshake: SET_OWNER, GET_FEATURES and, when the backend offers
    /// `VHOST_USER_F_PROTOCOL_FEATURES`, GET_PROTOCOL_FEATURES and SET_PROTOCOL_FEATURES
    /// acking what it offers of `want`. With `REPLY_ACK` acked every later request asks for
    /// an ack, so a failure surfaces on the request that caused it. Each request must finish
    /// within `control_timeout`.
    pub fn new(
        stream: UnixStream,
        max_vrings: u64,
        control_timeout: Duration,
        want: VhostUserProtocolFeatures,
    ) -> Result<Session> {
        let io_err = |source| Error::RawProtocol { request: "socket setup", source };
        // Also bounds the raw requests; for the vhost crate's the watchdog does the bounding.
        stream.set_read_timeout(Some(control_timeout)).map_err(io_err)?;
        stream.set_write_timeout(Some(control_timeout)).map_err(io_err)?;
        let raw = Arc::new(Mutex::new(stream.try_clone().map_err(io_err)?));
        let wd = Watchdog::new(stream.try_clone().map_err(io_err)?).map_err(io_err)?;
        let mut s = Session {
            conn: VhostConn::from_stream(stream, max_vrings),
            raw,
            wd,
            timeout: control_timeout,
            offered: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            features: 0,
        };
        s.handshake(want)?;
        Ok(s)
    }

    fn handshake(&mut self, want: VhostUserProtocolFeatures) -> Result<()> {
        self.call("SET_OWNER", |c| c.set_owner())?;
        self.offered = self.call("GET_FEATURES", |c| c.get_features())?;
        tracing::debug!("backend virtio features {:#x}", self.offered);
        if self.offered & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Ok(());
        }
        let pf = self.call("GET_PROTOCOL_FEATURES", |c| c.get_protocol_features())?;
        tracing::debug!("backend protocol features {:#x}", pf.bits());
        let protocol = pf & want;
        self.call("SET_PROTOCOL_FEATURES", |c| c.set_protocol_features(protocol))?;
        self.protocol = protocol;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.conn.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        Ok(())
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

    /// Virtio features the backend offers (GET_FEATURES).
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Protocol features acked (empty without `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol
    }

    /// Virtio features acked with [`set_features`](Self::set_features) (0 before).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Sends `VHOST_USER_GET_QUEUE_NUM` directly on the socket.
    ///
    /// Not through the vhost crate: it takes the answer as a vring count and then refuses
    /// higher vring indices, but DPDK answers in queue pairs (and 22.11 answers 128 whatever
    /// the port's `queues=`).
    pub fn queue_num(&mut self) -> Result<u64> {
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

    /// SET_FEATURES. `VHOST_USER_F_PROTOCOL_FEATURES` is added when the backend offered it
    /// (the vhost-user spec: it stays set once negotiated, and it is what makes rings start
    /// disabled until [`enable_vrings`](Self::enable_vrings)).
    pub fn set_features(&mut self, features: u64) -> Result<()> {
        let features = features | (self.offered & VHOST_USER_F_PROTOCOL_FEATURES);
        self.call("SET_FEATURES", |c| c.set_features(features))?;
        tracing::debug!("acked virtio features {features:#x}");
        self.features = features;
        Ok(())
    }

    /// SET_LOG_BASE with a dirty log's memfd (`LOG_SHMFD`): the backend maps `size` bytes of
    /// it from offset 0 and answers with the same message.
    pub fn set_log_base(&mut self, fd: RawFd, size: u64) -> Result<()> {
        if !self.protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD) {
            return Err(Error::Unsupported("the backend did not offer LOG_SHMFD (no dirty log)".into()));
        }
        let region = vhost::VhostUserDirtyLogRegion { mmap_size: size, mmap_offset: 0, mmap_handle: fd };
        self.call("SET_LOG_BASE", |c| c.set_log_base(0, Some(region)))
    }

    /// SET_VRING_ADDR for a running vring, as QEMU sends it when dirty logging starts
    /// (`log`: the used ring's guest-physical address, with `VHOST_VRING_F_LOG`) or stops.
    pub fn set_vring_addr(&mut self, index: usize, v: &VringSetup<'_>, log: Option<u64>) -> Result<()> {
        let cfg = VringConfigData {
            queue_max_size: v.size,
            queue_size: v.size,
            flags: if log.is_some() { 1 } else { 0 },
            desc_table_addr: v.desc,
            used_ring_addr: v.used,
            avail_ring_addr: v.avail,
            log_addr: log,
        };
        self.call("SET_VRING_ADDR", |c| c.set_vring_addr(index, &cfg))
    }

    /// SEND_RARP (sent directly on the socket: the vhost crate has no request for it): asks the
    /// backend to announce `mac` from this device, as QEMU does on a migration's destination.
    pub fn send_rarp(&mut self, mac: [u8; 6]) -> Result<()> {
        const REQ_SEND_RARP: u32 = 19;
        let _armed = self.wd.arm(self.timeout);
        let err = |source| Error::RawProtocol { request: "SEND_RARP", source };
        let ack = self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        let mut req = [0u8; 20];
        req[0..4].copy_from_slice(&REQ_SEND_RARP.to_le_bytes());
        req[4..8].copy_from_slice(&(HDR_VERSION | if ack { 0x8 } else { 0 }).to_le_bytes());
        req[8..12].copy_from_slice(&8u32.to_le_bytes());
        req[12..18].copy_from_slice(&mac);
        let mut raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        raw.write_all(&req).map_err(err)?;
        if !ack {
            return Ok(());
        }
        let mut reply = [0u8; 20];
        raw.read_exact(&mut reply).map_err(err)?;
        match u64::from_le_bytes(reply[12..20].try_into().unwrap_or_default()) {
            0 => Ok(()),
            s => Err(err(io::Error::other(format!("the backend refused SEND_RARP (status {s})")))),
        }
    }

    /// GET_CONFIG of `len` bytes at `offset` of the device's config space.
    pub fn get_config(&mut self, offset: u32, len: usize) -> Result<Vec<u8>> {
        let buf = vec![0u8; len];
        let flags = VhostUserConfigFlags::empty();
        let len32 = len as u32;
        let (_, payload) = self.call("GET_CONFIG", |c| c.get_config(offset, len32, flags, &buf))?;
        Ok(payload)
    }

    /// Opens the backend channel (SET_BACKEND_REQ_FD) and returns our end.
    pub fn backend_channel(&mut self) -> Result<UnixStream> {
        let (ours, theirs) =
            UnixStream::pair().map_err(|source| Error::RawProtocol { request: "socketpair", source })?;
        self.call("SET_BACKEND_REQ_FD", |c| c.set_backend_request_fd(&theirs))?;
        Ok(ours)
    }

    /// The shared control socket (the vIOMMU sends IOTLB messages on it).
    pub(crate) fn shared(&self) -> SharedCtl {
        self.raw.clone()
    }

    /// Registers guest memory: one `ADD_MEM_REG` per region when `CONFIGURE_MEM_SLOTS` was
    /// acked (after checking GET_MAX_MEM_SLOTS), one `SET_MEM_TABLE` otherwise. The regions'
    /// file descriptors stay the caller's.
    pub fn set_memory(&mut self, regions: &[VhostUserMemoryRegionInfo]) -> Result<()> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
            // The reply (region bases, for postcopy) is not asked for: no postcopy here.
            return self.call("SET_MEM_TABLE", |c| c.set_mem_table(regions)).map(drop);
        }
        let slots = self.call("GET_MAX_MEM_SLOTS", |c| c.get_max_mem_slots())?;
        if slots < regions.len() as u64 {
            return Err(Error::TooFewMemSlots { slots, regions: regions.len() });
        }
        for region in regions {
            self.call("ADD_MEM_REG", |c| c.add_mem_region(region))?;
        }
        Ok(())
    }

    /// SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK and SET_VRING_CALL for
    /// vring `index`.
    pub fn setup_vring(&mut self, index: usize, v: &VringSetup<'_>) -> Result<()> {
        self.call("SET_VRING_NUM", |c| c.set_vring_num(index, v.size))?;
        self.call("SET_VRING_BASE", |c| c.set_vring_base(index, v.base))?;
        let cfg = VringConfigData {
            queue_max_size: v.size,
            queue_size: v.size,
            flags: 0,
            desc_table_addr: v.desc,
            used_ring_addr: v.used,
            avail_ring_addr: v.avail,
            log_addr: None,
        };
        self.call("SET_VRING_ADDR", |c| c.set_vring_addr(index, &cfg))?;
        self.call("SET_VRING_KICK", |c| c.set_vring_kick(index, v.kick))?;
        self.call("SET_VRING_CALL", |c| c.set_vring_call(index, v.call))
    }

    /// SET_VRING_ENABLE 1 for vrings `0..n` (only meaningful, and only sent, with
    /// `VHOST_USER_F_PROTOCOL_FEATURES` acked).
    pub fn enable_vrings(&mut self, n: usize) -> Result<()> {
        if self.features & VHOST_USER_F_PROTOCOL_FEATURES == 0 {
            return Ok(());
        }
        (0..n).try_for_each(|i| self.call("SET_VRING_ENABLE", |c| c.set_vring_enable(i, true)))
    }

    /// GET_VRING_BASE for vring `index`: the backend stops the ring and says where it was.
    pub fn stop_vring(&mut self, index: usize) -> Result<u32> {
        self.call("GET_VRING_BASE", |c| c.get_vring_base(index))
    }

    /// [`stop_vring`](Self::stop_vring) for vrings `0..n`.
    pub fn stop_vrings(&mut self, n: usize) -> Result<Vec<u32>> {
        (0..n).map(|i| self.stop_vring(i)).collect()
    }

    /// SET_VRING_KICK, SET_VRING_CALL or SET_VRING_ERR for vring `index` with any file
    /// (hostile tests: nothing here checks that it is an eventfd).
    pub fn set_vring_file(&mut self, index: usize, which: VringFile, fd: RawFd) -> Result<()> {
        // SAFETY: the vhost crate only reads the number to attach it to the message; the
        // ManuallyDrop keeps the caller's fd from being closed here.
        let efd = std::mem::ManuallyDrop::new(unsafe { EventFd::from_raw_fd(fd) });
        match which {
            VringFile::Kick => self.call("SET_VRING_KICK", |c| c.set_vring_kick(index, &efd)),
            VringFile::Call => self.call("SET_VRING_CALL", |c| c.set_vring_call(index, &efd)),
            VringFile::Err => self.call("SET_VRING_ERR", |c| c.set_vring_err(index, &efd)),
        }
    }

    /// A handle that tells when the backend hangs up (or a request timed out and the
    /// session shut its socket down), without reading: replies belong to requests.
    pub fn watch(&self) -> Result<PeerWatch> {
        let raw = self.raw.lock().unwrap_or_else(|e| e.into_inner());
        let sock = raw.try_clone().map_err(|source| Error::RawProtocol { request: "socket dup", source })?;
        Ok(PeerWatch(sock))
    }
}

/// Watches a session's socket for the backend going away; see [`Session::watch`].
#[derive(Debug)]
pub struct PeerWatch(UnixStream);

impl PeerWatch {
    /// Waits up to `timeout` for a hang-up; true once the connection is gone for good.
    pub fn hung_up(&self, timeout: Duration) -> bool {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut pfd = libc::pollfd { fd: self.0.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call, on a socket we own.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }
}
