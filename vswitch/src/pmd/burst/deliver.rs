use super::*;
use crate::clock::now_ns;
use crate::l2::flow::{flow_hash, FLOW_LOOK};
use crate::l2::VlanMode;
use crate::offload::{self, How};
use crate::policy::Held;
use crate::port::MAX_PORTS;
use crate::virtio::{QueueStats, VirtQueue};
use shaping::Shaper;

use super::super::copy::{out_len, read_bytes, Frame};
use super::fill::{Tally, VirtSink};
use super::shaped::release_held;
use super::viommu::{drain_parked, has_parked};

impl Datapath {
    /// For each destination port: lock one of its receive queues once, copy every packet bound
    /// to it straight from the sender's memory, publish, interrupt at most once.
    pub(super) fn deliver(&mut self, src: &Port, src_hdr: u32, n: usize, c: &mut SrcCounts) {
        // One pass over the burst: whether any packet floods, and by destination port (a bit
        // per port in `named`, port order) the packets bound to it, so that each destination
        // looks only at its own: asking every port whether a packet is
        // bound to it cost ports x packets compares (2,048 per burst in a 64-port mesh), and
        // so did scanning the whole burst for each named port (~290 instructions per frame in
        // a 64-port mesh, where a burst names up to 32 ports).
        let mut any_flood = false;
        let mut named = [0u64; MAX_PORTS / 64];
        for (i, p) in self.desc.pkts[..n].iter().enumerate() {
            match p.action {
                Action::Unicast(d) => {
                    let d = d as usize % MAX_PORTS;
                    named[d / 64] |= 1 << (d % 64);
                    self.dest_sets[d] |= 1 << i;
                }
                Action::Flood => any_flood = true,
                _ => {}
            }
        }
        if !any_flood && named.iter().all(|&w| w == 0) {
            return;
        }
        self.spread.hashed = 0;
        // Borrow the port table out of self for the loop (no Arc clone per destination).
        let ports = std::mem::take(&mut self.ports);
        if any_flood {
            for d in each_port(&named) {
                self.dest_sets[d] = 0;
            }
            for k in 0..self.port_ids.len() {
                let d = self.port_ids[k];
                if d == src.id {
                    continue;
                }
                let Some(dport) = ports[d as usize].as_deref() else { continue };
                self.deliver_to(dport, src_hdr, ((1u64 << n) - 1) as PktSet, c);
            }
        } else {
            // Every destination's first ring lines start loading before the first lock: a
            // burst to many ports otherwise waits for each port's lines in turn (another
            // CPU's guest wrote them last).
            for d in each_port(&named) {
                if let Some(dport) = ports.get(d).and_then(|p| p.as_deref()) {
                    dport.rxq[0].prefetch();
                }
            }
            for d in each_port(&named) {
                let set = std::mem::take(&mut self.dest_sets[d]);
                if d == src.id as usize {
                    continue;
                }
                let Some(dport) = ports.get(d).and_then(|p| p.as_deref()) else { continue };
                self.deliver_to(dport, src_hdr, set, c);
            }
        }
        self.ports = ports;
        // Floods that found no member port of their VLAN.
        c.no_route +=
            self.desc.pkts[..n].iter().filter(|p| p.action == Action::Flood && p.targets == 0).count() as u64;
    }

