//! A switch port as the polling threads see it: identity, VLAN rule, and one slot per queue.
//!
//! A slot holds the running queue (or nothing) behind a spinlock. A polling thread takes the
//! lock once per burst; the control thread takes it to start, stop, remap or hand over a queue.
//! Holding a slot's lock is what keeps the guest memory its queue points into mapped, so a
//! burst never races a memory-table change or a disconnect.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_utils::CachePadded;

use crate::l2::VlanMode;
use crate::virtio::{QueueStats, VirtQueue};

/// Port ids are small integers; this many may exist at once.
pub const MAX_PORTS: usize = 1024;

/// A queue slot: the running queue, if any, and its counters (which outlive the queue).
#[derive(Default)]
pub struct QueueSlot {
    locked: AtomicBool,
    queue: UnsafeCell<Option<VirtQueue>>,
    /// Counters of whatever queue runs in this slot.
    pub stats: QueueStats,
}

// SAFETY: `queue` is only reached through a `SlotGuard`, which exists only while `locked` is
// held by its creator; VirtQueue is Send.
unsafe impl Sync for QueueSlot {}
// SAFETY: as above.
unsafe impl Send for QueueSlot {}

/// Exclusive access to a slot's queue.
pub struct SlotGuard<'a> {
    slot: &'a QueueSlot,
}

impl QueueSlot {
    /// Takes the lock if it is free.
    #[inline(always)]
    pub fn try_lock(&self) -> Option<SlotGuard<'_>> {
        // `then`, not `then_some`: a guard built eagerly on a failed attempt would be dropped
        // at once and release the lock its real holder still has.
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then(|| SlotGuard { slot: self })
    }

    /// Takes the lock, waiting for a burst in progress to finish.
    pub fn lock(&self) -> SlotGuard<'_> {
        let mut spins = 0u32;
        loop {
            if let Some(g) = self.try_lock() {
                return g;
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                // The holder may be descheduled on a busy 2-core machine.
                std::thread::yield_now();
            }
        }
    }

    /// Whether a queue is installed (racy; for display).
    pub fn is_running(&self) -> bool {
        self.lock().is_some()
    }
}

impl Deref for SlotGuard<'_> {
    type Target = Option<VirtQueue>;
    fn deref(&self) -> &Self::Target {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.slot.queue.get() }
    }
}

impl DerefMut for SlotGuard<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        // SAFETY: the guard holds the lock, so this is the only reference.
        unsafe { &mut *self.slot.queue.get() }
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.slot.locked.store(false, Ordering::Release);
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
}

impl Port {
    /// A port with `pairs` queue pairs, none running.
    pub fn new(id: u16, name: String, vlan: VlanMode, mac: [u8; 6], pairs: u16) -> Self {
        let slots = |n: u16| (0..n.max(1)).map(|_| CachePadded::new(QueueSlot::default())).collect();
        Port { id, name, vlan, mac, txq: slots(pairs), rxq: slots(pairs) }
    }

    /// Number of queue pairs.
    pub fn pairs(&self) -> u16 {
        self.txq.len() as u16
    }

    /// The slot for virtqueue `index` (2k = guest RX of pair k, 2k+1 = guest TX).
    pub fn slot(&self, index: usize) -> Option<&QueueSlot> {
        let pair = index / 2;
        if index.is_multiple_of(2) { self.rxq.get(pair) } else { self.txq.get(pair) }.map(|s| &**s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_failed_try_lock_leaves_the_holder_locked() {
        let slot = QueueSlot::default();
        let held = slot.try_lock().expect("free slot locks");
        assert!(slot.try_lock().is_none());
        assert!(slot.try_lock().is_none(), "a failed attempt must not release the holder's lock");
        drop(held);
        assert!(slot.try_lock().is_some());
    }
}
