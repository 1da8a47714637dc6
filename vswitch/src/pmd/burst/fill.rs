use super::*;
use shaping::{Offer, Shaper};

use crate::offload::{self, How};
use crate::policy::Held;
use crate::virtio::VirtQueue;

use super::super::copy::{copy_frame, Frame};
use super::render::Headers;
use super::rxbufs::{push_used_spread, take_one_rx, take_rx};
use super::viommu::{has_parked, rx_misses};

/// Starts fetching a destination buffer's first lines: the line(s) the frame will fill for
/// writing, but a line holding only the virtio-net header (DPDK's virtio puts it at the end of
/// the mbuf headroom, the frame on the next line) just for reading. The header is usually
/// already right and then left alone; taking its line exclusively would make the driver fetch
/// it back from us when it reads `num_buffers`. (`_MM_HINT_ET0` is a plain `prefetcht0` in the
/// default x86-64 target, which lacks `prfchw`; a real `PREFETCHW` here and on the used entry
/// measured no different: `benches/results/2026-12-07-prefetchw-experiment.txt`.)
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

/// One delivery into a guest's receive queue in progress: the queue, its shaper, the units
/// planned so far (buffers reserved, copy to come) and the tally.
pub(super) struct VirtSink<'q> {
    pub(super) rq: &'q mut VirtQueue,
    pub(super) shaper: Option<&'q mut Shaper<Held>>,
    /// A unit whose receive buffer misses the IOTLB waits (parked) rather than being dropped.
    pub(super) parking: bool,
    /// The sender's virtio-net header length.
    pub(super) src_hdr: u32,
    /// Units planned in `Datapath::plans`.
    pub(super) planned: usize,
    pub(super) t: Tally,
}

impl Datapath {
    /// Reserves receive buffers for unit `u` (after a copy pass if the plan is full), or parks
    /// it, or counts why it cannot go.
    #[inline(always)]
    pub(super) fn reserve(&mut self, s: &mut VirtSink<'_>, u: Unit) {
        if s.planned == BURST {
            self.fill(s);
        }
        if s.parking && has_parked(s.rq) {
            if !self.park(s.rq, u, s.src_hdr) {
                s.t.missed += 1;
            }
            return;
        }
        match self.take_buffers(s, u) {
            Ok(plan) => self.accept(s, u, plan),
            Err(e) => self.refuse(s, u, e),
        }
    }

    /// Takes receive buffers for `u` from the ring: the usual one buffer, or a chain or a
    /// mergeable set (kept in `rx` at the plan's index).
    #[inline(always)]
    fn take_buffers(&mut self, s: &mut VirtSink<'_>, u: Unit) -> Result<Plan, RxFail> {
        let need = s.rq.hdr_len as u32 + u.wire_len;
        let plan = Plan { pkt: u.pkt as u8, edit: u.edit, seg: u.seg, nseg: 1, nch: 1, ..Plan::default() };
        if let Some((head, one)) = take_one_rx(s.rq, need) {
            return Ok(Plan { head, one, ..plan });
        }
        let rx = &mut self.copy.rx[s.planned];
        take_rx(s.rq, need, &mut rx.segs, &mut rx.chains).map(|(nseg, nch)| Plan {
            nseg: nseg as u8,
            nch: nch as u8,
            head: rx.chains[0].0,
            one: rx.segs[0],
            ..plan
        })
    }

    /// Plans the copy of `u` into its reserved buffers, once the shaper (if any) lets it go:
    /// decided before the copy, so a packet the shaper drops is never copied.
    #[inline(always)]
    fn accept(&mut self, s: &mut VirtSink<'_>, u: Unit, plan: Plan) {
        if let Some(sh) = s.shaper.as_deref_mut() {
            match sh.offer(u.wire_len, Held { epoch: s.rq.epoch, entries: plan.nch as u16 }) {
                Offer::Send(_) => {}
                Offer::Queued => {
                    s.t.new_held += plan.nch as u16;
                    s.t.shaped_held += 1;
                }
                Offer::Dropped(_) => {
                    s.rq.ring.unpop(plan.nch as u16);
                    s.t.shaped_drop += 1;
                    return;
                }
            }
        }
        prefetch_write(plan.one, s.rq.hdr_len as u32, u.wire_len);
        self.copy.plans[s.planned] = plan;
        s.planned += 1;
    }

