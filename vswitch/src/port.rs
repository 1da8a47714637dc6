//! A switch port as the polling threads see it: identity, VLAN rule, and one slot per queue.
//!
//! A port is a set of queue pairs; each queue is a source (packets come from it) or a sink
//! (packets go into it), whatever kind of queue it is: a [`Queue`] is a closed enum the burst
//! matches once per source and once per destination, then runs monomorphic code.
//!
//! Point of view: `txq` and `rxq` are named from the guest's (or the uplink device's) side, as
//! virtio names them: the switch *receives from* a `txq` (a source) and *delivers into* an
//! `rxq` (a sink). Queue counters count what moved through that queue.
//!
//! A slot holds the running queue (or nothing) behind a spinlock. A polling thread takes the
//! lock once per burst; the control thread takes it to start, stop, remap or hand over a queue.
//! Holding a slot's lock is what keeps the guest memory its queue points into mapped, so a
//! burst never races a memory-table change or a disconnect.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_utils::CachePadded;

use crate::l2::VlanMode;
use crate::policy::{PolicyConfig, PolicyError, PortPolicy};
use crate::sync::{Spin, SpinGuard};
use crate::uplink::nic::{NicQueue, NicTxQueue};
use crate::uplink::tap::TapQueue;
use crate::virtio::queue::CallFault;
use crate::virtio::{QueueStats, VirtQueue};

/// Port ids are small integers; this many may exist at once.
pub const MAX_PORTS: usize = 1024;

/// What runs in a queue slot. A queue an accelerator takes over leaves its slot (the burst
/// then finds nothing to poll or fill) and is handed back into it.
pub enum Queue {
    /// A guest's virtio queue served over vhost-user: the software path.
    Virtio(VirtQueue),
    /// One queue of a TAP uplink: read from as a source, written to as a sink.
    Tap(TapQueue),
    /// The wire side of a NIC-model uplink: a TAP device read by the modelled device, which
    /// steers frames into bound guests' receive rings or to the software path.
    Nic(Box<NicQueue>),
    /// The transmit side of a NIC-model uplink: the device's per-pool TX queues, scheduled
    /// onto the wire.
    NicTx(Box<NicTxQueue>),
    /// A guest's receive ring plugged into a Level 2 NIC: the device's DMA fills it.
    AccelRx(Box<crate::accel::AccelRx>),
    /// A guest's transmit ring plugged into a Level 2 NIC: the device fetches from it.
    AccelTx(Box<crate::accel::AccelTx>),
}

impl Queue {
    /// Whether it can move packets (not stopped for misbehaving, not gone).
    #[inline(always)]
    pub fn live(&self) -> bool {
        match self {
            Queue::Virtio(q) => !q.broken,
            Queue::Tap(t) => !t.broken(),
            Queue::Nic(n) => !n.wire.broken(),
            Queue::NicTx(t) => !t.wire.broken(),
            Queue::AccelRx(a) => !a.shell.broken,
            Queue::AccelTx(a) => !a.shell.broken,
        }
    }

    /// The virtio queue, if that is what runs here.
    #[inline(always)]
    pub fn virtio_mut(&mut self) -> Option<&mut VirtQueue> {
        match self {
            Queue::Virtio(q) => Some(q),
            _ => None,
        }
    }

    /// The virtio queue, if that is what runs here.
    #[inline(always)]
    pub fn virtio(&self) -> Option<&VirtQueue> {
        match self {
            Queue::Virtio(q) => Some(q),
            _ => None,
        }
    }
}

impl From<VirtQueue> for Queue {
    fn from(q: VirtQueue) -> Self {
        Queue::Virtio(q)
    }
}

/// A queue slot: the running queue, if any, and its counters (which outlive the queue).
#[derive(Default)]
pub struct QueueSlot {
    queue: Spin<Option<Queue>>,
    /// Whether a queue that is not broken runs here, as of the last unlock: lets a burst
    /// choose among a multi-queue port's running queues without locking each.
    live: AtomicBool,
    /// Counters of whatever queue runs in this slot.
    pub stats: QueueStats,
    /// TSC ticks polling threads spent on bursts taken from this slot (a source's slot):
    /// the measured load that assigns queues to threads. Added to in batches by whichever
    /// thread polls it.
    pub busy_ticks: AtomicU64,
    /// Guest-memory addresses the next delivery into the queue here touches first (its ring's
    /// `next_lines` after the last delivery; 0: none yet): a burst bound for many ports
    /// prefetches them all before it takes the first lock. Only ever prefetched, never
    /// dereferenced, so a stale one costs a wasted prefetch.
    hints: [AtomicUsize; 2],
}

