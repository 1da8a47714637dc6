//! The guest side of a virtio-net device over vhost-user, written once.
//!
//! [`Frontend`] plays the role of QEMU or DPDK's virtio-user: it owns a
//! memfd-backed "guest memory" region, lays out split virtqueues and packet
//! buffers in it, negotiates with a vhost-user backend over a Unix socket
//! (client or server mode) and then moves Ethernet frames through the rings.
//!
//! * Queue pair `k` uses vring `2k` for RX and `2k + 1` for TX.
//! * The fast path ([`Frontend::enqueue_tx`], [`Frontend::flush_tx`],
//!   [`Frontend::poll_rx`]) does not allocate; publishing is batched (one
//!   Release store of `avail.idx` per flush/poll) and kicks honour
//!   `VRING_USED_F_NO_NOTIFY` or `avail_event` (EVENT_IDX).
//! * Every blocking operation is bounded: each control request by
//!   [`FrontendConfig::control_timeout`] (enforced by a watchdog thread that
//!   shuts the socket down, since the vhost crate retries on `EAGAIN`),
//!   connects and receives by the caller's timeout.
//! * Backend misbehaviour seen in the used rings (unknown ids, bad lengths)
//!   is counted in [`QueueStats`] rather than trusted.
//!
//! ```no_run
//! use std::{path::Path, time::Duration};
//! use netfront::{Frontend, FrontendConfig};
//!
//! let t = Duration::from_secs(5);
//! let mut a = Frontend::connect(Path::new("/tmp/a.sock"), FrontendConfig::default(), t)?;
//! let mut b = Frontend::connect(Path::new("/tmp/b.sock"), FrontendConfig::default(), t)?;
//! let mut frame = [0u8; 60];
//! frame[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]); // destination
//! frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]); // source
//! assert!(a.send(0, &frame));
//! let got = b.recv_frames(0, 1, t);
//! assert_eq!(got[0], frame);
//! # Ok::<(), netfront::Error>(())
//! ```
#![deny(missing_docs)]

mod config;
mod endpoint;
mod error;
#[cfg(test)]
mod fake_device;
mod features;
mod memory;
pub mod migration;
mod negotiate;
mod ring;
mod rx;
pub mod session;
mod tx;
mod viommu;
mod watchdog;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::slice;
use std::sync::atomic::AtomicBool;
use std::thread;
use std::time::{Duration, Instant};

pub use config::FrontendConfig;
pub use endpoint::Endpoint;
pub use error::{Error, Result};
pub use features::*;
pub use ring::{
    VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VRING_AVAIL_F_NO_INTERRUPT,
    VRING_USED_F_NO_NOTIFY,
};
pub use session::{PeerWatch, Session, VringFile, VringSetup};
pub use viommu::{IommuConfig, IotlbMsg, ACCESS_RO, ACCESS_RW, ACCESS_WO, IOTLB_INVALIDATE, IOTLB_UPDATE};

use memory::{GuestMemory, Layout};
use negotiate::Negotiated;
use ring::{RingPtrs, SplitRing};
use rx::RxQueue;
use tx::{TxLayout, TxQueue};

/// Longest single wait in [`Frontend::recv_frames`] before re-polling the
/// ring, so backends that never signal the call eventfd still work.
const RX_POLL_FALLBACK: Duration = Duration::from_millis(5);

/// Where a [`RawDesc`]'s `next` field points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawNext {
    /// Index into the slice passed to [`Frontend::push_raw_tx_chain`]; written
    /// as `head + i` (wrapping `u16`, not reduced modulo the ring size, so a
    /// large `i` yields an out-of-range index).
    Slot(u16),
    /// Written verbatim into the descriptor table.
    Absolute(u16),
}

/// One descriptor of a hand-crafted TX chain, written verbatim (apart from
/// `next`, see [`RawNext`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest-physical buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `VIRTQ_DESC_F_*` flags.
    pub flags: u16,
    /// Next descriptor (meaningful with `VIRTQ_DESC_F_NEXT`).
    pub next: RawNext,
}

