use super::*;
use shaping::{Offer, Shaper};
use virtq::{walk_chain, ChainError};

use crate::offload::{self, How};
use crate::policy::Held;
use crate::virtio::VirtQueue;

use super::super::copy::{copy_frame, Frame};
use super::viommu::{has_parked, rx_misses};

/// Starts fetching a destination buffer's first lines: the line(s) the frame will fill for
/// writing, but a line holding only the virtio-net header (DPDK's virtio puts it at the end of
/// the mbuf headroom, the frame on the next line) just for reading. The header is usually
/// already right and then left alone; taking its line exclusively would make the driver fetch
/// it back from us when it reads `num_buffers`.
#[inline(always)]
fn prefetch_write(s: Grant<Rw>, hdr_len: u32, wire_len: u32) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch never faults.
    unsafe {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0, _MM_HINT_T0};
        let p = s.as_ptr() as *const i8;
        let frame = p.wrapping_add(hdr_len as usize);
        if (p as usize ^ frame as usize) >= 64 {
            _mm_prefetch::<_MM_HINT_T0>(p);
        }
        _mm_prefetch::<_MM_HINT_ET0>(frame);
        if (frame as usize & 63) + wire_len as usize > 64 {
            _mm_prefetch::<_MM_HINT_ET0>(frame.wrapping_add(64));
        }
    }
}

impl Datapath {
    /// Reserves receive buffers for unit `u` (planned at `planned`, after a copy pass if the
    /// plan is full), or parks it, or counts why it cannot go. Returns the plans now made.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn reserve(
        &mut self,
        rq: &mut VirtQueue,
        shaper: Option<&mut Shaper<Held>>,
        parking: bool,
        u: Unit,
        mut planned: usize,
        src_hdr: u32,
        t: &mut Tally,
    ) -> usize {
        if planned == BURST {
            planned = self.fill(rq, planned, src_hdr, t);
        }
        if parking && has_parked(rq) {
            if !self.park(rq, u, src_hdr) {
                t.missed += 1;
            }
            return planned;
        }
        let need = rq.hdr_len as u32 + u.wire_len;
        let plan = Plan { pkt: u.pkt as u8, edit: u.edit, seg: u.seg, nseg: 1, nch: 1, ..Plan::default() };
        let res = match take_one_rx(rq, need) {
            Some((head, one)) => Ok(Plan { head, one, ..plan }),
            None => {
                let rx = &mut self.rx[planned];
                take_rx(rq, need, &mut rx.segs, &mut rx.chains).map(|(nseg, nch)| Plan {
                    nseg: nseg as u8,
                    nch: nch as u8,
                    head: rx.chains[0].0,
                    one: rx.segs[0],
                    ..plan
                })
            }
        };
        match res {
            Ok(plan) => {
                if let Some(s) = shaper {
                    // Decided before the copy: a packet the shaper drops is never copied.
                    match s.offer(u.wire_len, Held { epoch: rq.epoch, entries: plan.nch as u16 }) {
                        Offer::Send(_) => {}
                        Offer::Queued => {
                            t.new_held += plan.nch as u16;
                            t.shaped_held += 1;
                        }
                        Offer::Dropped(_) => {
                            rq.ring.unpop(plan.nch as u16);
                            t.shaped_drop += 1;
                            return planned;
                        }
                    }
                }
                prefetch_write(plan.one, rq.hdr_len as u32, u.wire_len);
                self.plans[planned] = plan;
                planned += 1;
            }
            Err(RxFail::NoBuffer) => t.no_buf += 1,
            Err(RxFail::Miss(iova)) => {
                // The translation is asked for (with those of every buffer posted after it);
                // the unit waits for it, parked, or is dropped on a shaped port.
                rx_misses(rq, iova, !parking);
                if !parking || !self.park(rq, u, src_hdr) {
                    t.missed += 1;
                }
            }
            Err(RxFail::Malformed(nch)) => {
                // Returned in the copy pass with the others, so used entries keep ring order
                // (VIRTIO_F_IN_ORDER). Behind a held packet they are held with it.
                t.bad += 1;
                if let Some(h) = shaper.and_then(|s| s.back_mut()) {
                    if h.epoch == rq.epoch {
                        h.entries += nch as u16;
                        t.new_held += nch as u16;
                    }
                }
                self.plans[planned] =
                    Plan { pkt: u.pkt as u8, nch: nch as u8, empty: true, ..Plan::default() };
                planned += 1;
            }
        }
        planned
    }

    /// The copy pass: the late copies of every planned unit, straight from the senders'
    /// memory, then their used entries (in ring order). Returns 0, the plans left.
    pub(super) fn fill(&mut self, rq: &mut VirtQueue, planned: usize, src_hdr: u32, t: &mut Tally) -> usize {
        let hdr_len = rq.hdr_len as u32;
        for k in 0..planned {
            let plan = self.plans[k];
            if plan.empty {
                for &(head, _) in &self.rx[k].chains[..plan.nch as usize] {
                    rq.ring.push_used(head, 0);
                }
                continue;
            }
            let i = plan.pkt as usize;
            let p = &self.pkts[i];
            let one = plan.nch == 1 && plan.nseg == 1;
            let dst =
                if one { std::slice::from_ref(&plan.one) } else { &self.rx[k].segs[..plan.nseg as usize] };
            let wrote = if !p.offload {
                let mut hdr = [0u8; 12];
                hdr[10..12].copy_from_slice(&(plan.nch as u16).to_le_bytes());
                // The frame starts after the sender's own virtio-net header.
                let f = Frame {
                    segs: &self.segs[i][..p.nseg as usize],
                    skip: src_hdr,
                    len: p.len,
                    head: &self.heads[i][..p.head_len as usize],
                };
                // SAFETY: both chains were walked and bounds-checked; the sender's queue lock
                // (held by our caller) and this queue's lock keep both memories mapped; room
                // for the unit was reserved.
                unsafe { copy_frame(&f, plan.edit, &hdr[..hdr_len as usize], dst) }
            } else {
                // SAFETY: as above.
                let (wrote, how) =
                    unsafe { self.render(i, plan.edit, plan.seg, plan.nch, rq.caps, hdr_len, src_hdr, dst) };
                match how {
                    How::Complete => t.completed += 1,
                    How::Pass if self.vhdrs[i].gso_type != offload::GSO_NONE => t.whole += 1,
                    _ => {}
                }
                wrote
            };
            if one {
                rq.ring.push_used(plan.head, wrote);
            } else {
                push_used_spread(rq, &self.rx[k].chains[..plan.nch as usize], wrote);
            }
            t.pk += 1;
            let by = wrote.saturating_sub(hdr_len) as u64;
            t.by += by;
            // A pushed tag is the switch's own bytes, not copied from the sender.
            t.copied += by.saturating_sub(if matches!(plan.edit, TagEdit::Push(_)) { 4 } else { 0 });
        }
        0
    }
}