/// Exclusive access to a slot's queue. On release it records whether a working queue is left.
pub struct SlotGuard<'a> {
    g: SpinGuard<'a, Option<Queue>>,
    live: &'a AtomicBool,
}

impl Deref for SlotGuard<'_> {
    type Target = Option<Queue>;
    #[inline(always)]
    fn deref(&self) -> &Self::Target {
        &self.g
    }
}

impl DerefMut for SlotGuard<'_> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.g
    }
}

impl Drop for SlotGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        let live = self.g.as_ref().is_some_and(Queue::live);
        if self.live.load(Ordering::Relaxed) != live {
            self.live.store(live, Ordering::Relaxed);
        }
    }
}

impl SlotGuard<'_> {
    /// The virtio queue running here, if any.
    #[inline(always)]
    pub fn virtio_mut(&mut self) -> Option<&mut VirtQueue> {
        self.g.as_mut().and_then(Queue::virtio_mut)
    }

    /// Hands `f` every IOTLB copy of whatever runs here: a virtio queue's, or a plugged
    /// ring's two (the device's and the software path's shell, which it resumes with).
    pub fn each_iotlb(&mut self, mut f: impl FnMut(&mut iommu::Iotlb)) {
        let mut one = |d: &mut iommu::Dma| {
            if let Some(t) = d.iotlb_mut() {
                f(t);
            }
        };
        match self.g.as_mut() {
            Some(Queue::Virtio(q)) => one(&mut q.dma),
            Some(Queue::AccelRx(a)) => {
                one(a.q.dma_mut());
                one(&mut a.shell.dma);
            }
            Some(Queue::AccelTx(a)) => {
                one(a.q.dma_mut());
                one(&mut a.shell.dma);
            }
            _ => {}
        }
    }

    /// Whether a queue in IOVA mode runs here (plugged or not).
    pub fn has_iotlb(&self) -> bool {
        match self.g.as_ref() {
            Some(Queue::Virtio(q)) => q.dma.is_iova(),
            Some(Queue::AccelRx(a)) => a.shell.dma.is_iova(),
            Some(Queue::AccelTx(a)) => a.shell.dma.is_iova(),
            _ => false,
        }
    }

    /// Takes the virtio queue out of the slot (leaving any other kind in place). A ring
    /// plugged into a device is handed back first (in-flight transmits dropped and counted:
    /// the frontend is stopping or resetting the ring, which a device cannot outlive).
    pub fn take_virtio(&mut self) -> Option<VirtQueue> {
        match self.g.take() {
            Some(Queue::Virtio(q)) => Some(q),
            Some(Queue::AccelRx(a)) => Some(a.unplug().0),
            Some(Queue::AccelTx(a)) => Some(a.unplug(&mut |_| Err(nic_models::direct::Wire::Lost)).0),
            other => {
                *self.g = other;
                None
            }
        }
    }
}

impl QueueSlot {
    /// Takes the lock if it is free.
    #[inline(always)]
    pub fn try_lock(&self) -> Option<SlotGuard<'_>> {
        self.queue.try_lock().map(|g| SlotGuard { g, live: &self.live })
    }

    /// Takes the lock, waiting for a burst in progress to finish.
    #[track_caller]
    pub fn lock(&self) -> SlotGuard<'_> {
        SlotGuard { g: self.queue.lock(), live: &self.live }
    }

    /// Records where the next delivery here will look first (after a delivery, lock held).
    #[inline(always)]
    pub fn set_hints(&self, lines: [usize; 2]) {
        self.hints[0].store(lines[0], Ordering::Relaxed);
        self.hints[1].store(lines[1], Ordering::Relaxed);
    }

    /// Starts loading the guest-memory lines the next delivery here will touch first (a stale
    /// address costs a wasted prefetch, never a fault).
    #[inline(always)]
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        for h in &self.hints {
            let a = h.load(Ordering::Relaxed);
            if a != 0 {
                // SAFETY: a prefetch never faults, whatever the address.
                unsafe {
                    core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(a as *const i8)
                };
            }
        }
    }

    /// Whether a working queue ran here when the lock was last released (a hint: the holder
    /// of the lock checks).
    #[inline(always)]
    pub fn live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }

    /// Whether a queue is installed (racy; for display).
    #[track_caller]
    pub fn is_running(&self) -> bool {
        self.lock().is_some()
    }
}