    /// Counts why `u` found no buffer, asks for a missing translation, and plans bad buffers'
    /// return.
    #[cold]
    fn refuse(&mut self, s: &mut VirtSink<'_>, u: Unit, e: RxFail) {
        match e {
            RxFail::NoBuffer => s.t.no_buf += 1,
            RxFail::Miss(iova) => {
                // The translation is asked for (with those of every buffer posted after it);
                // the unit waits for it, parked, or is dropped on a shaped port.
                rx_misses(s.rq, iova, !s.parking);
                if !s.parking || !self.park(s.rq, u, s.src_hdr) {
                    s.t.missed += 1;
                }
            }
            RxFail::Malformed(nch) => {
                // Returned in the copy pass with the others, so used entries keep ring order
                // (VIRTIO_F_IN_ORDER). Behind a held packet they are held with it.
                s.t.bad += 1;
                if let Some(h) = s.shaper.as_deref_mut().and_then(|sh| sh.back_mut()) {
                    if h.epoch == s.rq.epoch {
                        h.entries += nch as u16;
                        s.t.new_held += nch as u16;
                    }
                }
                self.copy.plans[s.planned] =
                    Plan { pkt: u.pkt as u8, nch: nch as u8, empty: true, ..Plan::default() };
                s.planned += 1;
            }
        }
    }

    /// The copy pass: the late copies of every planned unit, straight from the senders'
    /// memory, then their used entries (in ring order). While the guest migrates, the pass
    /// that also marks the dirty log runs instead (chosen once per pass, not per byte).
    #[inline(always)]
    pub(super) fn fill(&mut self, s: &mut VirtSink<'_>) {
        if s.rq.log.is_some() {
            self.fill_with::<true>(s)
        } else {
            self.fill_with::<false>(s)
        }
    }

    #[inline(always)]
    fn fill_with<const LOG: bool>(&mut self, s: &mut VirtSink<'_>) {
        let hdr_len = s.rq.hdr_len as u32;
        for k in 0..s.planned {
            let plan = self.copy.plans[k];
            if plan.empty {
                for &(head, _) in &self.copy.rx[k].chains[..plan.nch as usize] {
                    s.rq.ring.push_used(head, 0);
                }
                continue;
            }
            let one = plan.nch == 1 && plan.nseg == 1;
            let dst = if one {
                std::slice::from_ref(&plan.one)
            } else {
                &self.copy.rx[k].segs[..plan.nseg as usize]
            };
            // SAFETY: both chains were walked and bounds-checked; the sender's queue lock (held
            // by our caller) and this queue's lock keep both memories mapped; room for the unit
            // was reserved.
            let wrote = unsafe { self.copy_unit(&plan, s, dst) };
            if LOG && !crate::test_hooks::skip_rx_log() {
                s.rq.log_written(dst, wrote);
            }
            if one {
                s.rq.ring.push_used(plan.head, wrote);
            } else {
                push_used_spread(s.rq, &self.copy.rx[k].chains[..plan.nch as usize], wrote);
            }
            s.t.pk += 1;
            let by = wrote.saturating_sub(hdr_len) as u64;
            s.t.by += by;
            // A pushed tag is the switch's own bytes, not copied from the sender.
            s.t.copied += by.saturating_sub(if matches!(plan.edit, TagEdit::Push(_)) { 4 } else { 0 });
        }
        s.planned = 0;
    }

    /// Copies one planned unit into `dst`: a plain frame behind a fresh header, or (cold) one
    /// with an offload request rendered. Returns the bytes written.
    ///
    /// # Safety
    /// As for [`copy_frame`].
    #[inline(always)]
    unsafe fn copy_unit(&self, plan: &Plan, s: &mut VirtSink<'_>, dst: &[Grant<Rw>]) -> u32 {
        let i = plan.pkt as usize;
        let p = &self.desc.pkts[i];
        if !p.offload {
            let mut hdr = [0u8; 12];
            hdr[10..12].copy_from_slice(&(plan.nch as u16).to_le_bytes());
            // The frame starts after the sender's own virtio-net header.
            let f = Frame {
                segs: &self.desc.segs[i][..p.nseg as usize],
                skip: s.src_hdr,
                len: p.len,
                head: &self.desc.heads[i][..p.head_len as usize],
            };
            // SAFETY: forwarded.
            return unsafe { copy_frame(&f, plan.edit, &hdr[..s.rq.hdr_len as usize], dst) };
        }
        let u = Unit { pkt: i, edit: plan.edit, seg: plan.seg, wire_len: 0 };
        let fmt = Headers { caps: s.rq.caps, hdr_len: s.rq.hdr_len as u32, src_hdr: s.src_hdr };
        // SAFETY: forwarded.
        let (wrote, how) = unsafe { self.render(u, plan.nch, fmt, dst) };
        match how {
            How::Complete => s.t.completed += 1,
            How::Pass if self.desc.vhdrs[i].gso_type != offload::GSO_NONE => s.t.whole += 1,
            _ => {}
        }
        wrote
    }
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