impl RawDesc {
    /// A descriptor that ends its chain.
    pub fn last(addr: u64, len: u32) -> RawDesc {
        RawDesc { addr, len, flags: 0, next: RawNext::Slot(0) }
    }

    /// A descriptor continued by slot `next` of the same chain.
    pub fn chained(addr: u64, len: u32, next: u16) -> RawDesc {
        RawDesc { addr, len, flags: VIRTQ_DESC_F_NEXT, next: RawNext::Slot(next) }
    }
}

/// Counters of one queue pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Chains placed on the TX ring (frames and raw chains).
    pub tx_enqueued: u64,
    /// TX chains the backend returned (including not yet reclaimed ones).
    pub tx_completed: u64,
    /// TX notifications sent to the backend.
    pub tx_kicks: u64,
    /// TX used entries that did not name an in-flight chain.
    pub tx_errors: u64,
    /// Frames received.
    pub rx_frames: u64,
    /// Frame bytes received (virtio-net headers excluded).
    pub rx_bytes: u64,
    /// Frames that arrived in more than one buffer (MRG_RXBUF).
    pub rx_merged: u64,
    /// RX notifications (buffer refills) sent to the backend.
    pub rx_kicks: u64,
    /// Times [`Frontend::recv_frames`] was woken by the backend signalling
    /// the RX call eventfd (rather than by its polling fallback).
    pub rx_calls: u64,
    /// Malformed RX used entries (unknown id, bad length, bad num_buffers).
    pub rx_errors: u64,
}

struct QueuePair {
    rx: RxQueue,
    tx: TxQueue,
}

/// A virtio-net device driven from this process over vhost-user.
///
/// Queue indices `q` in the methods are queue-pair indices
/// (`0..queue_pairs`); passing a larger one panics.
pub struct Frontend {
    // Declared before `mem`: rings point into it and are dropped first.
    pairs: Vec<QueuePair>,
    ctl: Session,
    neg: Negotiated,
    hdr_len: usize,
    ring_size: u16,
    scratch: (usize, usize),
    /// With a vIOMMU: the table and the thread answering the backend's misses.
    viommu: Option<viommu::Viommu>,
    /// What descriptors carry for guest-memory offset 0: its guest-physical address, or its
    /// IOVA behind the vIOMMU.
    addr_base: u64,
    /// Each vring's buffer area: offset in guest memory and length.
    bufs: Vec<(usize, usize)>,
    mem: GuestMemory,
    stopped: bool,
    /// Each vring's addresses as sent (desc, avail, used) and its used ring's guest-physical
    /// address: SET_VRING_ADDR is sent again when dirty logging starts or stops.
    ring_addrs: Vec<([u64; 3], u64)>,
    /// The dirty log while "migrating".
    log: Option<migration::DirtyLog>,
}

/// Counters of the frontend's vIOMMU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ViommuCounters {
    /// Misses the backend sent.
    pub misses: u64,
    /// Misses answered with an update.
    pub served: u64,
    /// Misses left unanswered.
    pub unserved: u64,
    /// Updates the backend refused.
    pub refused: u64,
}

// SAFETY: the raw pointers inside the queues point into `mem`, which the
// Frontend owns and which moves with it; nothing is shared with other threads
// of this process (all mutation goes through `&mut self`).
unsafe impl Send for Frontend {}

impl Frontend {
    /// Connects as vhost-user client to a backend listening on `path`,
    /// retrying until `timeout`, and sets up the device.
    pub fn connect(path: &Path, cfg: FrontendConfig, timeout: Duration) -> Result<Frontend> {
        let stream = Endpoint::client(path).open(timeout, &AtomicBool::new(false))?;
        Self::from_stream(stream, cfg)
    }