/// A port.
pub struct Port {
    /// Small integer id, unique among live ports.
    pub id: u16,
    /// User-given name.
    pub name: String,
    /// VLAN rule.
    pub vlan: VlanMode,
    /// MAC address offered to the guest in config space.
    pub mac: [u8; 6],
    /// Guest transmit queues (the switch receives from them), one per queue pair.
    pub txq: Box<[CachePadded<QueueSlot>]>,
    /// Guest receive queues (the switch delivers into them), one per queue pair.
    pub rxq: Box<[CachePadded<QueueSlot>]>,
    /// Rate limits and address filters, changeable at run time.
    pub policy: PortPolicy,
    /// Whether the guest sits behind a vIOMMU (its receive buffers are translated ahead).
    pub iova: std::sync::atomic::AtomicBool,
    /// Whether the checksum and segmentation offloads are offered to the guest.
    pub offloads: bool,
    /// Whether packed virtqueues are offered to the guest.
    pub packed: bool,
    /// Call eventfds its queues had to revoke (they blocked the switch).
    pub call_fault: Arc<CallFault>,
}

impl Port {
    /// A port with `pairs` queue pairs, none running.
    pub fn new(id: u16, name: String, vlan: VlanMode, mac: [u8; 6], pairs: u16) -> Self {
        let call_fault = Arc::new(CallFault::new(name.clone()));
        let slots = |n: u16| (0..n.max(1)).map(|_| CachePadded::new(QueueSlot::default())).collect();
        Port {
            id,
            name,
            vlan,
            mac,
            txq: slots(pairs),
            rxq: slots(pairs),
            policy: PortPolicy::default(),
            iova: Default::default(),
            offloads: true,
            packed: false,
            call_fault,
        }
    }

    /// Whether the frontend must be disconnected because a queue had to revoke its call
    /// eventfd (it blocked a polling thread). The control thread asks once per loop turn.
    pub fn needs_disconnect(&self) -> bool {
        let bad = self.call_fault.take();
        if bad {
            tracing::warn!(port = %self.name, "disconnecting the frontend: its interrupt eventfd blocked the switch");
        }
        bad
    }

    /// Number of queue pairs.
    pub fn pairs(&self) -> u16 {
        self.txq.len() as u16
    }

    /// Changes the port's policy at run time, without touching its connection. Everything is
    /// validated first: a refused change leaves the old policy in force.
    pub fn set_policy(&self, cfg: &PolicyConfig) -> Result<(), PolicyError> {
        cfg.validate(self.mac)?;
        self.policy.apply_ingress(cfg, self.mac)?;
        if cfg.egress.is_none() {
            self.remove_shaper();
        } else {
            self.policy.apply_egress(cfg.egress.as_ref())?;
        }
        self.policy.set_config(cfg.clone());
        Ok(())
    }

    /// Removes the egress shaper, first showing the guest every packet it holds back (they are
    /// already in the guest's buffers). Takes every receive queue's lock, then the shaper's, the
    /// order the polling threads use.
    fn remove_shaper(&self) {
        let mut queues: Vec<_> = self.rxq.iter().map(|s| s.lock()).collect();
        let mut eg = self.policy.egress.lock();
        if let Some(s) = eg.as_mut() {
            s.drain().for_each(drop);
        }
        for q in queues.iter_mut().filter_map(|g| g.virtio_mut()) {
            q.held = 0;
            q.publish();
            q.notify();
        }
        *eg = None;
        drop(eg);
        // Cannot fail: removing needs no validation.
        let _ = self.policy.apply_egress(None);
        self.policy.held.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// The slot for virtqueue `index` (2k = guest RX of pair k, 2k+1 = guest TX).
    pub fn slot(&self, index: usize) -> Option<&QueueSlot> {
        let pair = index / 2;
        if index.is_multiple_of(2) { self.rxq.get(pair) } else { self.txq.get(pair) }.map(|s| &**s)
    }
}