    /// Delivers the burst's packets bound to `dport`. A port with several queue pairs gets
    /// each packet on a running receive queue chosen by its flow's hash: a flow stays in order
    /// on one queue, flows spread, and a guest running fewer pairs than offered gets
    /// everything on those it runs. A shaped port is filled through its first queue only (the
    /// shaper's held packets are a suffix of one used ring).
    /// Only the packets in `set` are looked at (a burst that floods gives every port all of them).
    pub(super) fn deliver_to(&mut self, dport: &Port, src_hdr: u32, set: PktSet, c: &mut SrcCounts) {
        let pairs = dport.rxq.len().min(32);
        if pairs == 1 || dport.policy.egress_on() {
            return self.deliver_into(dport, 0, false, src_hdr, set, c);
        }
        let mut live = [0u8; 32];
        let mut nl = 0usize;
        for (k, slot) in dport.rxq[..pairs].iter().enumerate() {
            if slot.live() {
                live[nl] = k as u8;
                nl += 1;
            }
        }
        if nl <= 1 {
            // One running queue, or none (the delivery counts the losses).
            return self.deliver_into(dport, live[0] as usize, false, src_hdr, set, c);
        }
        let mut chosen = 0u32;
        for i in each(set) {
            let p = &self.desc.pkts[i];
            if p.action != Action::Unicast(dport.id) && p.action != Action::Flood {
                continue;
            }
            if self.spread.hashed & (1 << i) == 0 {
                self.spread.hashes[i] = self.flow_hash(i, src_hdr);
                self.spread.hashed |= 1 << i;
            }
            let q = live[(self.spread.hashes[i] % nl as u32) as usize];
            self.spread.qsel[i] = q;
            chosen |= 1 << q;
        }
        for q in 0..pairs {
            if chosen & (1 << q) != 0 {
                self.deliver_into(dport, q, true, src_hdr, set, c);
            }
        }
    }

    /// Packet `i`'s flow hash, from its first bytes in the sender's memory (no snapshot: a
    /// guest racing it can only pick another queue of the same receiver).
    #[inline(never)]
    pub(super) fn flow_hash(&self, i: usize, src_hdr: u32) -> u32 {
        let p = &self.desc.pkts[i];
        let mut b = [0u8; FLOW_LOOK];
        let f = Frame { segs: &self.desc.segs[i][..p.nseg as usize], skip: src_hdr, len: p.len, head: &[] };
        // SAFETY: the chain was walked and checked; the sender's queue lock is held.
        let got = unsafe { read_bytes(&f, &mut b) };
        flow_hash(&b[..got])
    }

    /// Delivers into receive queue `pick` of `dport` the packets bound to the port (only those
    /// whose `qsel` is `pick` if `by_queue`): the sink's kind is matched once here.
    pub(super) fn deliver_into(
        &mut self,
        dport: &Port,
        pick: usize,
        by_queue: bool,
        src_hdr: u32,
        set: PktSet,
        c: &mut SrcCounts,
    ) {
        let d = Dest { port: dport, slot: &dport.rxq[pick], pick: pick as u8, by_queue };
        let mut guard = d.slot.lock();
        match guard.as_mut() {
            Some(Queue::Virtio(rq)) if !rq.broken => self.fill_virtio(&d, rq, src_hdr, set, c),
            Some(Queue::Tap(t)) if !t.broken() => self.send_tap(&d, t, src_hdr, set, c),
            Some(Queue::NicTx(t)) if !t.wire.broken() => self.send_nic(&d, t, src_hdr, set, c),
            Some(Queue::AccelRx(a)) if !a.shell.broken => self.send_accel(&d, a, src_hdr, set, c),
            // Not running (not connected, stopped, its device gone): every packet for it has
            // no buffer, floods included (as a down port counts what it could not send).
            _ => self.lost(&d, set),
        }
    }

    /// Counts the packets bound to a destination that is not running.
    #[cold]
    fn lost(&mut self, d: &Dest<'_>, set: PktSet) {
        let mut lost = 0;
        for i in each(set) {
            if d.by_queue && self.spread.qsel[i] != d.pick {
                continue;
            }
            let p = &mut self.desc.pkts[i];
            let member = d.port.vlan.egress(p.vlan).is_some();
            if p.action == Action::Unicast(d.port.id) || (p.action == Action::Flood && member) {
                lost += 1;
                p.targets += 1;
            }
        }
        d.slot.stats.drop(DropReason::NoBuffer, lost);
    }

