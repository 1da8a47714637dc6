//! A running virtqueue: its ring, the memory it lives in, its eventfds and its counters.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Source of queue epochs.
static EPOCHS: AtomicU64 = AtomicU64::new(1);
use std::sync::Arc;

use iommu::Dma;

use crate::limits::MAX_FRAME;
use crate::offload::{Caps, MAX_GSO_FRAME};
use crate::vhost::iotlb::IotlbLink;

use super::ring::{RingAddrs, RingError, SplitRing};

/// A queue as a polling thread uses it. Owned by its port's queue slot; a thread touches it
/// only while holding that slot's lock, so the memory it points into cannot be swapped or
/// unmapped under it.
pub struct VirtQueue {
    /// The ring itself (hot).
    pub ring: SplitRing,
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
}

impl VirtQueue {
    /// Builds a running queue whose addresses `dma` translates.
    pub fn new(
        mut dma: Dma,
        s: &QueueSetup,
        call: Option<Arc<File>>,
        kick: Option<(Arc<File>, u64)>,
    ) -> Result<Self, RingError> {
        let mut ring = SplitRing::new(&mut dma, s.addrs, s.size, s.last_avail, s.event_idx)?;
        // A polled ring needs no kicks: each one is a syscall on the guest's side. Only a
        // polling thread about to sleep turns them back on.
        ring.set_kicks(false);
        Ok(VirtQueue {
            ring,
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
        })
    }

    /// Publishes every used entry except the held ones.
    #[inline(always)]
    pub fn publish(&mut self) {
        self.ring.publish_used_but(self.held);
    }

    /// Interrupts the guest if it asked for it; returns whether it did.
    #[inline]
    pub fn notify(&mut self) -> bool {
        if !self.ring.needs_interrupt() {
            return false;
        }
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

/// Counters of one queue. Written by whichever polling thread holds the queue (one at a time),
/// with plain load+store rather than locked adds; read by anyone.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Packets moved (received from the guest on its TX queues, delivered to it on RX queues).
    pub packets: AtomicU64,
    /// Frame bytes moved (without the virtio-net header).
    pub bytes: AtomicU64,
    /// Packets dropped because the destination had no (or too few) buffers.
    pub drop_no_buffer: AtomicU64,
    /// Packets or buffers refused as malformed (bad chain, runt frame).
    pub drop_malformed: AtomicU64,
    /// Packets dropped by policy (VLAN not allowed on the port).
    pub drop_filtered: AtomicU64,
    /// Packets with nowhere to go (only destination was the source, or the VLAN is empty).
    pub drop_no_route: AtomicU64,
    /// Packets dropped by the port's policy before any copy: anti-spoofing and the policer on
    /// transmit queues, the shaper's full queue on receive queues (reasons: the port's policy
    /// counters).
    pub drop_policy: AtomicU64,
    /// Packet copies made into this queue's buffers (one per delivered packet).
    pub copies: AtomicU64,
    /// Bytes copied into this queue's buffers.
    pub bytes_copied: AtomicU64,
    /// Interrupts sent to the guest.
    pub interrupts: AtomicU64,
    /// TCP frames of up to 64 KiB delivered whole (the receiver negotiated TSO).
    pub gso_whole: AtomicU64,
    /// TCP frames of up to 64 KiB cut into segments in software for this receiver.
    pub gso_segmented: AtomicU64,
    /// Checksums completed in software for this receiver.
    pub csum_completed: AtomicU64,
}

/// Single-writer add: a plain load and store, no locked instruction.
#[inline(always)]
pub fn bump(c: &AtomicU64, n: u64) {
    if n != 0 {
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
}

/// A snapshot of queue counters, plain numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueCounters {
    /// See [`QueueStats::packets`].
    pub packets: u64,
    /// See [`QueueStats::bytes`].
    pub bytes: u64,
    /// See [`QueueStats::drop_no_buffer`].
    pub drop_no_buffer: u64,
    /// See [`QueueStats::drop_malformed`].
    pub drop_malformed: u64,
    /// See [`QueueStats::drop_filtered`].
    pub drop_filtered: u64,
    /// See [`QueueStats::drop_no_route`].
    pub drop_no_route: u64,
    /// See [`QueueStats::drop_policy`].
    #[serde(default)]
    pub drop_policy: u64,
    /// See [`QueueStats::copies`].
    pub copies: u64,
    /// See [`QueueStats::bytes_copied`].
    pub bytes_copied: u64,
    /// See [`QueueStats::interrupts`].
    pub interrupts: u64,
    /// See [`QueueStats::gso_whole`].
    #[serde(default)]
    pub gso_whole: u64,
    /// See [`QueueStats::gso_segmented`].
    #[serde(default)]
    pub gso_segmented: u64,
    /// See [`QueueStats::csum_completed`].
    #[serde(default)]
    pub csum_completed: u64,
}

impl QueueStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> QueueCounters {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueCounters {
            packets: r(&self.packets),
            bytes: r(&self.bytes),
            drop_no_buffer: r(&self.drop_no_buffer),
            drop_malformed: r(&self.drop_malformed),
            drop_filtered: r(&self.drop_filtered),
            drop_no_route: r(&self.drop_no_route),
            drop_policy: r(&self.drop_policy),
            copies: r(&self.copies),
            bytes_copied: r(&self.bytes_copied),
            interrupts: r(&self.interrupts),
            gso_whole: r(&self.gso_whole),
            gso_segmented: r(&self.gso_segmented),
            csum_completed: r(&self.csum_completed),
        }
    }
}

impl std::ops::AddAssign for QueueCounters {
    fn add_assign(&mut self, o: Self) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.drop_no_buffer += o.drop_no_buffer;
        self.drop_malformed += o.drop_malformed;
        self.drop_filtered += o.drop_filtered;
        self.drop_no_route += o.drop_no_route;
        self.drop_policy += o.drop_policy;
        self.copies += o.copies;
        self.bytes_copied += o.bytes_copied;
        self.interrupts += o.interrupts;
        self.gso_whole += o.gso_whole;
        self.gso_segmented += o.gso_segmented;
        self.csum_completed += o.csum_completed;
    }
}