    /// Listens on `path` (server mode, like QEMU's `server=on` or virtio-user
    /// `server=1`), accepts one backend connection within `timeout`, then
    /// sets up the device. The socket file is removed as soon as the
    /// connection is accepted (or the wait failed): reconnecting is not
    /// supported.
    pub fn listen_accept(path: &Path, cfg: FrontendConfig, timeout: Duration) -> Result<Frontend> {
        let stream = Endpoint::listen(path)?.open(timeout, &AtomicBool::new(false))?;
        Self::from_stream(stream, cfg)
    }

    /// Sets up the device over an already connected vhost-user socket.
    pub fn from_stream(stream: UnixStream, cfg: FrontendConfig) -> Result<Frontend> {
        validate(&cfg)?;
        let layout = Layout::new(&cfg);
        if layout.total > cfg.mem_size {
            return Err(Error::MemoryTooSmall { needed: layout.total, have: cfg.mem_size });
        }
        let mem = GuestMemory::new(cfg.mem_size, cfg.hugepages, cfg.gpa_base, cfg.seal_memory)?;
        let nvrings = 2 * u64::from(cfg.queue_pairs);
        let want = negotiate::wanted_protocol(&cfg);
        let mut ctl = Session::new(stream, nvrings, cfg.control_timeout, want)?;
        let neg = negotiate::negotiate(&mut ctl, &cfg)?;
        let viommu = match &cfg.iommu {
            Some(icfg) if neg.has(VIRTIO_F_ACCESS_PLATFORM) => {
                let backend = ctl.backend_channel()?;
                let v =
                    viommu::Viommu::start(icfg.clone(), mem.uva(0), mem.len() as u64, ctl.shared(), backend)
                        .map_err(|source| Error::RawProtocol { request: "vIOMMU start", source })?;
                Some(v)
            }
            _ => None,
        };
        let addr_base = viommu.as_ref().map_or(mem.gpa_base(), |v| v.iova_base());
        let hdr_len = neg.hdr_len();
        let event_idx = neg.has(VIRTIO_RING_F_EVENT_IDX);
        let mrg = neg.has(VIRTIO_NET_F_MRG_RXBUF);
        let any_layout = neg.has(VIRTIO_F_VERSION_1) || neg.has(VIRTIO_F_ANY_LAYOUT);
        let tx_layout = if cfg.indirect && neg.has(VIRTIO_RING_F_INDIRECT_DESC) {
            TxLayout::Indirect
        } else if cfg.split_header || !any_layout {
            TxLayout::SplitHeader
        } else {
            TxLayout::Contiguous
        };

        let base = mem.host_ptr(0);
        let make_ring = |i: usize| -> Result<SplitRing> {
            let v = &layout.vrings[i];
            let p = RingPtrs {
                desc: mem.host_ptr(v.desc),
                avail: mem.host_ptr(v.avail),
                used: mem.host_ptr(v.used),
            };
            // SAFETY: the layout places the three areas, suitably aligned and
            // sized for `ring_size` entries, inside `mem` (checked against
            // mem_size above), disjoint from every other vring and buffer
            // area; `mem` outlives the ring (field order of `Frontend`).
            unsafe { SplitRing::new(p, cfg.ring_size, event_idx) }
        };
        let mut pairs = Vec::with_capacity(cfg.queue_pairs as usize);
        for k in 0..cfg.queue_pairs as usize {
            let (ri, ti) = (2 * k, 2 * k + 1);
            // SAFETY: `base`/gpa_base describe `mem`; the vring's buffer area
            // lies inside it, is reserved for this queue and outlives it.
            let rx =
                unsafe { RxQueue::new(make_ring(ri)?, &layout.vrings[ri], base, addr_base, hdr_len, mrg) };
            // SAFETY: as above, for the TX buffer and indirect areas.
            let tx = unsafe {
                TxQueue::new(make_ring(ti)?, &layout.vrings[ti], base, addr_base, tx_layout, hdr_len)
            };
            pairs.push(QueuePair { rx, tx });
        }

        ctl.set_memory(&[mem.region_info()])?;
        if let Some(v) = viommu.as_ref().filter(|_| cfg.iommu.as_ref().is_some_and(|c| c.prefill)) {
            v.prefill().map_err(|source| Error::RawProtocol { request: "IOTLB prefill", source })?;
        }
        // Ring addresses: our virtual addresses, or IOVAs behind the vIOMMU (as QEMU sends).
        let ring_addr = |off: usize| match &viommu {
            Some(v) => v.iova_base() + off as u64,
            None => mem.uva(off),
        };
        let mut ring_addrs = Vec::with_capacity(2 * pairs.len());
        for (k, pair) in pairs.iter().enumerate() {
            for (i, ring) in [(2 * k, &pair.rx.ring), (2 * k + 1, &pair.tx.ring)] {
                let v = &layout.vrings[i];
                ring_addrs.push((
                    [ring_addr(v.desc), ring_addr(v.avail), ring_addr(v.used)],
                    mem.gpa_base() + v.used as u64,
                ));
                let setup = VringSetup {
                    size: ring.size(),
                    base: 0,
                    desc: ring_addr(v.desc),
                    avail: ring_addr(v.avail),
                    used: ring_addr(v.used),
                    kick: ring.kick_fd(),
                    call: ring.call_fd(),
                };
                ctl.setup_vring(i, &setup)?;
            }
        }
        ctl.enable_vrings(2 * pairs.len())?;
        // RX buffers were posted before the rings existed for the backend.
        for pair in &mut pairs {
            pair.rx.ring.kick();
        }
        tracing::debug!(
            "frontend ready: features {}, header {hdr_len} bytes, TX {tx_layout:?}, hugepages {}",
            feature_names(neg.features),
            mem.hugepages()
        );

        Ok(Frontend {
            pairs,
            ctl,
            neg,
            hdr_len,
            ring_size: cfg.ring_size,
            scratch: (layout.scratch, layout.scratch_len),
            viommu,
            bufs: layout.vrings.iter().map(|v| (v.bufs, v.buf_size * cfg.ring_size as usize)).collect(),
            addr_base,
            mem,
            stopped: false,
            ring_addrs,
            log: None,
        })
    }

