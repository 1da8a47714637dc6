//! A running virtqueue: its ring, the memory it lives in, its eventfds and its counters.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Source of queue epochs.
static EPOCHS: AtomicU64 = AtomicU64::new(1);
use std::sync::Arc;

use iommu::Dma;
use virtq::{Ring, RingAddrs, RingError};

use crate::limits::MAX_FRAME;
use crate::offload::{Caps, MAX_GSO_FRAME};
use crate::vhost::dirty_log::DirtyLog;
use crate::vhost::iotlb::IotlbLink;

/// A queue as a polling thread uses it. Owned by its port's queue slot; a thread touches it
/// only while holding that slot's lock, so the memory it points into cannot be swapped or
/// unmapped under it.
pub struct VirtQueue {
    /// The ring itself (hot): split, or packed where the guest negotiated it.
    pub ring: Ring,
    /// Where the ring is and how it notifies: what an accelerator is handed with its state.
    pub addrs: virtq::RingAddrs,
    /// VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// How the guest's addresses become host memory (guest-physical, or IOVAs through this
    /// queue's IOTLB copy), with the memory it keeps mapped.
    pub dma: Dma,
    /// With a vIOMMU: how this queue asks the frontend for missing translations.
    pub iotlb: Option<Box<IotlbLink>>,
    /// Virtio-net header length of this guest (10 or 12).
    pub hdr_len: u8,
    /// Whether a received packet may span several buffers (MRG_RXBUF).
    pub mrg_rxbuf: bool,
    /// Whether the guest may use indirect tables.
    pub indirect: bool,
    /// The offloads this guest negotiated.
    pub caps: Caps,
    /// Longest frame the guest may send (64 KiB with TSO).
    pub max_frame: u32,
    /// Whether the ring was stopped for misbehaving (e.g. avail index overrun).
    pub broken: bool,
    /// Eventfd that interrupts the guest, if it wants interrupts.
    pub call: Option<Arc<File>>,
    /// Where a revoked `call` is reported (the port's; `None` in unit tests).
    pub call_fault: Option<Arc<CallFault>>,
    /// Eventfd the guest kicks, if it kicks; with its generation so a polling thread can
    /// tell a new fd from a reused number.
    pub kick: Option<(Arc<File>, u64)>,
    /// Used entries written but held back from the guest (the egress shaper's queue): the
    /// last `held` pushed entries are not published until released.
    pub held: u16,
    /// Unique for the life of the process: tells this queue from a later one in the same slot.
    pub epoch: u64,
    /// Transmit queues under load: since when (ticks) a short backlog has been left in the
    /// ring, waiting for more (0 = not waiting). See `pmd::burst::Batching`.
    pub wait_since: u64,
    /// Transmit queues: the guest has been sending full bursts (batching applies).
    pub loaded: bool,
    /// While the frontend migrates the guest (`VHOST_F_LOG_ALL`): the dirty log every page
    /// this queue writes into the guest is marked in.
    pub log: Option<Arc<DirtyLog>>,
}

/// Parameters to start a queue.
pub struct QueueSetup {
    /// Ring addresses (frontend virtual addresses).
    pub addrs: RingAddrs,
    /// Ring size.
    pub size: u32,
    /// Where to resume.
    pub last_avail: u16,
    /// EVENT_IDX negotiated.
    pub event_idx: bool,
    /// Virtio-net header length.
    pub hdr_len: u8,
    /// MRG_RXBUF negotiated.
    pub mrg_rxbuf: bool,
    /// INDIRECT_DESC negotiated.
    pub indirect: bool,
    /// Offloads negotiated.
    pub caps: Caps,
    /// RING_PACKED negotiated: the ring is packed.
    pub packed: bool,
}

impl VirtQueue {
    /// Builds a running queue whose addresses `dma` translates.
    pub fn new(
        mut dma: Dma,
        s: &QueueSetup,
        call: Option<Arc<File>>,
        kick: Option<(Arc<File>, u64)>,
    ) -> Result<Self, RingError> {
        let mut ring = Ring::new(&mut dma, s.addrs, s.size, s.last_avail, s.event_idx, s.packed)?;
        // A polled ring needs no kicks: each one is a syscall on the guest's side. Only a
        // polling thread about to sleep turns them back on.
        ring.set_kicks(false);
        Ok(VirtQueue {
            ring,
            addrs: s.addrs,
            event_idx: s.event_idx,
            dma,
            iotlb: None,
            hdr_len: s.hdr_len,
            mrg_rxbuf: s.mrg_rxbuf,
            indirect: s.indirect,
            caps: s.caps,
            max_frame: if s.caps.tx_tso4 || s.caps.tx_tso6 { MAX_GSO_FRAME } else { MAX_FRAME },
            broken: false,
            call,
            call_fault: None,
            kick,
            held: 0,
            epoch: EPOCHS.fetch_add(1, Ordering::Relaxed),
            wait_since: 0,
            loaded: false,
            log: None,
        })
    }

