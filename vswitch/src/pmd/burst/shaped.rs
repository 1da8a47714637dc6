use super::*;
use shaping::Shaper;

use crate::clock::now_ns;
use crate::policy::Held;
use crate::virtio::VirtQueue;

impl Datapath {
    /// Publishes what a shaped port's shaper lets go now, for every port this thread knows
    /// that holds packets back. Returns nanoseconds until the next one may go, if any wait.
    pub fn release_shaped(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        for &id in &self.port_ids {
            let Some(port) = self.ports[id as usize].as_deref() else { continue };
            if port.policy.held.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                continue;
            }
            let slot: &QueueSlot = &port.rxq[0];
            let Some(mut g) = slot.try_lock() else {
                next = Some(0); // busy: someone is delivering to it; look again soon
                continue;
            };
            let mut eg = port.policy.egress.lock();
            let Some(s) = eg.as_mut() else { continue };
            match g.virtio_mut() {
                Some(rq) => {
                    s.advance(now_ns());
                    if release_held(rq, s) {
                        rq.publish();
                        if rq.notify() {
                            bump(&slot.stats.interrupts, 1);
                        }
                    }
                }
                // The queue stopped and published everything when it did: what the shaper
                // still lists is gone.
                None => s.drain().for_each(drop),
            }
            port.policy.held.store(s.len() as u32, std::sync::atomic::Ordering::Relaxed);
            if let Some(w) = s.next_release_ns() {
                next = Some(next.map_or(w, |n| n.min(w)));
            }
        }
        next
    }
}

/// Takes from the shaper every held packet its tokens allow and un-holds its used entries
/// (the caller publishes). Entries of an earlier queue in this slot were published when that
/// queue stopped; they are just forgotten. Returns whether anything was released.
pub(super) fn release_held(rq: &mut VirtQueue, s: &mut Shaper<Held>) -> bool {
    let mut any = false;
    while let Some(h) = s.release() {
        if h.epoch == rq.epoch {
            rq.held = rq.held.saturating_sub(h.entries);
            any = true;
        }
    }
    any
}