/// One thing to deliver into one receive queue: a packet, or one segment of it.
#[derive(Clone, Copy)]
pub(super) struct Unit {
    pub(super) pkt: usize,
    pub(super) edit: TagEdit,
    /// 0: the whole packet; k: segment k - 1.
    pub(super) seg: u16,
    /// Bytes after the receiver's virtio-net header.
    pub(super) wire_len: u32,
}

/// What one delivery into one queue did.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) pk: u64,
    pub(super) by: u64,
    pub(super) copied: u64,
    pub(super) no_buf: u64,
    pub(super) bad: u64,
    pub(super) missed: u64,
    pub(super) new_held: u16,
    pub(super) shaped_drop: u64,
    pub(super) shaped_held: u64,
    pub(super) whole: u64,
    pub(super) segmented: u64,
    pub(super) completed: u64,
}

/// The usual case: the next receive chain is one buffer with room for `need` bytes. Leaves
/// the ring untouched otherwise (the general `take_rx` decides).
#[inline(always)]
pub(super) fn take_one_rx(rq: &mut VirtQueue, need: u32) -> Option<(u16, Grant<Rw>)> {
    if rq.ring.avail_pending().ok()? == 0 {
        return None;
    }
    let head = rq.ring.peek_head(0);
    if head >= rq.ring.size() {
        return None;
    }
    let d = rq.ring.desc(head);
    if d.flags != virtq::ring::DESC_F_WRITE || d.len < need {
        return None;
    }
    let g = rq.dma.grant::<Rw>(d.addr, d.len).ok()?;
    rq.ring.pop_head();
    Some((head, g))
}

/// Reserves receive buffers for `need` bytes: one chain, or several with MRG_RXBUF.
/// On shortage the chains taken go back to the available ring untouched.
pub(super) fn take_rx(
    rq: &mut VirtQueue,
    need: u32,
    segs: &mut [Grant<Rw>; RX_SEGS],
    chains: &mut [(u16, u32); MAX_RX_CHAINS],
) -> Result<(usize, usize), RxFail> {
    let (mut nseg, mut nch, mut cap) = (0usize, 0usize, 0u32);
    while cap < need {
        let limit = if rq.mrg_rxbuf { MAX_RX_CHAINS } else { 1 };
        let pending = rq.ring.avail_pending().unwrap_or_else(|_| {
            rq.broken = true;
            0
        });
        if nch == limit || pending == 0 || nseg == RX_SEGS {
            rq.ring.unpop(nch as u16);
            return Err(RxFail::NoBuffer);
        }
        let head = rq.ring.pop_head();
        match walk_chain(&rq.ring, &mut rq.dma, head, rq.indirect, u32::MAX >> 1, &mut segs[nseg..]) {
            Ok(ch) => {
                chains[nch] = (head, ch.len);
                nch += 1;
                nseg += ch.nseg as usize;
                cap = cap.saturating_add(ch.len);
            }
            Err(ChainError::Miss { iova }) => {
                rq.ring.unpop(nch as u16 + 1);
                return Err(RxFail::Miss(iova));
            }
            Err(e) => {
                // A bad buffer is consumed (returned empty) along with any taken before it:
                // the guest sees zero-length completions, never our bytes in a bad place.
                if e != ChainError::BadHead {
                    chains[nch] = (head, 0);
                    nch += 1;
                }
                return Err(RxFail::Malformed(nch));
            }
        }
    }
    Ok((nseg, nch))
}

/// Used entries for a packet spread over `chains` (head, capacity): each buffer reports
/// what it holds of the `wrote` bytes.
pub(super) fn push_used_spread(rq: &mut VirtQueue, chains: &[(u16, u32)], wrote: u32) {
    let mut left = wrote;
    for &(head, cap) in chains {
        let k = left.min(cap);
        rq.ring.push_used(head, k);
        left -= k;
    }
}