    /// Virtio feature bits acked with `SET_FEATURES` (including
    /// `VHOST_USER_F_PROTOCOL_FEATURES` when used).
    pub fn negotiated_features(&self) -> u64 {
        self.neg.features
    }

    /// vhost-user protocol feature bits acked with `SET_PROTOCOL_FEATURES`.
    pub fn protocol_features(&self) -> u64 {
        self.neg.protocol.bits()
    }

    /// Device MAC read with `GET_CONFIG` at setup, when the `CONFIG` protocol
    /// feature and `VIRTIO_NET_F_MAC` were both negotiated and the read worked.
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.neg.mac
    }

    /// virtio-net header length in use (10 or 12 bytes).
    pub fn hdr_len(&self) -> usize {
        self.hdr_len
    }

    /// Number of queue pairs.
    pub fn queue_pairs(&self) -> u16 {
        self.pairs.len() as u16
    }

    /// Entries per vring.
    pub fn ring_size(&self) -> u16 {
        self.ring_size
    }

    /// Largest frame [`enqueue_tx`](Self::enqueue_tx) accepts.
    pub fn max_tx_frame(&self) -> usize {
        self.pairs[0].tx.max_frame()
    }

    /// Whether the shared memory got huge pages.
    pub fn hugepages(&self) -> bool {
        self.mem.hugepages()
    }

    /// Queues one Ethernet frame (without virtio-net header) on TX queue `q`
    /// without publishing it. Returns false if the ring is full even after
    /// reclaiming completed buffers.
    ///
    /// # Panics
    /// If `q` is out of range or `frame` is longer than
    /// [`max_tx_frame`](Self::max_tx_frame).
    pub fn enqueue_tx(&mut self, q: u16, frame: &[u8]) -> bool {
        self.pairs[q as usize].tx.enqueue(frame)
    }

    /// Queues a `len`-byte frame that `fill` writes in place into the TX
    /// buffer (which still holds the frame last sent from that slot, or
    /// zeros), without publishing it. Returns false, without calling `fill`,
    /// if the ring is full even after reclaiming completed buffers. This is
    /// the generator's path: it rewrites headers and stamps, not payloads.
    ///
    /// # Panics
    /// If `q` is out of range or `len` exceeds [`max_tx_frame`](Self::max_tx_frame).
    pub fn enqueue_tx_with(&mut self, q: u16, len: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        self.pairs[q as usize].tx.enqueue_with(len, fill)
    }

    /// Publishes queued TX buffers (one Release store of `avail.idx`) and
    /// kicks the backend if it asked to be notified.
    pub fn flush_tx(&mut self, q: u16) {
        self.pairs[q as usize].tx.ring.publish(true);
    }

    /// Sends `frame` with an offload request: the virtio-net header starts with `hdr` (flags,
    /// GSO type, header length, GSO size, checksum start and offset; little-endian as the
    /// spec has it), which needs `host_offloads`. False if the ring is full.
    pub fn send_offloaded(&mut self, q: u16, hdr: &[u8], frame: &[u8]) -> bool {
        let ok = self.pairs[q as usize].tx.enqueue_hdr_with(hdr, frame.len(), |b| b.copy_from_slice(frame));
        if ok {
            self.flush_tx(q);
        }
        ok
    }

    /// [`enqueue_tx`](Self::enqueue_tx) followed by [`flush_tx`](Self::flush_tx).
    pub fn send(&mut self, q: u16, frame: &[u8]) -> bool {
        let ok = self.enqueue_tx(q, frame);
        if ok {
            self.flush_tx(q);
        }
        ok
    }

    /// Pops every frame the backend has written to RX queue `q`, calls
    /// `f(frame)` (virtio-net header stripped; frames spanning several
    /// buffers with MRG_RXBUF are concatenated), re-posts the buffers and
    /// returns the number of frames. Never blocks.
    pub fn poll_rx(&mut self, q: u16, mut f: impl FnMut(&[u8])) -> usize {
        self.poll_rx_with_header(q, |frame, _hdr| f(frame))
    }

    /// Like [`poll_rx`](Self::poll_rx) but also passes the raw virtio-net
    /// header bytes: `f(frame, header)`.
    pub fn poll_rx_with_header(&mut self, q: u16, f: impl FnMut(&[u8], &[u8])) -> usize {
        self.pairs[q as usize].rx.poll(usize::MAX, f)
    }

    /// Receives on queue `q` until `n` frames arrived in this call or
    /// `timeout` passed, and returns them (at most `n`; frames beyond `n`
    /// stay in the ring).
    ///
    /// Between polls it sleeps in `poll(2)` on the call eventfd with
    /// notifications enabled, waking at least every few milliseconds, so it
    /// works whether or not the backend signals.
    pub fn recv_frames(&mut self, q: u16, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        let rx = &mut self.pairs[q as usize].rx;
        loop {
            let want = n - out.len();
            rx.poll(want, |frame, _| out.push(frame.to_vec()));
            let now = Instant::now();
            if out.len() >= n || now >= deadline {
                break;
            }
            rx.ring.set_interrupts(true);
            if !rx.has_pending() {
                let wait = (deadline - now).min(RX_POLL_FALLBACK);
                if let Err(e) = rx.ring.wait_call(wait) {
                    tracing::warn!("poll on RX call eventfd failed: {e}");
                    thread::sleep(wait);
                }
            }
            rx.ring.set_interrupts(false);
        }
        out
    }

    /// TX buffers the backend has returned on queue `q` so far (reclaimed
    /// or not). Dropped frames must be returned too, so tests can compare
    /// this with the number sent.
    pub fn tx_completed(&self, q: u16) -> u64 {
        self.pairs[q as usize].tx.completed_total()
    }

    /// Frees TX buffers the backend has returned on queue `q`; returns how
    /// many chains were completed.
    pub fn reclaim_tx(&mut self, q: u16) -> usize {
        self.pairs[q as usize].tx.reclaim()
    }

    /// TX descriptors currently free on queue `q` (after the last reclaim).
    pub fn tx_free_descs(&self, q: u16) -> usize {
        self.pairs[q as usize].tx.free_descs()
    }

    /// Counters of queue pair `q`.
    pub fn stats(&self, q: u16) -> QueueStats {
        let p = &self.pairs[q as usize];
        QueueStats {
            tx_enqueued: p.tx.enqueued,
            tx_completed: p.tx.completed_total(),
            tx_kicks: p.tx.ring.kicks(),
            tx_errors: p.tx.errors,
            rx_frames: p.rx.frames,
            rx_bytes: p.rx.bytes,
            rx_merged: p.rx.merged,
            rx_kicks: p.rx.ring.kicks(),
            rx_calls: p.rx.ring.calls(),
            rx_errors: p.rx.errors,
        }
    }

    /// Sends `GET_VRING_BASE` for every vring, which makes the backend stop
    /// them, and returns the bases (vring order: RX0, TX0, RX1, ...).
    pub fn stop(&mut self) -> Result<Vec<u32>> {
        let bases = self.ctl.stop_vrings(2 * self.pairs.len())?;
        self.stopped = true;
        Ok(bases)
    }

    /// Starts dirty logging as QEMU does when a migration starts: a sealed memfd log covering
    /// guest memory (SET_LOG_BASE), VHOST_F_LOG_ALL acked with the running rings, then each
    /// ring's addresses again with its used ring's log address.
    pub fn start_migration_log(&mut self) -> Result<()> {
        let covering = self.mem.gpa_base() + self.mem.len() as u64;
        let log = migration::DirtyLog::new(covering)
            .map_err(|source| Error::RawProtocol { request: "dirty log memfd", source })?;
        self.ctl.set_log_base(log.fd(), log.bytes())?;
        self.log = Some(log);
        self.ctl.set_features(self.neg.features | VHOST_F_LOG_ALL)?;
        self.resend_ring_addrs(true)
    }

    /// Stops dirty logging (a cancelled migration, or the end of one): LOG_ALL no longer acked,
    /// the rings' addresses without a log address. The log stays readable.
    pub fn stop_migration_log(&mut self) -> Result<()> {
        self.ctl.set_features(self.neg.features & !VHOST_F_LOG_ALL)?;
        self.resend_ring_addrs(false)
    }

    fn resend_ring_addrs(&mut self, log: bool) -> Result<()> {
        for (k, pair) in self.pairs.iter().enumerate() {
            for (i, ring) in [(2 * k, &pair.rx.ring), (2 * k + 1, &pair.tx.ring)] {
                let ([desc, avail, used], used_gpa) = self.ring_addrs[i];
                let v = VringSetup {
                    size: ring.size(),
                    base: 0,
                    desc,
                    avail,
                    used,
                    kick: ring.kick_fd(),
                    call: ring.call_fd(),
                };
                self.ctl.set_vring_addr(i, &v, log.then_some(used_gpa))?;
            }
        }
        Ok(())
    }

    /// The pages (guest-physical address / 4096) the backend marked since the last call,
    /// cleared (empty without a log).
    pub fn take_dirty_pages(&mut self) -> Vec<u64> {
        self.log.as_ref().map(|l| l.take_dirty_pages()).unwrap_or_default()
    }

    /// The whole of guest memory as it is now, and the guest-physical address of its first
    /// byte: what a migration copies. (The backend may be writing into it: a copy taken while
    /// it runs is what a pre-copy pass sees.)
    pub fn memory_snapshot(&self, from: usize, len: usize) -> Vec<u8> {
        let len = len.min(self.mem.len().saturating_sub(from));
        let mut out = vec![0u8; len];
        // SAFETY: `from..from + len` lies inside `mem`, which `self` keeps mapped; volatile-free
        // byte copy of memory the backend may write concurrently (a torn page is what a
        // pre-copy pass copies too, and the dirty log makes it copy the page again).
        unsafe { std::ptr::copy_nonoverlapping(self.mem.host_ptr(from), out.as_mut_ptr(), len) };
        out
    }

    /// Guest memory's size in bytes.
    pub fn memory_len(&self) -> usize {
        self.mem.len()
    }

    /// SEND_RARP: asks the backend to announce `mac` from this device, as QEMU does on the
    /// destination of a migration.
    pub fn send_rarp(&mut self, mac: [u8; 6]) -> Result<()> {
        self.ctl.send_rarp(mac)
    }

    /// Whether [`stop`](Self::stop) has completed.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Writes `descs` verbatim (see [`RawDesc`]) into consecutive free
    /// descriptors of TX queue `q`, publishes the chain and kicks as
    /// needed. Returns the head index, or `None` if `descs` is empty or no
    /// run of enough free descriptors exists.
    ///
    /// For hostile-input tests: points every receive buffer of queue `q` (posted or to be
    /// reposted) at `addr`, `len` bytes, e.g. outside [`guest_region`](Self::guest_region).
    /// A device must refuse them (the buffers come back empty) and write nothing.
    pub fn poison_rx(&mut self, q: u16, addr: u64, len: u32) {
        self.pairs[q as usize].rx.poison(addr, len);
    }

    /// For hostile-input tests: combine with [`guest_mem`](Self::guest_mem)
    /// to point descriptors at crafted data, or at addresses outside
    /// [`guest_region`](Self::guest_region). Whatever head the backend
    /// returns for it is reclaimed like a normal frame.
    pub fn push_raw_tx_chain(&mut self, q: u16, descs: &[RawDesc]) -> Option<u16> {
        let tx = &mut self.pairs[q as usize].tx;
        let head = tx.push_raw(descs)?;
        tx.ring.publish(true);
        Some(head)
    }

    /// The memfd behind guest memory (hostile tests truncate it). After a truncation this
    /// frontend must not touch its rings or buffers: it would take the SIGBUS itself.
    pub fn memory_fd(&self) -> std::os::fd::RawFd {
        self.mem.fd()
    }

    /// Scratch part of guest memory reserved for tests: returns the
    /// guest-physical address of its first byte and the bytes themselves.
    ///
    /// The backend reads (or, with a device-writable descriptor, writes)
    /// this memory only through descriptors the caller points at it.
    pub fn guest_mem(&mut self) -> (u64, &mut [u8]) {
        let (off, len) = self.scratch;
        // SAFETY: the scratch area lies inside `mem` (layout checked against
        // mem_size) and no ring or buffer overlaps it; the returned borrow is
        // tied to `&mut self`, so this process has no other access meanwhile.
        let s = unsafe { slice::from_raw_parts_mut(self.mem.host_ptr(off), len) };
        (self.addr_base + off as u64, s)
    }

    /// Offset of the scratch area in guest memory (see [`mem_uva`](Self::mem_uva)).
    pub fn scratch_offset(&self) -> usize {
        self.scratch.0
    }

    /// Our virtual address of guest-memory offset `off` (what IOTLB updates carry).
    pub fn mem_uva(&self, off: usize) -> u64 {
        self.mem.uva(off)
    }

    /// Whether the device runs behind the frontend's vIOMMU (ACCESS_PLATFORM negotiated).
    pub fn has_viommu(&self) -> bool {
        self.viommu.is_some()
    }

    /// vIOMMU: maps `[iova, iova + size)` (whole pages) to guest-memory offset `off` with
    /// `perm` (`ACCESS_*`). The backend learns it on its next miss there.
    pub fn iommu_map(&self, iova: u64, size: u64, off: usize, perm: u8) {
        if let Some(v) = &self.viommu {
            v.map(iova, size, self.mem.uva(off), perm);
        }
    }

    /// vIOMMU: unmaps `[iova, iova + size)` and sends the invalidation; returns the backend's
    /// status (0 = accepted).
    pub fn iommu_unmap(&self, iova: u64, size: u64) -> Result<u64> {
        let v = self.viommu.as_ref().ok_or_else(|| Error::Unsupported("no vIOMMU negotiated".into()))?;
        v.unmap(iova, size).map_err(|source| Error::RawProtocol { request: "IOTLB_MSG", source })
    }

    /// vIOMMU: starts or stops answering the backend's misses (they are still counted).
    pub fn iommu_serve_misses(&self, on: bool) {
        if let Some(v) = &self.viommu {
            v.serve_misses(on);
        }
    }

    /// Sends a raw IOTLB message (hostile tests); returns the backend's status.
    pub fn iotlb_raw(&self, m: IotlbMsg) -> Result<u64> {
        let v = self.viommu.as_ref().ok_or_else(|| Error::Unsupported("no vIOMMU negotiated".into()))?;
        viommu::send_iotlb(v.ctl(), &m).map_err(|source| Error::RawProtocol { request: "IOTLB_MSG", source })
    }

    /// Hostile tests: gives the backend `fd` (any file, blocking or not) as vring `index`'s
    /// kick, call or err file (vring `2q` is RX of pair `q`, `2q + 1` its TX). The frontend
    /// keeps kicking and polling its own eventfds, which the backend then no longer knows.
    /// Returns the backend's refusal, if any.
    pub fn set_vring_file(
        &mut self,
        index: usize,
        which: VringFile,
        fd: &impl std::os::fd::AsRawFd,
    ) -> Result<()> {
        self.ctl.set_vring_file(index, which, fd.as_raw_fd())
    }

    /// Asks for (or stops asking for) interrupts on both rings of pair `q` until changed again
    /// ([`recv_frames`](Self::recv_frames) turns RX interrupts off when it returns).
    pub fn set_interrupts(&mut self, q: u16, on: bool) {
        let p = &mut self.pairs[q as usize];
        p.rx.ring.set_interrupts(on);
        p.tx.ring.set_interrupts(on);
    }

    /// Hostile tests: stores TX queue `q`'s `avail.idx` verbatim (e.g. more than a ring ahead
    /// of the backend: an overrun), without kicking.
    pub fn store_tx_avail_idx_raw(&mut self, q: u16, idx: u16) {
        self.pairs[q as usize].tx.ring.store_avail_idx_raw(idx);
    }

    /// Counters of the vIOMMU, if there is one.
    pub fn viommu_counters(&self) -> Option<ViommuCounters> {
        use std::sync::atomic::Ordering::Relaxed;
        self.viommu.as_ref().map(|v| ViommuCounters {
            misses: v.stats.misses.load(Relaxed),
            served: v.stats.served.load(Relaxed),
            unserved: v.stats.unserved.load(Relaxed),
            refused: v.stats.refused.load(Relaxed),
        })
    }

    /// Where vring `i`'s buffers lie (2k: pair k's receive buffers, 2k+1: its transmit
    /// buffers), as descriptors address them (guest-physical, or IOVA behind the vIOMMU),
    /// and how many bytes: to unmap them as a guest in strict IOMMU mode does.
    pub fn buffer_area(&self, i: usize) -> (u64, u64) {
        let (off, len) = self.bufs[i];
        (self.addr_base + off as u64, len as u64)
    }

    /// Guest-physical start and length of the whole shared region (addresses
    /// outside it are invalid for the backend).
    pub fn guest_region(&self) -> (u64, u64) {
        (self.mem.gpa_base(), self.mem.len() as u64)
    }
}

fn validate(cfg: &FrontendConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Config(m));
    if cfg.queue_pairs == 0 || cfg.queue_pairs > 128 {
        return bad(format!("queue_pairs {} not in 1..=128", cfg.queue_pairs));
    }
    if !cfg.ring_size.is_power_of_two() || cfg.ring_size < 2 || cfg.ring_size > 32768 {
        return bad(format!("ring_size {} is not a power of two in 2..=32768", cfg.ring_size));
    }
    if cfg.rx_buf_size < 64 || cfg.tx_buf_size < 64 {
        return bad("rx_buf_size and tx_buf_size must be at least 64".into());
    }
    Ok(())
}