    /// Publishes every used entry except the held ones (and, while logging, marks the used
    /// ring's pages: after the writes, so a pass of the frontend that misses them sees the
    /// mark).
    #[inline(always)]
    pub fn publish(&mut self) {
        self.ring.publish_used_but(self.held);
        if let Some(log) = &self.log {
            self.log_used(log);
        }
    }

    /// Tells the driver whether to kick (see [`virtq::SplitRing::set_kicks`]); that writes the
    /// used ring's flags or avail_event (a packed ring's device event area), which a migrating
    /// guest's log must show too.
    #[inline]
    pub fn set_kicks(&mut self, on: bool) -> bool {
        let r = self.ring.set_kicks(on);
        if let Some(log) = &self.log {
            self.log_used(log);
        }
        r
    }

    /// Marks the used ring's pages in `log`. By the host address the ring is mapped at,
    /// resolved to guest-physical through the region table: the same path holds behind a
    /// vIOMMU, where the frontend's `log_guest_addr` would be an IOVA.
    #[cold]
    fn log_used(&self, log: &DirtyLog) {
        for (p, len) in self.ring.used_areas() {
            if len > 0 {
                log.mark_host(self.dma.mem(), p, len);
            }
        }
    }

    /// While logging: marks the pages under the first `wrote` bytes of the receive buffers
    /// `segs` (a frame just copied in).
    #[inline]
    pub fn log_written(&self, segs: &[iommu::Grant<iommu::Rw>], mut wrote: u32) {
        let Some(log) = &self.log else { return };
        for s in segs {
            if wrote == 0 {
                break;
            }
            let n = s.len().min(wrote);
            log.mark_host(self.dma.mem(), s.as_ptr(), n as u64);
            wrote -= n;
        }
    }

    /// Interrupts the guest if it asked for it; returns whether it did.
    #[inline]
    pub fn notify(&mut self) -> bool {
        if !self.ring.needs_interrupt() {
            return false;
        }
        self.signal()
    }

    /// Interrupts the guest whether or not its ring asks (a ring handed over owes the guest
    /// the interrupt its last owner did not send); returns whether it did.
    pub fn signal(&mut self) -> bool {
        let Some(call) = &self.call else { return false };
        // The frontend shares this eventfd's file description and may have made it blocking
        // again: the write runs under the watchdog, which interrupts it (EINTR) if it blocks.
        match crate::watchdog::guest_fd_call(|| (&**call).write(&1u64.to_ne_bytes())) {
            Ok(_) => true,
            // A full counter on a non-blocking eventfd still means "signalled".
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Err(e) => {
                self.revoke_call(e);
                false
            }
        }
    }

    /// Stops interrupting a guest whose call eventfd blocked us (or failed): no more writes,
    /// hence no more interrupts to it, and its port is flagged for disconnection.
    #[cold]
    fn revoke_call(&mut self, e: std::io::Error) {
        self.call = None;
        if let Some(f) = &self.call_fault {
            f.revoke(&e);
        }
    }
}

/// A port's record of call eventfds revoked by its queues (shared by the port and its queues).
#[derive(Debug, Default)]
pub struct CallFault {
    port: String,
    /// Revoked since the last [`CallFault::take`]: the port's frontend must be disconnected.
    pending: AtomicBool,
    /// Call eventfds revoked so far, over every connection of the port.
    pub revoked: AtomicU64,
}

impl CallFault {
    /// The record of port `port`.
    pub fn new(port: String) -> Self {
        CallFault { port, ..Default::default() }
    }

    fn revoke(&self, e: &std::io::Error) {
        self.revoked.fetch_add(1, Ordering::Relaxed);
        if !self.pending.swap(true, Ordering::Relaxed) {
            tracing::error!(port = %self.port, "guest interrupt eventfd blocked the switch ({e}): stopped signalling it; its frontend will be disconnected");
        }
    }

    /// Whether a call eventfd was revoked since the last call (then the frontend must go).
    pub fn take(&self) -> bool {
        self.pending.swap(false, Ordering::Relaxed)
    }
}

impl Drop for VirtQueue {
    /// A stopping queue shows the guest everything it was given: held packets are already in
    /// the guest's buffers, and a restarted ring reads its used index back from memory. (The
    /// memory is still mapped: `dma` is dropped after this.)
    fn drop(&mut self) {
        self.held = 0;
        self.publish();
    }
}

pub use crate::counters::{bump, QueueCounters, QueueStats};
