//! Receive: taking a burst of packets from a source queue (a guest's transmit ring, an
//! uplink's device).

use super::*;
use crate::uplink::tap::{Recv, TapQueue, VNET_HDR};
use crate::virtio::VirtQueue;

/// How many heads to take from virtio transmit ring `q` now (None: none). A ring whose indices
/// are garbage is stopped rather than guessed at; the guest gets it back when it resets the
/// device.
#[inline(always)]
pub(super) fn heads(
    q: &mut VirtQueue,
    b: &mut Batching,
    stats: &QueueStats,
    port: &str,
    pair: usize,
) -> Option<usize> {
    if q.broken {
        return None;
    }
    match q.ring.avail_pending() {
        Ok(0) => None,
        Ok(n) if b.wait == 0 => Some((n as usize).min(BURST)),
        Ok(n) => batch_hold(q, n as usize, b),
        Err(e) => {
            q.broken = true;
            stats.drop(DropReason::Malformed, 1);
            tracing::warn!(port, pair, "stopping transmit queue: {e}");
            None
        }
    }
}

impl Datapath {
    /// One burst from a TAP device: up to a burst of frames read into the queue's staging
    /// buffers (the kernel's copy), then described and forwarded like a guest's.
    #[inline(always)]
    pub(super) fn burst_tap(&mut self, src: &Port, t: &mut TapQueue, now: u32, c: &mut SrcCounts) -> usize {
        let mut n = 0;
        // Frames dropped on reading (cut by the kernel) take a try each: a device full of them
        // cannot keep the thread here.
        for _ in 0..2 * BURST {
            if n == BURST {
                break;
            }
            let g = match t.recv(n) {
                Recv::Frame(g) => g,
                Recv::Truncated => {
                    c.malformed += 1;
                    continue;
                }
                Recv::Empty | Recv::Gone => break,
            };
            let p = &mut self.desc.pkts[n];
            *p = PacketRef { give_back: false, ..PacketRef::default() };
            if g.len() >= VNET_HDR + 14 {
                self.desc.segs[n][0] = g;
                p.nseg = 1;
                p.len = g.len() - VNET_HDR;
                p.action = Action::Flood;
            } else {
                c.malformed += 1;
            }
            n += 1;
        }
        if n == 0 {
            return 0;
        }
        c.kernel_copies += n as u64;
        let spoof = src.policy.ingress_on() && src.policy.spoof_on();
        self.describe_frames(n, VNET_HDR, t.caps, spoof, c);
        self.forward(src, VNET_HDR, n, now, c);
        n
    }
}

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
    let now = crate::clock::ticks();
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
