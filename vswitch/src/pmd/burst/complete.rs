use super::*;
use crate::virtio::{QueueStats, VirtQueue};

/// Returns every source buffer of the burst (after all copies are done), publishes, and
/// interrupts the sender if it asked.
#[inline(always)]
pub(super) fn complete(q: &mut VirtQueue, pkts: &[PacketRef], stats: &QueueStats) {
    for p in pkts {
        if p.give_back {
            q.ring.push_used(p.head, 0);
        }
    }
    q.publish();
    if q.notify() {
        bump(&stats.interrupts, 1);
    }
}