    /// Whether packet `i` goes into `d` and with which tag edit (it then counts `d` as a
    /// target). A unicast the port's VLAN rule refuses is counted filtered.
    #[inline(always)]
    pub(super) fn edit_for(&mut self, d: &Dest<'_>, i: usize, c: &mut SrcCounts) -> Option<TagEdit> {
        if d.by_queue && self.spread.qsel[i] != d.pick {
            return None;
        }
        let p = &mut self.desc.pkts[i];
        let out_tagged = match p.action {
            Action::Unicast(x) if x == d.port.id => match d.port.vlan.egress(p.vlan) {
                Some(t) => t,
                None => {
                    c.filtered += 1;
                    return None;
                }
            },
            Action::Flood => d.port.vlan.egress(p.vlan)?,
            _ => return None,
        };
        p.targets += 1;
        Some(VlanMode::edit(p.tci, p.vlan, out_tagged))
    }

    /// Delivers into a guest's virtio receive queue: pass 1 reserves receive buffers for every
    /// packet bound here and prefetches them for writing (nothing copied yet, so a packet
    /// without a buffer costs no copy); pass 2 (`fill`) copies; then publish and signal once.
    fn fill_virtio(
        &mut self,
        d: &Dest<'_>,
        rq: &mut VirtQueue,
        src_hdr: u32,
        set: PktSet,
        c: &mut SrcCounts,
    ) {
        let shaped = d.port.policy.egress_on();
        // A queue that may hold entries back shows none before its publish.
        rq.ring.set_eager(!shaped && rq.held == 0);
        let t = Tally::default();
        // The shaper, if any: taken after the queue's lock, released with it.
        let mut eg = if shaped { Some(d.port.policy.egress.lock()) } else { None };
        let mut shaper: Option<&mut Shaper<Held>> = eg.as_mut().and_then(|g| g.as_mut());
        if let Some(s) = shaper.as_deref_mut() {
            s.advance(now_ns());
            release_held(rq, s);
        }
        // Behind a vIOMMU, a packet whose receive buffer is not translated yet is parked, and
        // so is every later one until the parked ones are out (the guest sees them in order).
        // Not for a shaped port: its shaper decides on buffers it has reserved.
        let parking = !shaped && rq.iotlb.is_some();
        if parking && has_parked(rq) {
            drain_parked(rq).count(&d.slot.stats);
        }
        let pending = rq.ring.avail_pending().unwrap_or(0) as usize;
        // As many as there are packets for it (a mesh's destination gets one or two of a burst).
        for k in 0..pending.min(set.count_ones() as usize) {
            rq.ring.prefetch_desc(rq.ring.peek_head(k as u16));
        }
        let mut s = VirtSink { rq, shaper, parking, src_hdr, planned: 0, t };
        for i in each(set) {
            let Some(edit) = self.edit_for(d, i, c) else { continue };
            let p = &self.desc.pkts[i];
            if !(p.offload && offload::how(&self.desc.vhdrs[i], s.rq.caps) == How::Segment) {
                self.reserve(&mut s, Unit { pkt: i, edit, seg: 0, wire_len: out_len(p.len, edit) });
                continue;
            }
            // A 64 KiB TCP frame for a receiver without TSO: cut in software, each segment a
            // packet of its own. Its segments are copied in a pass of their own, so one
            // segmenter serves them.
            self.fill(&mut s);
            let Some(sg) = self.segmenter(d, i, edit, &mut s.t) else { continue };
            for k in 0..sg.count() {
                let wire_len = sg.header_len() + sg.payload(k).1;
                self.reserve(&mut s, Unit { pkt: i, edit, seg: k as u16 + 1, wire_len });
            }
            self.fill(&mut s);
        }
        self.fill(&mut s);
        let VirtSink { rq, shaper, t, .. } = s;
        rq.held += t.new_held;
        // Counted before the guest can see the packets: counters never lag what arrived.
        t.count(&d.slot.stats);
        rq.publish();
        if rq.notify() {
            bump(&d.slot.stats.interrupts, 1);
        }
        d.slot.set_hints(rq.ring.next_lines());
        if let Some(sh) = shaper {
            d.port.policy.held.store(sh.len() as u32, std::sync::atomic::Ordering::Relaxed);
            bump(&d.port.policy.stats.shaped_held, t.shaped_held);
            bump(&d.port.policy.stats.shaped_dropped, t.shaped_drop);
        }
        drop(eg);
    }

