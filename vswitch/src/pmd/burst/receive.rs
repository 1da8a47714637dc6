use super::*;
use crate::virtio::VirtQueue;

/// Batching under load: how many heads to take from transmit queue `q` with `n` pending
/// (None: none yet). A guest that sends full bursts is left one burst in its ring until a
/// second one is queued or `wait` ticks have passed.
///
/// Why: DPDK's virtio driver reclaims its transmit buffers lazily, all at once when more
/// than ring size - 32 are used. A switch that drains the ring as fast as the guest fills
/// it makes the guest free a ring's worth of mbufs at once, which overflows its mempool
/// cache (250 by default) into the shared ring and later refills it from there with cold
/// mbufs. Leaving a burst in the ring keeps the used count below that threshold, so the
/// guest reclaims a burst at a time.
#[inline]
pub(super) fn batch_hold(q: &mut VirtQueue, n: usize, b: &mut Batching) -> Option<usize> {
    let full = BURST.min(q.ring.size() as usize / 4).max(1);
    let n = if n < 2 * full { q.ring.avail_pending_fresh().map_or(n, |f| f as usize) } else { n };
    if !q.loaded {
        q.loaded = n >= full;
        return Some(n.min(BURST));
    }
    if n >= 2 * full {
        q.wait_since = 0;
        return Some((n - full).min(BURST));
    }
    let now = crate::pmd::ticks();
    if q.wait_since == 0 {
        q.wait_since = now;
        b.holds += 1;
        return None;
    }
    if now.wrapping_sub(q.wait_since) < b.wait {
        return None;
    }
    // Waited long enough: the guest is not keeping up a burst per wait.
    q.wait_since = 0;
    q.loaded = false;
    b.expired += 1;
    Some(n.min(BURST))
}