    /// Sets up the segmenter for packet `i` going to `d` (None: its headers no longer parse,
    /// counted).
    #[cold]
    fn segmenter(&mut self, d: &Dest<'_>, i: usize, edit: TagEdit, t: &mut Tally) -> Option<Segmenter> {
        let (p, vh) = (&self.desc.pkts[i], self.desc.vhdrs[i]);
        match Segmenter::new(
            &self.desc.heads[i][..p.head_len as usize],
            p.len,
            vh.gso_size,
            vh.gso_v6(),
            edit,
        ) {
            Ok(sg) => {
                self.seg = Some(sg);
                t.segmented += 1;
                Some(sg)
            }
            Err(e) => {
                // Checked when it was received: the sender rewrote its headers since.
                tracing::debug!(port = %d.port.name, "GSO frame dropped: {e}");
                t.bad += 1;
                None
            }
        }
    }
}

/// A set of a burst's packets: bit `i` is packet `i`.
pub(super) type PktSet = u32;
const _: () = assert!(BURST <= PktSet::BITS as usize, "a burst's packets fit a PktSet");

/// The packets of `set`, in order.
#[inline(always)]
pub(super) fn each(set: PktSet) -> impl Iterator<Item = usize> {
    each_bit(u64::from(set))
}

/// The ports whose bits are set in `named` (bit `d % 64` of word `d / 64`), in order.
#[inline(always)]
fn each_port(named: &[u64]) -> EachPort<'_> {
    EachPort { words: named, w: 0, bits: named.first().copied().unwrap_or(0) }
}

/// See [`each_port`] (a plain loop: with `flat_map` a 64-port mesh took ~20 more
/// instructions per frame).
struct EachPort<'a> {
    words: &'a [u64],
    w: usize,
    bits: u64,
}

impl Iterator for EachPort<'_> {
    type Item = usize;
    #[inline(always)]
    fn next(&mut self) -> Option<usize> {
        while self.bits == 0 {
            self.w += 1;
            self.bits = *self.words.get(self.w)?;
        }
        let i = self.bits.trailing_zeros() as usize;
        self.bits &= self.bits - 1;
        Some(self.w * 64 + i)
    }
}

/// The set bits of `bits`, lowest first.
#[inline(always)]
fn each_bit(mut bits: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (bits != 0).then(|| {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            i
        })
    })
}

/// One destination queue of a burst: the port, its receive queue `pick`, and whether only the
/// packets hashed to that queue go there.
pub(super) struct Dest<'a> {
    pub(super) port: &'a Port,
    pub(super) slot: &'a QueueSlot,
    pub(super) pick: u8,
    pub(super) by_queue: bool,
}

impl Tally {
    /// Adds one delivery's counts to the receive queue's counters.
    fn count(&self, s: &QueueStats) {
        bump(&s.packets, self.pk);
        bump(&s.bytes, self.by);
        bump(&s.copies, self.pk);
        bump(&s.bytes_copied, self.copied);
        s.drop(DropReason::NoBuffer, self.no_buf + self.missed);
        s.drop(DropReason::Malformed, self.bad);
        s.drop(DropReason::Policy, self.shaped_drop);
        bump(&s.gso_whole, self.whole);
        bump(&s.gso_segmented, self.segmented);
        bump(&s.csum_completed, self.completed);
    }
}
