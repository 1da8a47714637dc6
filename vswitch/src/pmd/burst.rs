//! One burst from one guest transmit queue: receive → describe → decide → deliver → complete.
//!
//! Nothing here allocates, takes a lock other than the destination queue's slot (once per
//! destination per burst), or makes a syscall other than an interrupt a guest asked for.

use std::sync::Arc;

use iommu::{Access, FaultReason, Grant, GrantWriter, Ro, Rw};
use shaping::{Colour, Offer, Shaper};

use crate::l2::flow::{flow_hash, FLOW_LOOK};
use crate::l2::{is_group, mac_from_bytes, Fdb, Mac, TagEdit, VlanMode};
use crate::offload::csum::Sum;
use crate::offload::gso::{self, Segmenter};
use crate::offload::{self, Caps, How, NetHdr};
use crate::policy::spoof::{self, SpoofReason, Verdict};
use crate::policy::{now_ns, Held};
use crate::port::{Port, QueueSlot};
use crate::vhost::iotlb::{MISS_TIMEOUT_NS, PARK_MAX};
use crate::virtio::chain::ChainError;
use crate::virtio::queue::bump;
use crate::virtio::{walk_chain, QueueStats, VirtQueue, MAX_SEGS};

use super::copy::{copy_frame, copy_range, frame_sum, out_len, read_bytes, read_prefix, Frame};

/// Most packets taken from a ring at once.
pub const BURST: usize = 32;
/// Largest frame accepted (jumbo 9216 plus a tag), without the virtio-net header.
pub const MAX_FRAME: u32 = 9220;
/// Most receive buffers (chains) one packet may fill with MRG_RXBUF: a 64 KiB TSO frame in
/// Linux's smallest mergeable buffers (1536 bytes) takes 43.
const MAX_RX_CHAINS: usize = 64;
/// Most receive segments one packet may fill.
const RX_SEGS: usize = 2 * MAX_SEGS;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Action {
    /// Dropped (already counted).
    #[default]
    Drop,
    /// To one port.
    Unicast(u16),
    /// To every other member of the VLAN.
    Flood,
}

/// What the describe and decide stages know of a packet: where its bytes are (in the sender's
/// memory, not copied) and where it goes.
#[derive(Clone, Copy, Debug, Default)]
struct PacketRef {
    head: u16,
    /// Whether the head is a real descriptor index that must go back to the used ring.
    give_back: bool,
    nseg: u8,
    /// Frame length (after the virtio-net header).
    len: u32,
    dst: Mac,
    src: Mac,
    tci: Option<u16>,
    vlan: u16,
    action: Action,
    /// Destination ports that took the packet on (delivered it or counted its drop).
    targets: u16,
    /// Bytes of the frame's snapshot in `Datapath::heads` (what decisions were made on, and
    /// what is delivered for those bytes).
    head_len: u8,
    /// The sender asked for an offload (its request is in `Datapath::vhdrs`).
    offload: bool,
}

/// The per-thread forwarding state and burst scratch space (no allocation per burst).
pub struct Datapath {
    /// Polling-thread index (picks which receive queue of a multi-queue port it fills).
    pub idx: usize,
    /// Live ports by id.
    pub ports: Vec<Option<Arc<Port>>>,
    /// Ids of live ports, for flooding.
    pub port_ids: Vec<u16>,
    /// The shared forwarding table.
    pub fdb: Arc<Fdb>,
    pkts: [PacketRef; BURST],
    segs: [[Grant<Ro>; MAX_SEGS]; BURST],
    plans: [Plan; BURST],
    rx: Box<[RxBufs; BURST]>,
    /// Each packet's first bytes, read once from the sender's memory: decisions and policy
    /// checks use them and the copy delivers them (no double fetch of what was checked).
    heads: Box<[[u8; HEAD]; BURST]>,
    /// Offload requests of the packets whose `offload` is set, checked when received.
    vhdrs: [NetHdr; BURST],
    /// The frame being cut into segments for one receiver.
    seg: Option<Segmenter>,
    /// Flow hashes of the burst's packets (those whose bit is set in `hashed`).
    hashes: [u32; BURST],
    hashed: u32,
    /// The receive queue each packet goes to, for the multi-queue port being delivered to.
    qsel: [u8; BURST],
    /// Batching under load (see `batch_hold`).
    pub batch: Batching,
}

/// Batching under load: a transmit queue whose guest sends full bursts is taken from only
/// when two bursts are queued, or after waiting `wait`, so one burst stays in the guest's
/// ring. See `batch_hold`.
#[derive(Debug, Default)]
pub struct Batching {
    /// Longest wait, in `ticks()` (0 = off).
    pub wait: u64,
    /// Times a queue started waiting for a second burst.
    pub holds: u64,
    /// Waits that ran out (the guest slowed down; a wait that often runs out is too short
    /// or not worth having).
    pub expired: u64,
}

/// Largest snapshot of a frame's first bytes: anti-spoofing's longest look (at neighbour
/// discovery options), and the whole L2-L4 header of a frame to segment.
const HEAD: usize = 160;
const _: () = assert!(HEAD >= spoof::MAX_LOOK && HEAD >= gso::MAX_HDR && HEAD <= u8::MAX as usize);
/// Snapshot of a frame's L2 header: MACs and one VLAN tag.
const L2_HEAD: usize = 18;

/// A packet's reserved place in one destination: which packet, its tag edit, and how many
/// buffers (`rx` at the same index holds them).
#[derive(Clone, Copy, Default)]
struct Plan {
    pkt: u8,
    edit: TagEdit,
    /// 0: the whole packet; k: its segment k - 1.
    seg: u16,
    nseg: u8,
    nch: u8,
    /// Not a delivery: `nch` bad or abandoned buffers to return empty.
    empty: bool,
    /// The usual case, one buffer: its head and where it is (else `rx` holds them all).
    head: u16,
    one: Grant<Rw>,
}

/// Receive buffers reserved for one packet.
struct RxBufs {
    segs: [Grant<Rw>; RX_SEGS],
    chains: [(u16, u32); MAX_RX_CHAINS],
}

impl Default for RxBufs {
    fn default() -> Self {
        RxBufs { segs: [Grant::default(); RX_SEGS], chains: [(0, 0); MAX_RX_CHAINS] }
    }
}

/// Frames at least this long have their first lines prefetched as soon as their chain is
/// walked. Only long frames: for short ones the switch is not the bottleneck, and pulling
/// the lines of a whole burst out of the sender's cache at once slows DPDK's virtio sender
/// (see `describe`); for long ones the copy is most of the cost and starting early pays.
const PREFETCH_FRAME_MIN: u32 = 512;

/// Starts loading the first two lines of a frame (after its `hdr`-byte virtio-net header).
#[inline(always)]
fn prefetch_frame(segs: &[Grant<Ro>], hdr: u32) {
    let (s, skip) = match segs {
        [first, ..] if first.len() > hdr => (first, hdr),
        [first, second, ..] if first.len() == hdr => (second, 0),
        _ => return,
    };
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetch never faults; the address is inside a checked segment anyway.
    unsafe {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = s.as_ptr().wrapping_add(skip as usize) as *const i8;
        _mm_prefetch::<_MM_HINT_T0>(p);
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (s, skip);
}

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

// SAFETY: the raw pointers in the scratch arrays are only meaningful during one burst, under
// the locks of the queues they point into; between bursts they are dead values.
unsafe impl Send for Datapath {}

#[derive(Default)]
struct SrcCounts {
    packets: u64,
    bytes: u64,
    malformed: u64,
    filtered: u64,
    no_route: u64,
    policy: u64,
}

enum RxFail {
    NoBuffer,
    /// A bad buffer: it and the chains taken before it (`.0` of them in all, listed in the
    /// chains array) go back empty, in ring order.
    Malformed(usize),
    /// A buffer whose IOVA the IOTLB cannot translate yet: everything taken went back.
    Miss(u64),
}

impl Datapath {
    /// An empty datapath for thread `idx`.
    pub fn new(idx: usize, fdb: Arc<Fdb>) -> Self {
        Datapath {
            idx,
            ports: Vec::new(),
            port_ids: Vec::new(),
            fdb,
            pkts: [PacketRef::default(); BURST],
            segs: [[Grant::default(); MAX_SEGS]; BURST],
            plans: [Plan::default(); BURST],
            rx: Box::new(std::array::from_fn(|_| RxBufs::default())),
            heads: Box::new([[0u8; HEAD]; BURST]),
            vhdrs: [NetHdr::default(); BURST],
            seg: None,
            hashes: [0; BURST],
            hashed: 0,
            qsel: [0; BURST],
            batch: Batching::default(),
        }
    }

    /// Adds or replaces a port in this thread's table.
    pub fn add_port(&mut self, port: Arc<Port>) {
        let id = port.id as usize;
        if self.ports.len() <= id {
            self.ports.resize(id + 1, None);
        }
        self.ports[id] = Some(port);
        self.port_ids = self.ports.iter().flatten().map(|p| p.id).collect();
    }

    /// Forgets a port.
    pub fn del_port(&mut self, id: u16) {
        if let Some(p) = self.ports.get_mut(id as usize) {
            *p = None;
        }
        self.port_ids = self.ports.iter().flatten().map(|p| p.id).collect();
    }

    /// Processes one burst from `src`'s transmit queue `pair`. Returns packets taken.
    #[inline(never)]
    pub fn poll_queue(&mut self, src: &Port, pair: usize, now: u32) -> usize {
        let slot: &QueueSlot = &src.txq[pair];
        let Some(mut guard) = slot.try_lock() else { return 0 };
        let Some(q) = guard.as_mut() else { return 0 };
        if q.broken {
            return 0;
        }
        let n = match q.ring.avail_pending() {
            Ok(0) => return 0,
            Ok(n) if self.batch.wait == 0 => (n as usize).min(BURST),
            Ok(n) => match batch_hold(q, n as usize, &mut self.batch) {
                Some(n) => n,
                None => return 0,
            },
            Err(e) => {
                // The ring's indices are garbage: stop it rather than guess. The guest gets it
                // back when it resets the device.
                q.broken = true;
                bump(&slot.stats.drop_malformed, 1);
                tracing::warn!(port = %src.name, pair, "stopping transmit queue: {e}");
                return 0;
            }
        };
        let mut c = SrcCounts::default();
        let ingress = src.policy.ingress_on();
        let n = self.describe(q, n, ingress && src.policy.spoof_on(), &mut c);
        if n == 0 {
            return 0; // the first chain waits for an IOTLB translation
        }
        if ingress {
            self.ingress(src, q.hdr_len as u32, n, &mut c);
        }
        self.decide(src, n, now, &mut c);
        self.deliver(src, q.hdr_len, n, &mut c);
        complete(q, &self.pkts[..n], &slot.stats);
        bump(&slot.stats.packets, c.packets);
        bump(&slot.stats.bytes, c.bytes);
        bump(&slot.stats.drop_malformed, c.malformed);
        bump(&slot.stats.drop_filtered, c.filtered);
        bump(&slot.stats.drop_no_route, c.no_route);
        bump(&slot.stats.drop_policy, c.policy);
        n
    }

    /// The sender's policy, before anything is learned or copied: anti-spoofing on each frame's
    /// first bytes (read in place), then the policer. One lock and one clock read per burst.
    #[inline(never)]
    fn ingress(&mut self, src: &Port, hdr: u32, n: usize, c: &mut SrcCounts) {
        let pol = &src.policy;
        let mut g = pol.ingress.lock();
        let ing = &mut *g;
        if let Some(p) = &mut ing.policer {
            p.advance(now_ns());
        }
        let (mut red, mut yellow) = (0u64, 0u64);
        for i in 0..n {
            if self.pkts[i].action == Action::Drop {
                continue;
            }
            if let Some(f) = &ing.spoof {
                let p = &self.pkts[i];
                let mut v = f.check(&self.heads[i][..p.head_len as usize]);
                let truncated = (p.head_len as u32) < p.len && (p.head_len as usize) < HEAD;
                if matches!(v, Verdict::NeedBytes(_)) || (matches!(v, Verdict::Drop(_)) && truncated) {
                    // A longer look (neighbour discovery, IPv4 options): take a longer
                    // snapshot and decide on it alone.
                    v = match self.snapshot(i, hdr, HEAD, c) {
                        true => match f.check(&self.heads[i][..self.pkts[i].head_len as usize]) {
                            // Longer than any snapshot: cannot be checked atomically, refused.
                            Verdict::NeedBytes(_) => Verdict::Drop(SpoofReason::Nd),
                            v => v,
                        },
                        false => continue, // malformed now (counted)
                    };
                }
                if let Verdict::Drop(r) = v {
                    self.pkts[i].action = Action::Drop;
                    bump(pol.stats.spoof(r), 1);
                    c.policy += 1;
                    continue;
                }
            }
            let p = &mut self.pkts[i];
            if let Some(pl) = &mut ing.policer {
                // A segmentation request is charged as the packets it becomes.
                let (segs, bytes) = if p.offload { self.vhdrs[i].wire_cost(p.len) } else { (1, p.len) };
                match pl.colour_n(bytes, segs) {
                    Colour::Green => {}
                    Colour::Yellow => yellow += 1,
                    Colour::Red => {
                        p.action = Action::Drop;
                        red += 1;
                    }
                }
            }
        }
        bump(&pol.stats.policed, red);
        bump(&pol.stats.policed_yellow, yellow);
        c.policy += red;
    }

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
            match g.as_mut() {
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

    /// Looks at the receive buffers guests behind a vIOMMU posted since the last look and asks
    /// for the translations the IOTLB lacks, so a packet seldom finds its buffer untranslated
    /// (a guest in strict IOMMU mode maps every buffer afresh when it posts it).
    /// Returns whether any port is behind a vIOMMU.
    pub fn translate_rx_ahead(&self) -> bool {
        let mut any = false;
        for &id in &self.port_ids {
            let Some(port) = self.ports[id as usize].as_deref() else { continue };
            if !port.iova.load(std::sync::atomic::Ordering::Relaxed) {
                continue;
            }
            any = true;
            for slot in port.rxq.iter() {
                let Some(mut g) = slot.try_lock() else { continue };
                if let Some(rq) = g.as_mut() {
                    rx_lookahead(rq);
                    if has_parked(rq) {
                        let d = drain_parked(rq);
                        if d.packets > 0 {
                            rq.publish();
                            if rq.notify() {
                                bump(&slot.stats.interrupts, 1);
                            }
                        }
                        d.count(&slot.stats);
                    }
                }
            }
        }
        any
    }

    /// Takes up to `n` heads and turns each into a `PacketRef`: chain walked and checked, header
    /// fields read in place. Returns how many were taken: a chain waiting for an IOTLB
    /// translation stays in the ring, with those after it.
    #[inline(always)]
    fn describe(&mut self, q: &mut VirtQueue, mut n: usize, spoof_check: bool, c: &mut SrcCounts) -> usize {
        let hdr = q.hdr_len as u32;
        for k in 0..n {
            q.ring.prefetch_desc(q.ring.peek_head(k as u16));
        }
        // Pass 1: walk every chain. Short frames are deliberately not prefetched: pulling the
        // first lines of all 32 frames out of the sender's cache at once, as soon as the burst
        // is seen, made DPDK's virtio generator ~15% slower per packet (flowgen at 64 B:
        // ~420 against ~370 cycles/packet; the switch's rate, median of A/B reps, 0.86x DPDK
        // vhost's with the prefetch, 0.95x without) for ~30 ticks per packet saved here; pass 2
        // reads each header in turn instead. Long frames are (see `PREFETCH_FRAME_MIN`).
        for i in 0..n {
            let head = q.ring.pop_head();
            let p = &mut self.pkts[i];
            *p = PacketRef { head, give_back: true, ..PacketRef::default() };
            let segs = &mut self.segs[i];
            let chain = walk_chain(&q.ring, &mut q.dma, head, q.indirect, q.max_frame + hdr, segs);
            match chain {
                Ok(ch) if ch.len >= hdr + 14 => {
                    if ch.len >= PREFETCH_FRAME_MIN + hdr {
                        prefetch_frame(segs, hdr);
                    }
                    p.nseg = ch.nseg;
                    p.len = ch.len - hdr;
                    p.action = Action::Flood; // provisional: "forwardable"; decide refines it
                }
                Ok(_) => c.malformed += 1, // runt: no room for an Ethernet header
                Err(ChainError::Miss { iova }) => {
                    if tx_miss(q, head, iova) {
                        q.ring.unpop(1);
                        n = i;
                        break;
                    }
                    c.malformed += 1; // waited too long: dropped as a DMA fault (recorded)
                }
                Err(e) => {
                    p.give_back = e != ChainError::BadHead;
                    c.malformed += 1;
                }
            }
        }
        if n > 0 {
            if let Some(l) = q.iotlb.as_deref_mut() {
                l.tx_moved();
            }
        }
        // Pass 2: snapshot the L2 header of each forwardable packet (the whole head the
        // anti-spoofing check looks at, if the port has one).
        let want = if spoof_check { spoof::PREFIX } else { L2_HEAD };
        let caps = q.caps;
        for i in 0..n {
            if self.pkts[i].action == Action::Drop {
                continue;
            }
            if !self.snapshot(i, hdr, want, c) {
                continue;
            }
            if caps.any_tx() && !self.read_request(i, caps, hdr, c) {
                continue;
            }
            c.packets += 1;
            c.bytes += self.pkts[i].len as u64;
        }
        n
    }

    /// Reads and checks the offload request in packet `i`'s virtio-net header (its sender
    /// negotiated offloads). A GSO frame's whole header goes into the snapshot and must parse.
    /// False: refused, the packet dropped (counted malformed).
    #[inline(always)]
    fn read_request(&mut self, i: usize, caps: Caps, hdr: u32, c: &mut SrcCounts) -> bool {
        let s0 = self.segs[i][0];
        if s0.len() >= 2 {
            // The usual case, nothing asked: flags and GSO type both zero, one load.
            // SAFETY: the chain walk checked the first segment, which holds 2 bytes.
            if unsafe { (s0.as_ptr() as *const u16).read_unaligned() } == 0 {
                return true;
            }
        }
        self.read_request_slow(i, caps, hdr, c)
    }

    #[cold]
    #[inline(never)]
    fn read_request_slow(&mut self, i: usize, caps: Caps, hdr: u32, c: &mut SrcCounts) -> bool {
        let p = &self.pkts[i];
        let mut b = [0u8; 10];
        let f = Frame { segs: &self.segs[i][..p.nseg as usize], skip: 0, len: hdr, head: &[] };
        // SAFETY: the chain was walked and checked; the queue's lock keeps it mapped.
        unsafe { read_bytes(&f, &mut b) };
        let l2 = if p.tci.is_some() { 18 } else { 14 };
        let checked = match offload::check_tx(NetHdr::parse(&b), caps, p.len, l2, MAX_FRAME) {
            Ok(h) if h.is_plain() => return true,
            Ok(h) if h.gso_type == offload::GSO_NONE => Ok(h),
            Ok(h) => {
                if !self.snapshot(i, hdr, HEAD, c) {
                    return false;
                }
                let p = &self.pkts[i];
                let head = &self.heads[i][..p.head_len as usize];
                Segmenter::new(head, p.len, h.gso_size, h.gso_v6(), TagEdit::Keep)
                    .map(|sg| h.canonical_gso(&sg))
                    .map_err(offload::BadRequest::Gso)
            }
            Err(e) => Err(e),
        };
        match checked {
            Ok(h) => {
                self.vhdrs[i] = h;
                self.pkts[i].offload = true;
                true
            }
            Err(e) => {
                tracing::debug!("offload request refused: {e}");
                self.pkts[i].action = Action::Drop;
                c.malformed += 1;
                false
            }
        }
    }

    /// Reads packet `i`'s first `want` bytes into its snapshot and takes its L2 fields from
    /// there. False (packet dropped, counted) if it is too short for its VLAN tag.
    #[inline(always)]
    fn snapshot(&mut self, i: usize, hdr: u32, want: usize, c: &mut SrcCounts) -> bool {
        let p = &mut self.pkts[i];
        let f = Frame { segs: &self.segs[i][..p.nseg as usize], skip: hdr, len: p.len, head: &[] };
        let h = &mut self.heads[i];
        // SAFETY: the chain walk translated and bounds-checked every segment, and the
        // queue's lock keeps the memory mapped.
        let got = unsafe {
            match want {
                L2_HEAD => match h.first_chunk_mut::<L2_HEAD>() {
                    Some(l2) => read_prefix(&f, l2),
                    None => 0,
                },
                spoof::PREFIX => match h.first_chunk_mut::<{ spoof::PREFIX }>() {
                    Some(pre) => read_prefix(&f, pre),
                    None => 0,
                },
                _ => read_bytes(&f, &mut h[..want]),
            }
        };
        p.head_len = got as u8;
        p.dst = mac_from_bytes([h[0], h[1], h[2], h[3], h[4], h[5]]);
        p.src = mac_from_bytes([h[6], h[7], h[8], h[9], h[10], h[11]]);
        p.tci = None;
        if u16::from_be_bytes([h[12], h[13]]) == crate::l2::vlan::TPID_8021Q {
            if got < L2_HEAD {
                p.action = Action::Drop;
                c.malformed += 1;
                return false;
            }
            p.tci = Some(u16::from_be_bytes([h[14], h[15]]));
        }
        true
    }

    /// Learns sources, looks up destinations, applies the ingress VLAN rule. Consecutive
    /// packets of one flow reuse the previous decision.
    #[inline(always)]
    fn decide(&mut self, src: &Port, n: usize, now: u32, c: &mut SrcCounts) {
        let mut prev: Option<(Option<u16>, Mac, Mac, u16, Action)> = None;
        for p in &mut self.pkts[..n] {
            if p.action == Action::Drop {
                continue;
            }
            if let Some((tci, dst, s, vlan, action)) = prev {
                if tci == p.tci && dst == p.dst && s == p.src {
                    p.vlan = vlan;
                    p.action = action;
                    if action == Action::Drop {
                        c.no_route += 1;
                    }
                    continue;
                }
            }
            let Some(vlan) = src.vlan.ingress(p.tci) else {
                p.action = Action::Drop;
                c.filtered += 1;
                continue; // not cached: the counter must see every one
            };
            p.vlan = vlan;
            if !is_group(p.src) {
                self.fdb.learn(vlan, p.src, src.id, now);
            }
            p.action = if is_group(p.dst) {
                Action::Flood
            } else {
                match self.fdb.lookup(vlan, p.dst, now) {
                    Some(port) if port == src.id => Action::Drop, // would hairpin
                    Some(port) if self.ports.get(port as usize).is_some_and(Option::is_some) => {
                        Action::Unicast(port)
                    }
                    _ => Action::Flood,
                }
            };
            if p.action == Action::Drop {
                c.no_route += 1;
            }
            prev = Some((p.tci, p.dst, p.src, vlan, p.action));
        }
    }

    /// For each destination port: lock one of its receive queues once, copy every packet bound
    /// to it straight from the sender's memory, publish, interrupt at most once.
    fn deliver(&mut self, src: &Port, src_hdr: u8, n: usize, c: &mut SrcCounts) {
        let mut any_flood = false;
        let mut any = false;
        for p in &self.pkts[..n] {
            any_flood |= p.action == Action::Flood;
            any |= p.action != Action::Drop;
        }
        if !any {
            return;
        }
        self.hashed = 0;
        // Borrow the port table out of self for the loop (no Arc clone per destination).
        let ports = std::mem::take(&mut self.ports);
        for k in 0..self.port_ids.len() {
            let d = self.port_ids[k];
            if d == src.id {
                continue;
            }
            let wanted = self.pkts[..n].iter().any(|p| p.action == Action::Unicast(d));
            if !wanted && !any_flood {
                continue;
            }
            let Some(dport) = ports[d as usize].as_deref() else { continue };
            self.deliver_to(dport, src_hdr as u32, n, c);
        }
        self.ports = ports;
        // Floods that found no member port of their VLAN.
        c.no_route +=
            self.pkts[..n].iter().filter(|p| p.action == Action::Flood && p.targets == 0).count() as u64;
    }

    /// Parks unit `u` on `rq`, whose next receive buffer waits for a translation: rendered
    /// (header included) into the switch's memory, the only copy made off the late-copy path.
    /// False if the queue has [`PARK_MAX`] parked already: the unit is dropped (counted).
    #[cold]
    #[inline(never)]
    fn park(&mut self, rq: &mut VirtQueue, u: Unit, src_hdr: u32) -> bool {
        let (hdr_len, caps) = (rq.hdr_len as u32, rq.caps);
        let Some(l) = rq.iotlb.as_deref_mut() else { return false };
        if l.parked.len() >= PARK_MAX {
            l.stats().rx_miss_drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return false;
        }
        let mut buf = vec![0u8; (hdr_len + u.wire_len) as usize];
        // SAFETY: `buf` is ours and as long as the grant says; the sender's chain was walked
        // and its queue lock is held by our caller.
        let wrote = unsafe {
            let dst = Grant::<Rw>::from_raw(buf.as_mut_ptr(), buf.len() as u32);
            self.render(u.pkt, u.edit, u.seg, 1, caps, hdr_len, src_hdr, std::slice::from_ref(&dst)).0
        };
        buf.truncate(wrote as usize);
        l.parked.push_back((buf, now_ns()));
        l.stats().rx_parked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Delivers the burst's packets bound to `dport`. A port with several queue pairs gets
    /// each packet on a running receive queue chosen by its flow's hash: a flow stays in order
    /// on one queue, flows spread, and a guest running fewer pairs than offered gets
    /// everything on those it runs. A shaped port is filled through its first queue only (the
    /// shaper's held packets are a suffix of one used ring).
    fn deliver_to(&mut self, dport: &Port, src_hdr: u32, n: usize, c: &mut SrcCounts) {
        let pairs = dport.rxq.len().min(32);
        if pairs == 1 || dport.policy.egress_on() {
            return self.deliver_into(dport, 0, false, src_hdr, n, c);
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
            return self.deliver_into(dport, live[0] as usize, false, src_hdr, n, c);
        }
        let mut chosen = 0u32;
        for i in 0..n {
            let p = &self.pkts[i];
            if p.action != Action::Unicast(dport.id) && p.action != Action::Flood {
                continue;
            }
            if self.hashed & (1 << i) == 0 {
                self.hashes[i] = self.flow_hash(i, src_hdr);
                self.hashed |= 1 << i;
            }
            let q = live[(self.hashes[i] % nl as u32) as usize];
            self.qsel[i] = q;
            chosen |= 1 << q;
        }
        for q in 0..pairs {
            if chosen & (1 << q) != 0 {
                self.deliver_into(dport, q, true, src_hdr, n, c);
            }
        }
    }

    /// Packet `i`'s flow hash, from its first bytes in the sender's memory (no snapshot: a
    /// guest racing it can only pick another queue of the same receiver).
    #[inline(never)]
    fn flow_hash(&self, i: usize, src_hdr: u32) -> u32 {
        let p = &self.pkts[i];
        let mut b = [0u8; FLOW_LOOK];
        let f = Frame { segs: &self.segs[i][..p.nseg as usize], skip: src_hdr, len: p.len, head: &[] };
        // SAFETY: the chain was walked and checked; the sender's queue lock is held.
        let got = unsafe { read_bytes(&f, &mut b) };
        flow_hash(&b[..got])
    }

    /// Delivers into receive queue `pick` of `dport` the packets bound to the port (only those
    /// whose `qsel` is `pick` if `by_queue`).
    fn deliver_into(
        &mut self,
        dport: &Port,
        pick: usize,
        by_queue: bool,
        src_hdr: u32,
        n: usize,
        c: &mut SrcCounts,
    ) {
        let shaped = dport.policy.egress_on();
        let mut guard = dport.rxq[pick].lock();
        let slot: &QueueSlot = &dport.rxq[pick];
        let Some(rq) = guard.as_mut().filter(|q| !q.broken) else {
            // Not running (not connected, or stopped): every packet for it has no buffer,
            // floods included (as a down port counts what it could not send).
            let mut lost = 0;
            for (i, p) in self.pkts[..n].iter_mut().enumerate() {
                if by_queue && self.qsel[i] != pick as u8 {
                    continue;
                }
                let member = dport.vlan.egress(p.vlan).is_some();
                if p.action == Action::Unicast(dport.id) || (p.action == Action::Flood && member) {
                    lost += 1;
                    p.targets += 1;
                }
            }
            bump(&slot.stats.drop_no_buffer, lost);
            return;
        };
        let mut t = Tally::default();
        // The shaper, if any: taken after the queue's lock, released with it.
        let mut eg = if shaped { Some(dport.policy.egress.lock()) } else { None };
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
            drain_parked(rq).count(&slot.stats);
        }
        let pending = rq.ring.avail_pending().unwrap_or(0) as usize;
        for k in 0..pending.min(n) {
            rq.ring.prefetch_desc(rq.ring.peek_head(k as u16));
        }
        // Pass 1 reserves receive buffers for every packet bound here and prefetches them for
        // writing; nothing is copied yet, so a packet without a buffer costs no copy. Pass 2
        // (`fill`) copies.
        let mut planned = 0usize;
        for i in 0..n {
            if by_queue && self.qsel[i] != pick as u8 {
                continue;
            }
            let p = &self.pkts[i];
            let out_tagged = match p.action {
                Action::Unicast(d) if d == dport.id => match dport.vlan.egress(p.vlan) {
                    Some(t) => t,
                    None => {
                        c.filtered += 1;
                        continue;
                    }
                },
                Action::Flood => match dport.vlan.egress(p.vlan) {
                    Some(t) => t,
                    None => continue,
                },
                _ => continue,
            };
            let edit = VlanMode::edit(p.tci, p.vlan, out_tagged);
            let (len, head_len) = (p.len, p.head_len as usize);
            let segment = p.offload && offload::how(&self.vhdrs[i], rq.caps) == How::Segment;
            self.pkts[i].targets += 1;
            if !segment {
                let u = Unit { pkt: i, edit, seg: 0, wire_len: out_len(len, edit) };
                planned = self.reserve(rq, shaper.as_deref_mut(), parking, u, planned, src_hdr, &mut t);
                continue;
            }
            // A 64 KiB TCP frame for a receiver without TSO: cut in software, each segment a
            // packet of its own. Its segments are copied in a pass of their own, so one
            // segmenter serves them.
            planned = self.fill(rq, planned, src_hdr, &mut t);
            let vh = self.vhdrs[i];
            let sg = match Segmenter::new(&self.heads[i][..head_len], len, vh.gso_size, vh.gso_v6(), edit) {
                Ok(sg) => sg,
                Err(e) => {
                    // Checked when it was received: the sender rewrote its headers since.
                    tracing::debug!(port = %dport.name, "GSO frame dropped: {e}");
                    t.bad += 1;
                    continue;
                }
            };
            self.seg = Some(sg);
            t.segmented += 1;
            for k in 0..sg.count() {
                let u = Unit { pkt: i, edit, seg: k as u16 + 1, wire_len: sg.header_len() + sg.payload(k).1 };
                planned = self.reserve(rq, shaper.as_deref_mut(), parking, u, planned, src_hdr, &mut t);
            }
            planned = self.fill(rq, planned, src_hdr, &mut t);
        }
        self.fill(rq, planned, src_hdr, &mut t);
        rq.held += t.new_held;
        rq.publish();
        if rq.notify() {
            bump(&slot.stats.interrupts, 1);
        }
        if let Some(sh) = shaper {
            dport.policy.held.store(sh.len() as u32, std::sync::atomic::Ordering::Relaxed);
            bump(&dport.policy.stats.shaped_held, t.shaped_held);
            bump(&dport.policy.stats.shaped_dropped, t.shaped_drop);
        }
        drop(eg);
        let s: &QueueStats = &slot.stats;
        bump(&s.packets, t.pk);
        bump(&s.bytes, t.by);
        bump(&s.copies, t.pk);
        bump(&s.bytes_copied, t.copied);
        bump(&s.drop_no_buffer, t.no_buf + t.missed);
        bump(&s.drop_malformed, t.bad);
        bump(&s.drop_policy, t.shaped_drop);
        bump(&s.gso_whole, t.whole);
        bump(&s.gso_segmented, t.segmented);
        bump(&s.csum_completed, t.completed);
    }

    /// Reserves receive buffers for unit `u` (planned at `planned`, after a copy pass if the
    /// plan is full), or parks it, or counts why it cannot go. Returns the plans now made.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn reserve(
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
    fn fill(&mut self, rq: &mut VirtQueue, planned: usize, src_hdr: u32, t: &mut Tally) -> usize {
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

    /// Renders packet `i` with an offload request for one receiver (tag edit `edit`, `caps`,
    /// header length `hdr_len`, `nch` buffers) into `dst`: the request passed on, the checksum
    /// completed, or segment `seg - 1` of the current segmenter. Returns the bytes written
    /// and what was done.
    ///
    /// # Safety
    /// As for [`copy_frame`].
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn render(
        &self,
        i: usize,
        edit: TagEdit,
        seg: u16,
        nch: u8,
        caps: Caps,
        hdr_len: u32,
        src_hdr: u32,
        dst: &[Grant<Rw>],
    ) -> (u32, How) {
        let p = &self.pkts[i];
        let vh = self.vhdrs[i];
        let f = Frame {
            segs: &self.segs[i][..p.nseg as usize],
            skip: src_hdr,
            len: p.len,
            head: &self.heads[i][..p.head_len as usize],
        };
        let mut hb = [0u8; 12 + gso::MAX_HDR + 4];
        hb[10..12].copy_from_slice(&(nch as u16).to_le_bytes());
        // The receiver's virtio-net header: the request for it, then `num_buffers` (above).
        let vnet = |h: NetHdr, hb: &mut [u8; 12 + gso::MAX_HDR + 4]| {
            let mut b = [0u8; 10];
            h.write(&mut b);
            hb[..10].copy_from_slice(&b);
        };
        let how = if p.offload { offload::how(&vh, caps) } else { How::Plain };
        let h = hdr_len as usize;
        // Every unsafe block below: the caller's contract forwarded (valid grants; every read
        // and write is bounded by them).
        let wrote = match how {
            // SAFETY: forwarded.
            How::Plain => unsafe { copy_frame(&f, edit, &hb[..h], dst) },
            How::Pass => {
                vnet(vh.edited(edit), &mut hb);
                // SAFETY: forwarded.
                unsafe { copy_frame(&f, edit, &hb[..h], dst) }
            }
            How::Complete => {
                // SAFETY: forwarded.
                let wrote = unsafe { copy_frame(&f, edit, &hb[..h], dst) };
                // Over the bytes delivered (snapshot included), the sender's pseudo-header sum
                // in the field counting as it must.
                let start = vh.csum_start as u32;
                let mut s = Sum::new();
                // SAFETY: forwarded.
                unsafe { frame_sum(&f, start, p.len - start, &mut s) };
                let mut sum = s.checksum();
                if sum == 0 && vh.csum_offset == 6 {
                    sum = 0xffff; // UDP: zero means "no checksum"
                }
                let at = (hdr_len as i64 + start as i64 + offload::edit_delta(edit) as i64) as u32
                    + vh.csum_offset as u32;
                // SAFETY: forwarded.
                unsafe { iommu::grant::write_granted(dst, at, &sum.to_be_bytes()) };
                wrote
            }
            How::Segment => {
                let Some(sg) = self.seg.as_ref() else { return (0, how) };
                let k = seg.saturating_sub(1) as u32;
                let (off, plen) = sg.payload(k);
                let ps = (!caps.rx_csum).then(|| {
                    let mut s = Sum::new();
                    // SAFETY: forwarded.
                    unsafe { frame_sum(&f, off, plen, &mut s) };
                    s
                });
                let hl = sg.header_len() as usize;
                let vh2 = sg.header(k, ps, &mut hb[h..h + hl]);
                vnet(vh2, &mut hb);
                let mut w = GrantWriter::new(dst);
                // SAFETY: forwarded.
                unsafe {
                    w.put(&hb[..h + hl]);
                    copy_range(&f, off, plen, &mut w);
                }
                w.written()
            }
        };
        (wrote, how)
    }
}

/// One thing to deliver into one receive queue: a packet, or one segment of it.
#[derive(Clone, Copy)]
struct Unit {
    pkt: usize,
    edit: TagEdit,
    /// 0: the whole packet; k: segment k - 1.
    seg: u16,
    /// Bytes after the receiver's virtio-net header.
    wire_len: u32,
}

/// What one delivery into one queue did.
#[derive(Default)]
struct Tally {
    pk: u64,
    by: u64,
    copied: u64,
    no_buf: u64,
    bad: u64,
    missed: u64,
    new_held: u16,
    shaped_drop: u64,
    shaped_held: u64,
    whole: u64,
    segmented: u64,
    completed: u64,
}

/// Takes from the shaper every held packet its tokens allow and un-holds its used entries
/// (the caller publishes). Entries of an earlier queue in this slot were published when that
/// queue stopped; they are just forgotten. Returns whether anything was released.
fn release_held(rq: &mut VirtQueue, s: &mut Shaper<Held>) -> bool {
    let mut any = false;
    while let Some(h) = s.release() {
        if h.epoch == rq.epoch {
            rq.held = rq.held.saturating_sub(h.entries);
            any = true;
        }
    }
    any
}

/// The usual case: the next receive chain is one buffer with room for `need` bytes. Leaves
/// the ring untouched otherwise (the general `take_rx` decides).
#[inline(always)]
fn take_one_rx(rq: &mut VirtQueue, need: u32) -> Option<(u16, Grant<Rw>)> {
    if rq.ring.avail_pending().ok()? == 0 {
        return None;
    }
    let head = rq.ring.peek_head(0);
    if head >= rq.ring.size() {
        return None;
    }
    let d = rq.ring.desc(head);
    if d.flags != crate::virtio::ring::DESC_F_WRITE || d.len < need {
        return None;
    }
    let g = rq.dma.grant::<Rw>(d.addr, d.len).ok()?;
    rq.ring.pop_head();
    Some((head, g))
}

/// Reserves receive buffers for `need` bytes: one chain, or several with MRG_RXBUF.
/// On shortage the chains taken go back to the available ring untouched.
fn take_rx(
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

/// A transmit chain at `head` missed the IOTLB at `iova`: asks for the translation and says
/// whether to wait for it (true) or to drop the chain as a DMA fault, recorded (false).
#[cold]
#[inline(never)]
fn tx_miss(q: &mut VirtQueue, head: u16, iova: u64) -> bool {
    let now = now_ns();
    let wait = q.iotlb.as_deref_mut().is_some_and(|l| {
        l.miss(iova, false, now);
        l.tx_wait(head, now)
    });
    if !wait {
        q.dma.fault(iova, 1, Access::Read, FaultReason::NotMapped);
    }
    wait
}

/// A receive buffer missed the IOTLB at `iova`: asks for it and, at once, for every other
/// posted buffer that would miss too, so the guest's first round of buffers waits for one
/// round trip rather than one per buffer page. `dropped`: the packet is lost (counted).
#[cold]
#[inline(never)]
fn rx_misses(rq: &mut VirtQueue, iova: u64, dropped: bool) {
    let Some(l) = rq.iotlb.as_deref_mut() else { return };
    l.miss(iova, true, now_ns());
    if dropped {
        l.stats().rx_miss_drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    l.rx_checked = None;
    rx_lookahead(rq);
}

/// Used entries for a packet spread over `chains` (head, capacity): each buffer reports
/// what it holds of the `wrote` bytes.
fn push_used_spread(rq: &mut VirtQueue, chains: &[(u16, u32)], wrote: u32) {
    let mut left = wrote;
    for &(head, cap) in chains {
        let k = left.min(cap);
        rq.ring.push_used(head, k);
        left -= k;
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
fn batch_hold(q: &mut VirtQueue, n: usize, b: &mut Batching) -> Option<usize> {
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

#[inline(always)]
fn has_parked(rq: &VirtQueue) -> bool {
    rq.iotlb.as_deref().is_some_and(|l| !l.parked.is_empty())
}

/// What a drain of parked packets did.
#[derive(Default)]
struct Drained {
    packets: u64,
    bytes: u64,
    malformed: u64,
    timed_out: u64,
}

impl Drained {
    fn count(&self, s: &QueueStats) {
        bump(&s.packets, self.packets);
        bump(&s.bytes, self.bytes);
        bump(&s.copies, self.packets);
        bump(&s.bytes_copied, self.bytes);
        bump(&s.drop_malformed, self.malformed);
        bump(&s.drop_no_buffer, self.timed_out);
    }
}

/// Delivers parked packets, oldest first, while receive buffers translate; drops (counted)
/// those parked longer than the miss time-out. The caller publishes.
#[cold]
#[inline(never)]
fn drain_parked(rq: &mut VirtQueue) -> Drained {
    let mut d = Drained::default();
    let mut rx = RxBufs::default();
    let now = now_ns();
    let hdr_len = rq.hdr_len as u32;
    // A guest that keeps posting bad buffers must not keep the thread here (it holds this
    // queue's lock, and maybe a sender's): at most a burst's worth of them per call.
    while let Some(l) = rq.iotlb.as_deref_mut() {
        if d.malformed >= BURST as u64 {
            break;
        }
        let Some((frame, since)) = l.parked.pop_front() else { break };
        if now.wrapping_sub(since) > MISS_TIMEOUT_NS {
            l.stats().rx_miss_drops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            d.timed_out += 1;
            continue;
        }
        // A parked unit holds its virtio-net header: only the buffer count is new.
        let h = (hdr_len as usize).min(frame.len());
        match take_rx(rq, frame.len() as u32, &mut rx.segs, &mut rx.chains) {
            Ok((nseg, nch)) => {
                let mut hdr = [0u8; 12];
                hdr[..h].copy_from_slice(&frame[..h]);
                if h == 12 {
                    hdr[10..12].copy_from_slice(&(nch as u16).to_le_bytes());
                }
                // SAFETY: the buffers were just walked under this queue's lock, which our
                // caller holds; `frame` is ours.
                let wrote = unsafe {
                    let src = Grant::<Ro>::from_raw(frame.as_ptr() as *mut u8, frame.len() as u32);
                    let mut w = GrantWriter::new(&rx.segs[..nseg]);
                    w.put(&hdr[..h]);
                    w.copy_from(std::slice::from_ref(&src), h as u32, (frame.len() - h) as u32);
                    w.written()
                };
                push_used_spread(rq, &rx.chains[..nch], wrote);
                d.packets += 1;
                d.bytes += (frame.len() - h) as u64;
            }
            Err(e) => {
                if let RxFail::Malformed(nch) = e {
                    // Bad buffers go back empty; the packet tries the next ones.
                    for &(head, _) in &rx.chains[..nch] {
                        rq.ring.push_used(head, 0);
                    }
                    d.malformed += 1;
                }
                let Some(l) = rq.iotlb.as_deref_mut() else { break };
                l.parked.push_front((frame, since));
                match e {
                    RxFail::Malformed(_) => continue,
                    RxFail::Miss(iova) => l.miss(iova, true, now),
                    RxFail::NoBuffer => {}
                }
                break;
            }
        }
    }
    d
}

/// Most receive buffers one look-ahead pass asks translations for.
const LOOKAHEAD: u16 = 64;

/// Asks for the translations of posted receive buffers not looked at yet (all of them after
/// `rx_checked` was reset), [`LOOKAHEAD`] at a time.
fn rx_lookahead(rq: &mut VirtQueue) {
    let Some(l) = rq.iotlb.as_deref_mut() else { return };
    let pending = rq.ring.avail_pending().unwrap_or(0).min(rq.ring.size());
    let start = rq.ring.state().last_avail;
    let from = match l.rx_checked {
        Some(c) if c.wrapping_sub(start) <= pending => c.wrapping_sub(start),
        _ => 0,
    };
    // At most LOOKAHEAD buffers per look: a guest posting a ring of buffers on pages it never
    // maps costs a bounded number of requests per pass, the rest on later passes.
    let to = pending.min(from.saturating_add(LOOKAHEAD));
    l.rx_checked = Some(start.wrapping_add(to));
    if from == to {
        return;
    }
    // `miss` asks once per page: consecutive buffers of one page cost one request.
    let now = now_ns();
    for k in from..to {
        let head = rq.ring.peek_head(k);
        if head >= rq.ring.size() {
            continue;
        }
        let d = rq.ring.desc(head);
        if d.len == 0 || d.flags & crate::virtio::ring::DESC_F_INDIRECT != 0 {
            continue;
        }
        if let Err(iommu::DmaError::Miss { iova, .. }) = rq.dma.translate(d.addr, d.len, Access::Write) {
            l.miss(iova, true, now);
        }
    }
}

/// Returns every source buffer of the burst (after all copies are done), publishes, and
/// interrupts the sender if it asked.
#[inline(always)]
fn complete(q: &mut VirtQueue, pkts: &[PacketRef], stats: &QueueStats) {
    for p in pkts {
        if p.give_back {
            q.ring.push_used(p.head, 0);
        }
    }
    q.ring.publish_used();
    if q.notify() {
        bump(&stats.interrupts, 1);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::undocumented_unsafe_blocks)]
    use std::collections::HashMap;

    use super::*;
    use crate::l2::vlan::VlanSet;
    use crate::virtio::mock::{MockGuest, MockRing};
    use crate::virtio::ring::DESC_F_WRITE;

    const MACS: [[u8; 6]; 4] =
        [[0x52, 0, 0, 0, 0, 1], [0x52, 0, 0, 0, 0, 2], [0x52, 0, 0, 0, 0, 3], [0x52, 0, 0, 0, 0, 4]];
    const BCAST: [u8; 6] = [0xff; 6];

    struct Guest {
        g: MockGuest,
        tx: MockRing,
        rx: MockRing,
        rx_bufs: HashMap<u32, (u64, u32)>,
    }

    struct Net {
        guests: Vec<Guest>,
        ports: Vec<Arc<Port>>,
        dp: Datapath,
    }

    fn net(modes: Vec<VlanMode>, mrg: bool) -> Net {
        let n = modes.len();
        net_caps(modes, vec![Caps::default(); n], mrg)
    }

    /// Guests that negotiated the offloads `caps`.
    fn net_caps(modes: Vec<VlanMode>, caps: Vec<Caps>, mrg: bool) -> Net {
        let mut dp = Datapath::new(0, Arc::new(Fdb::new(1024, 300)));
        let mut guests = Vec::new();
        let mut ports = Vec::new();
        for (i, (mode, caps)) in modes.into_iter().zip(caps).enumerate() {
            let mut g = MockGuest::new(4 << 20);
            let tx = g.ring(64);
            let rx = g.ring(64);
            let port = Arc::new(Port::new(i as u16, format!("p{i}"), mode, MACS[i], 1));
            *port.txq[0].lock() = Some(tx.queue_with(&g, mrg, caps));
            *port.rxq[0].lock() = Some(rx.queue_with(&g, mrg, caps));
            dp.add_port(port.clone());
            ports.push(port);
            guests.push(Guest { g, tx, rx, rx_bufs: HashMap::new() });
        }
        Net { guests, ports, dp }
    }

    fn frame(dst: [u8; 6], src: [u8; 6], tci: Option<u16>, len: usize) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend(dst);
        f.extend(src);
        if let Some(t) = tci {
            f.extend([0x81, 0x00]);
            f.extend(t.to_be_bytes());
        }
        f.extend([0x08, 0x00]);
        while f.len() < len {
            f.push(f.len() as u8);
        }
        f
    }

    impl Net {
        fn send(&mut self, p: usize, frame: &[u8]) {
            let gu = &mut self.guests[p];
            let gpa = gu.g.alloc(12 + frame.len() as u64, 8);
            gu.g.write(gpa, &[0u8; 12]);
            gu.g.write(gpa + 12, frame);
            gu.tx.add_chain(&gu.g, &[(gpa, 12 + frame.len() as u32, 0)]);
        }

        fn post_rx(&mut self, p: usize, n: usize, size: u32) {
            let gu = &mut self.guests[p];
            for _ in 0..n {
                let gpa = gu.g.alloc(size as u64, 8);
                let head = gu.rx.add_chain(&gu.g, &[(gpa, size, DESC_F_WRITE)]);
                gu.rx_bufs.insert(head as u32, (gpa, size));
            }
        }

        fn poll(&mut self, p: usize) -> usize {
            let port = self.ports[p].clone();
            self.dp.poll_queue(&port, 0, 1)
        }

        /// Sends `frame` behind a virtio-net header asking `vh`, the frame cut into `pieces`
        /// descriptors.
        fn send_with(&mut self, p: usize, vh: NetHdr, frame: &[u8], pieces: usize) {
            let gu = &mut self.guests[p];
            let mut b = [0u8; 12];
            vh.write(b.first_chunk_mut::<10>().unwrap());
            let mut all = b.to_vec();
            all.extend_from_slice(frame);
            let gpa = gu.g.alloc(all.len() as u64, 8);
            gu.g.write(gpa, &all);
            let step = all.len().div_ceil(pieces);
            let bufs: Vec<_> = (0..all.len())
                .step_by(step)
                .map(|o| (gpa + o as u64, step.min(all.len() - o) as u32, 0))
                .collect();
            gu.tx.add_chain(&gu.g, &bufs);
        }

        /// Frames delivered to `p` since last asked, with their virtio-net headers.
        fn received_hdrs(&mut self, p: usize) -> Vec<(NetHdr, Vec<u8>)> {
            let gu = &mut self.guests[p];
            let used = gu.rx.take_used(&gu.g);
            let mut out = Vec::new();
            let mut i = 0;
            while i < used.len() {
                let (id, len) = used[i];
                let (gpa, _) = gu.rx_bufs[&id];
                let first = gu.g.read(gpa, len as usize);
                let nbuf = u16::from_le_bytes([first[10], first[11]]) as usize;
                let vh = NetHdr::parse(first.first_chunk::<10>().unwrap());
                let mut f = first[12..].to_vec();
                for &(id2, len2) in &used[i + 1..i + nbuf] {
                    let (gpa2, _) = gu.rx_bufs[&id2];
                    f.extend(gu.g.read(gpa2, len2 as usize));
                }
                out.push((vh, f));
                i += nbuf.max(1);
            }
            out
        }

        /// Frames delivered to `p` since last asked (headers checked and stripped).
        fn received(&mut self, p: usize) -> Vec<Vec<u8>> {
            self.received_hdrs(p)
                .into_iter()
                .map(|(vh, f)| {
                    assert_eq!(vh, NetHdr::default(), "clean header");
                    f
                })
                .collect()
        }

        fn tx_returned(&mut self, p: usize) -> Vec<(u32, u32)> {
            let gu = &mut self.guests[p];
            gu.tx.take_used(&gu.g)
        }

        fn rx_stats(&self, p: usize) -> crate::virtio::queue::QueueCounters {
            self.ports[p].rxq[0].stats.snapshot()
        }

        fn tx_stats(&self, p: usize) -> crate::virtio::queue::QueueCounters {
            self.ports[p].txq[0].stats.snapshot()
        }
    }

    fn tagged(f: &[u8], tci: u16) -> Vec<u8> {
        let mut t = f[..12].to_vec();
        t.extend([0x81, 0x00]);
        t.extend(tci.to_be_bytes());
        t.extend(&f[12..]);
        t
    }

    fn untagged(f: &[u8]) -> Vec<u8> {
        let mut t = f[..12].to_vec();
        t.extend(&f[16..]);
        t
    }

    fn trunk(v: &[u16]) -> VlanMode {
        VlanMode::Trunk(Some(Box::new(VlanSet::new(v.iter().copied()))))
    }

    #[test]
    fn test_unknown_unicast_floods_then_learned_goes_to_one_port() {
        let mut n = net(vec![VlanMode::default(); 3], true);
        for p in 0..3 {
            n.post_rx(p, 8, 2048);
        }
        let f = frame(MACS[1], MACS[0], None, 60);
        n.send(0, &f);
        assert_eq!(n.poll(0), 1);
        assert_eq!(n.received(1), vec![f.clone()]);
        assert_eq!(n.received(2), vec![f.clone()], "unknown unicast floods");
        assert!(n.received(0).is_empty(), "never back to the sender");
        let r = frame(MACS[0], MACS[1], None, 60);
        n.send(1, &r);
        n.poll(1);
        assert_eq!(n.received(0), vec![r]);
        assert!(n.received(2).is_empty(), "learned: only the owner gets it");
        n.send(0, &f);
        n.poll(0);
        assert_eq!(n.received(1).len(), 1);
        assert!(n.received(2).is_empty());
        assert_eq!(n.tx_returned(0).len(), 2, "source buffers returned");
    }

    #[test]
    fn test_batching_leaves_a_burst_in_a_loaded_guests_ring_until_the_next_or_the_wait() {
        // Rings of 64: a "full burst" is 16 here (a quarter ring), 32 on rings of 128 and up.
        let mut n = net(vec![VlanMode::default(); 2], true);
        n.post_rx(1, 60, 2048);
        n.dp.batch.wait = u64::MAX; // never gives up waiting, for now
        let frames: Vec<Vec<u8>> = (0..50).map(|k| frame(MACS[1], MACS[0], None, 60 + k)).collect();
        let mut sent = frames.iter();
        let mut send = |n: &mut Net, k: usize| {
            for f in sent.by_ref().take(k) {
                n.send(0, f);
            }
        };
        // A guest not known to be loaded is served at once; a full burst marks it loaded.
        send(&mut n, 16);
        assert_eq!(n.poll(0), 16);
        // Loaded: fewer than two bursts queued stay in the ring...
        send(&mut n, 20);
        assert_eq!(n.poll(0), 0, "one burst and a bit wait for the next");
        assert!(n.received(1).len() == 16 && n.tx_returned(0).len() == 16);
        // ...and with two queued, all but one burst are taken.
        send(&mut n, 12);
        assert_eq!(n.poll(0), 16, "a burst stays in the ring");
        assert_eq!(n.poll(0), 0);
        // The wait is bounded: once it has passed, the rest goes and the guest counts as
        // light again, served at once.
        n.dp.batch.wait = 1;
        assert_eq!(n.poll(0), 16, "waited long enough");
        assert_eq!((n.dp.batch.holds, n.dp.batch.expired), (2, 1));
        send(&mut n, 2);
        assert_eq!(n.poll(0), 2, "a light guest is not held back");
        assert_eq!(n.received(1), frames[16..50].to_vec(), "all delivered, in order");
        assert_eq!(n.tx_returned(0).len(), 34);
    }

    #[test]
    fn test_broadcast_makes_one_copy_per_receiver() {
        let mut n = net(vec![VlanMode::default(); 4], false);
        for p in 0..4 {
            n.post_rx(p, 4, 2048);
        }
        let f = frame(BCAST, MACS[0], None, 1514);
        n.send(0, &f);
        n.poll(0);
        for p in 1..4 {
            assert_eq!(n.received(p), vec![f.clone()]);
            let s = n.rx_stats(p);
            assert_eq!((s.packets, s.copies, s.bytes_copied), (1, 1, 1514));
        }
        assert_eq!(n.rx_stats(0).copies, 0);
        assert_eq!(n.tx_returned(0), vec![(0, 0)]);
    }

    #[test]
    fn test_vlan_isolation_and_tag_edits() {
        // 0: access 10, 1: access 20, 2: trunk 10,20, 3: access 10
        let mut n = net(
            vec![VlanMode::Access(10), VlanMode::Access(20), trunk(&[10, 20]), VlanMode::Access(10)],
            true,
        );
        for p in 0..4 {
            n.post_rx(p, 8, 2048);
        }
        let f = frame(BCAST, MACS[0], None, 64);
        n.send(0, &f);
        n.poll(0);
        assert!(n.received(1).is_empty(), "VLAN 20 never sees VLAN 10");
        assert_eq!(n.received(3), vec![f.clone()], "access to access: untouched");
        assert_eq!(n.received(2), vec![tagged(&f, 10)], "tag pushed on the trunk");
        // Trunk sends VLAN 20 tagged (priority 5): port 1 gets it untagged.
        let t = frame(BCAST, MACS[2], Some(0xa014), 68);
        n.send(2, &t);
        n.poll(2);
        assert_eq!(n.received(1), vec![untagged(&t)]);
        assert!(n.received(0).is_empty() && n.received(3).is_empty());
        // VLAN 30 is not on the trunk; a tagged frame on an access port is refused.
        n.send(2, &frame(BCAST, MACS[2], Some(30), 68));
        n.poll(2);
        n.send(0, &frame(BCAST, MACS[0], Some(10), 68));
        n.poll(0);
        assert_eq!(n.tx_stats(2).drop_filtered, 1);
        assert_eq!(n.tx_stats(0).drop_filtered, 1);
        for p in 0..4 {
            assert!(n.received(p).is_empty());
        }
    }

    #[test]
    fn test_full_destination_drops_without_copying() {
        let mut n = net(vec![VlanMode::default(); 2], true);
        n.post_rx(1, 1, 2048);
        n.send(0, &frame(MACS[1], MACS[0], None, 60));
        n.send(0, &frame(MACS[1], MACS[0], None, 60));
        n.poll(0);
        assert_eq!(n.received(1).len(), 1);
        let s = n.rx_stats(1);
        assert_eq!((s.packets, s.copies, s.drop_no_buffer), (1, 1, 1));
        assert_eq!(n.tx_returned(0).len(), 2, "the dropped packet's buffer is returned too");
    }

    #[test]
    fn test_malformed_chain_is_returned_and_counted_and_the_rest_flows() {
        let mut n = net(vec![VlanMode::default(); 2], true);
        n.post_rx(1, 4, 2048);
        {
            let gu = &mut n.guests[0];
            gu.tx.add_chain(&gu.g, &[(1 << 40, 100, 0)]); // outside guest memory
            gu.tx.add_chain(&gu.g, &[(0x2000, 5, 0)]); // runt
        }
        let f = frame(MACS[1], MACS[0], None, 60);
        n.send(0, &f);
        assert_eq!(n.poll(0), 3);
        assert_eq!(n.received(1), vec![f]);
        assert_eq!(n.tx_stats(0).drop_malformed, 2);
        let back = n.tx_returned(0);
        assert_eq!(back.len(), 3);
        assert!(back.iter().all(|&(_, len)| len == 0));
    }

    #[test]
    fn test_mergeable_buffers_carry_a_large_frame() {
        let mut n = net(vec![VlanMode::default(); 2], true);
        n.post_rx(1, 16, 64);
        let f = frame(MACS[1], MACS[0], None, 300);
        n.send(0, &f);
        n.poll(0);
        let got = n.received(1);
        assert_eq!(got, vec![f]);
        let gu = &n.guests[1];
        let used_idx = gu.g.read_u16(gu.rx.used + 2);
        assert_eq!(used_idx, 5, "312 bytes in 64-byte buffers");
    }

    #[test]
    fn test_without_mergeable_buffers_a_too_small_buffer_is_not_used() {
        let mut n = net(vec![VlanMode::default(); 2], false);
        n.post_rx(1, 4, 64);
        n.send(0, &frame(MACS[1], MACS[0], None, 300));
        n.poll(0);
        assert!(n.received(1).is_empty());
        assert_eq!(n.rx_stats(1).drop_no_buffer, 1);
        n.send(0, &frame(MACS[1], MACS[0], None, 40));
        n.poll(0);
        assert_eq!(n.received(1).len(), 1, "the buffers were left for the next packet");
    }

    #[test]
    fn test_no_hairpin_to_a_mac_on_the_same_port() {
        let mut n = net(vec![VlanMode::default(); 2], true);
        n.post_rx(0, 4, 2048);
        n.post_rx(1, 4, 2048);
        n.send(0, &frame(BCAST, MACS[2], None, 60)); // learn MACS[2] on port 0
        n.poll(0);
        n.received(1);
        n.send(0, &frame(MACS[2], MACS[0], None, 60));
        n.poll(0);
        assert!(n.received(0).is_empty() && n.received(1).is_empty());
        assert_eq!(n.tx_stats(0).drop_no_route, 1);
    }

    #[test]
    fn test_avail_index_overrun_stops_only_that_queue() {
        let mut n = net(vec![VlanMode::default(); 3], true);
        n.post_rx(2, 4, 2048);
        {
            let gu = &mut n.guests[0];
            gu.g.write_u16(gu.tx.avail + 2, 300); // claims 300 entries in a 64-entry ring
        }
        assert_eq!(n.poll(0), 0);
        assert_eq!(n.tx_stats(0).drop_malformed, 1);
        assert_eq!(n.poll(0), 0, "stays stopped");
        let f = frame(MACS[2], MACS[1], None, 60);
        n.send(1, &f);
        n.poll(1);
        assert_eq!(n.received(2), vec![f], "other ports unaffected");
    }

    #[test]
    fn test_multiqueue_receiver_with_fewer_running_pairs_still_gets_packets() {
        let mut n = net(vec![VlanMode::default(); 2], true);
        // Port 1 offers two pairs but its guest runs only pair 1 (QEMU enables only the pairs
        // the guest uses); this thread would prefer pair 0.
        let old = n.ports[1].clone();
        let p1 = Arc::new(Port::new(1, "p1".into(), VlanMode::default(), MACS[1], 2));
        *p1.rxq[1].lock() = old.rxq[0].lock().take();
        n.dp.add_port(p1.clone());
        n.ports[1] = p1.clone();
        n.post_rx(1, 2, 2048);
        let f = frame(MACS[1], MACS[0], None, 60);
        n.send(0, &f);
        n.poll(0);
        assert_eq!(n.received(1), vec![f]);
        assert_eq!(p1.rxq[1].stats.snapshot().packets, 1);
        assert_eq!(p1.rxq[0].stats.snapshot().drop_no_buffer, 0);
    }

    /// An IPv4/UDP frame from MACS[0] to MACS[1] of flow `sport`, carrying `seq`.
    fn udp_frame(sport: u16, seq: u32) -> Vec<u8> {
        let mut f = frame(MACS[1], MACS[0], None, 14);
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        f.extend(ip);
        f.extend(sport.to_be_bytes());
        f.extend(5201u16.to_be_bytes());
        f.extend([0u8; 4]);
        f.extend(seq.to_be_bytes());
        f.resize(64, 0);
        f
    }

    #[test]
    fn test_multiqueue_receiver_gets_flows_spread_each_in_order_on_one_queue() {
        let mut n = net(vec![VlanMode::default(); 2], true);
        let old = n.ports[1].clone();
        let p1 = Arc::new(Port::new(1, "p1".into(), VlanMode::default(), MACS[1], 2));
        *p1.rxq[0].lock() = old.rxq[0].lock().take();
        // Pair 1's receive ring, in the same guest.
        let gu = &mut n.guests[1];
        let mut rx2 = gu.g.ring(64);
        *p1.rxq[1].lock() = Some(rx2.queue(&gu.g, true));
        let mut bufs2 = HashMap::new();
        for _ in 0..40 {
            let gpa = gu.g.alloc(2048, 8);
            bufs2.insert(rx2.add_chain(&gu.g, &[(gpa, 2048, DESC_F_WRITE)]) as u32, gpa);
        }
        n.dp.add_port(p1.clone());
        n.ports[1] = p1.clone();
        n.post_rx(1, 40, 2048);
        // 16 flows, 4 packets each, interleaved.
        for seq in 0..4u32 {
            for flow in 0..16u16 {
                n.send(0, &udp_frame(40_000 + flow, seq));
            }
        }
        n.poll(0);
        n.poll(0);
        let q0 = n.received(1);
        let gu = &mut n.guests[1];
        let q1: Vec<Vec<u8>> = rx2
            .take_used(&gu.g)
            .into_iter()
            .map(|(id, len)| gu.g.read(bufs2[&id] + 12, len as usize - 12))
            .collect();
        assert!(!q0.is_empty() && !q1.is_empty(), "both queues get flows: {} and {}", q0.len(), q1.len());
        assert_eq!(q0.len() + q1.len(), 64);
        let flow = |f: &Vec<u8>| u16::from_be_bytes([f[34], f[35]]);
        let seq = |f: &Vec<u8>| u32::from_be_bytes([f[42], f[43], f[44], f[45]]);
        for q in [&q0, &q1] {
            for fl in 40_000..40_016u16 {
                let seqs: Vec<u32> = q.iter().filter(|f| flow(f) == fl).map(seq).collect();
                assert!(
                    seqs.is_empty() || seqs == vec![0, 1, 2, 3],
                    "flow {fl}: {seqs:?}, whole and in order"
                );
            }
        }
        assert_eq!(p1.rxq[0].stats.snapshot().packets + p1.rxq[1].stats.snapshot().packets, 64);
    }

    #[test]
    fn test_used_entries_keep_ring_order_around_a_bad_receive_buffer() {
        let mut n = net(vec![VlanMode::default(); 2], true);
        n.post_rx(1, 1, 2048);
        {
            let gu = &mut n.guests[1];
            let head = gu.rx.add_chain(&gu.g, &[(1 << 40, 2048, DESC_F_WRITE)]); // outside memory
            gu.rx_bufs.insert(head as u32, (0, 0));
        }
        n.post_rx(1, 1, 2048);
        for _ in 0..3 {
            n.send(0, &frame(MACS[1], MACS[0], None, 60));
        }
        n.poll(0);
        let gu = &mut n.guests[1];
        let used = gu.rx.take_used(&gu.g);
        let ids: Vec<u32> = used.iter().map(|u| u.0).collect();
        assert_eq!(ids, vec![0, 1, 2], "in ring order (VIRTIO_F_IN_ORDER)");
        assert_eq!(used[1].1, 0, "the bad buffer comes back empty");
        assert_eq!(n.rx_stats(1).packets, 2);
        assert_eq!(n.rx_stats(1).drop_malformed, 1);
    }

    #[test]
    fn test_split_header_and_frame_descriptors() {
        let mut n = net(vec![VlanMode::default(); 2], true);
        n.post_rx(1, 4, 2048);
        let f = frame(MACS[1], MACS[0], None, 100);
        {
            let gu = &mut n.guests[0];
            let h = gu.g.alloc(12, 8);
            let a = gu.g.alloc(7, 8);
            let b = gu.g.alloc(93, 8);
            gu.g.write(h, &[0u8; 12]);
            gu.g.write(a, &f[..7]);
            gu.g.write(b, &f[7..]);
            gu.tx.add_chain(&gu.g, &[(h, 12, 0), (a, 7, 0), (b, 93, 0)]);
        }
        n.poll(0);
        assert_eq!(n.received(1), vec![f]);
    }

    fn all_caps() -> Caps {
        Caps::from_features(crate::virtio::features::Negotiated { bits: crate::virtio::features::OFFLOADS })
    }

    fn tso4(gso_size: u16, l2: u16) -> NetHdr {
        NetHdr {
            flags: offload::F_NEEDS_CSUM,
            gso_type: offload::GSO_TCPV4,
            hdr_len: l2 + 52,
            gso_size,
            csum_start: l2 + 20,
            csum_offset: 16,
        }
    }

    /// What a receiving kernel does with NEEDS_CSUM.
    fn complete_csum(vh: NetHdr, f: &mut [u8]) {
        assert_eq!(vh.flags, offload::F_NEEDS_CSUM);
        let (st, at) = (vh.csum_start as usize, (vh.csum_start + vh.csum_offset) as usize);
        let mut s = Sum::new();
        s.add(&f[st..]);
        f[at..at + 2].copy_from_slice(&s.checksum().to_be_bytes());
    }

    #[test]
    fn test_gso_frame_goes_whole_to_tso_receivers_and_cut_for_the_others() {
        use crate::offload::gso::tests::{check, gso_frame, FLAGS};
        // p1 takes TSO, p2 nothing, p3 only partial checksums. The frame's destination is
        // unknown, so it floods to all three: one frame, three treatments.
        let csum_only = Caps { rx_csum: true, ..Caps::default() };
        let caps = vec![all_caps(), all_caps(), Caps::default(), csum_only];
        let mut n = net_caps(vec![VlanMode::default(); 4], caps, true);
        for p in 1..4 {
            n.post_rx(p, 60, 2048);
        }
        let f = gso_frame(false, None, 20_000, FLAGS);
        n.send_with(0, tso4(1448, 14), &f, 19);
        assert_eq!(n.poll(0), 1);
        let whole = n.received_hdrs(1);
        assert_eq!(whole.len(), 1, "one 20 KB frame, in mergeable buffers");
        assert_eq!(whole[0].0, tso4(1448, 14), "the request passed on as is");
        assert_eq!(whole[0].1, f);
        assert_eq!(n.rx_stats(1).gso_whole, 1);

        let cut: Vec<_> = n
            .received_hdrs(2)
            .into_iter()
            .map(|(vh, s)| {
                assert_eq!(vh, NetHdr::default(), "full checksums, nothing asked");
                s
            })
            .collect();
        assert_eq!(cut.len(), 14);
        check(&f, &cut, false, 1448, FLAGS, None);
        let st = n.rx_stats(2);
        assert_eq!((st.gso_segmented, st.packets, st.drop_no_buffer), (1, 14, 0));

        let partial: Vec<_> = n
            .received_hdrs(3)
            .into_iter()
            .map(|(vh, mut s)| {
                complete_csum(vh, &mut s);
                s
            })
            .collect();
        check(&f, &partial, false, 1448, FLAGS, None);
        assert_eq!(n.tx_stats(0).packets, 1);
        assert_eq!(n.tx_stats(0).drop_malformed, 0);
    }

    #[test]
    fn test_gso_across_vlan_edits_and_ipv6() {
        use crate::offload::gso::tests::{check, gso_frame, FLAGS};
        // p0 sends untagged on VLAN 5; the trunks get it tagged: offsets move by 4.
        let caps = vec![all_caps(), all_caps(), Caps::default()];
        let mut n = net_caps(vec![VlanMode::Access(5), trunk(&[5]), trunk(&[5])], caps, true);
        n.post_rx(1, 60, 2048);
        n.post_rx(2, 60, 2048);
        let f = gso_frame(true, None, 9_001, FLAGS);
        let vh = NetHdr {
            gso_type: offload::GSO_TCPV6 | offload::GSO_ECN,
            hdr_len: 86,
            csum_start: 54,
            ..tso4(1000, 14)
        };
        n.send_with(0, vh, &f, 3);
        n.poll(0);
        let whole = n.received_hdrs(1);
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].0, NetHdr { hdr_len: 90, csum_start: 58, ..vh });
        assert_eq!(whole[0].1, tagged(&f, 5));
        let cut: Vec<_> = n.received_hdrs(2).into_iter().map(|(_, s)| s).collect();
        check(&f, &cut, true, 1000, FLAGS, Some(5));
    }

    #[test]
    fn test_whole_gso_frame_fills_one_big_chain_without_mergeable_buffers() {
        // A Linux guest with TSO and no MRG_RXBUF posts 19-page chains ("big packets").
        use crate::offload::gso::tests::{gso_frame, FLAGS};
        let mut n = net_caps(vec![VlanMode::default(); 2], vec![all_caps(); 2], false);
        let gu = &mut n.guests[1];
        let bufs: Vec<_> = (0..19).map(|_| (gu.g.alloc(4096, 4096), 4096, DESC_F_WRITE)).collect();
        let head = gu.rx.add_chain(&gu.g, &bufs);
        let f = gso_frame(false, None, 65_000, FLAGS);
        n.send_with(0, tso4(1448, 14), &f, 19);
        n.poll(0);
        let gu = &mut n.guests[1];
        let used = gu.rx.take_used(&gu.g);
        assert_eq!(used, vec![(head as u32, 12 + f.len() as u32)]);
        let mut got = Vec::new();
        for &(gpa, len, _) in &bufs {
            got.extend(gu.g.read(gpa, len as usize));
        }
        assert_eq!(&got[12..12 + f.len()], &f[..]);
    }

    #[test]
    fn test_partial_checksum_passed_on_or_completed() {
        use crate::offload::csum::pseudo_v4;
        use crate::offload::gso::tests::{gso_frame, V4};
        use pnet_packet::tcp::{ipv4_checksum, TcpPacket};
        // p2 gets it tagged: the completed checksum lands 4 bytes further.
        let csum_only = Caps { rx_csum: true, ..Caps::default() };
        let caps = vec![all_caps(), csum_only, Caps::default()];
        let mut n = net_caps(vec![VlanMode::Access(3), VlanMode::Access(3), trunk(&[3])], caps, true);
        n.post_rx(1, 4, 2048);
        n.post_rx(2, 4, 2048);
        let mut f = gso_frame(false, None, 999, 0x18);
        // As Linux leaves it: the pseudo-header sum in the field.
        let ps = pseudo_v4(&V4.0.octets(), &V4.1.octets(), 6, (f.len() - 34) as u32).fold();
        f[50..52].copy_from_slice(&ps.to_be_bytes());
        let vh =
            NetHdr { flags: offload::F_NEEDS_CSUM, csum_start: 34, csum_offset: 16, ..NetHdr::default() };
        n.send_with(0, vh, &f, 2);
        n.poll(0);
        let passed = n.received_hdrs(1);
        assert_eq!(passed, vec![(vh, f.clone())]);
        let done = n.received_hdrs(2);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].0, NetHdr::default());
        let t = TcpPacket::new(&done[0].1[38..]).unwrap();
        assert_eq!(t.get_checksum(), ipv4_checksum(&t, &V4.0, &V4.1), "completed in software");
        assert_eq!(&done[0].1[..50 + 4], &tagged(&f, 3)[..54]);
        assert_eq!(&done[0].1[56..], &tagged(&f, 3)[56..]);
        assert_eq!(n.rx_stats(2).csum_completed, 1);
        assert_eq!(n.rx_stats(1).csum_completed, 0);
    }

    #[test]
    fn test_gso_metadata_reaches_receivers_canonical_whatever_the_sender_wrote() {
        use crate::offload::gso::tests::{gso_frame, FLAGS};
        let caps = vec![all_caps(), all_caps()];
        let mut n = net_caps(vec![VlanMode::default(); 2], caps, true);
        n.post_rx(1, 32, 2048);
        let f = gso_frame(false, None, 20_000, FLAGS);
        // What Linux had to learn to refuse: the checksum "in" the IP header, a header length
        // of 0, and no NEEDS_CSUM on a GSO frame.
        let odd = NetHdr { flags: 0, hdr_len: 0, csum_start: 14, csum_offset: 10, ..tso4(1448, 14) };
        n.send_with(0, odd, &f, 3);
        let big = NetHdr { hdr_len: 65535, ..odd };
        n.send_with(0, big, &f, 1);
        assert_eq!(n.poll(0), 2);
        let got = n.received_hdrs(1);
        assert_eq!(got.len(), 2);
        for (vh, frame) in got {
            assert_eq!(vh, tso4(1448, 14), "rebuilt from the parse: TCP checksum field, real header length");
            assert_eq!(frame, f);
        }
        // Segments too small to be real TCP only multiply packets: refused.
        for mss in [1, 31, 32, 87] {
            n.send_with(0, tso4(mss, 14), &f, 1);
        }
        n.send_with(0, tso4(88, 14), &gso_frame(false, None, 880, FLAGS), 1);
        assert_eq!(n.poll(0), 5);
        assert_eq!(n.tx_stats(0).drop_malformed, 4);
        assert_eq!(n.received_hdrs(1).len(), 1, "the 88-byte segments pass");
    }

    #[test]
    fn test_the_policer_charges_a_gso_frame_for_every_segment() {
        use crate::offload::gso::tests::{gso_frame, FLAGS};
        use crate::policy::{BitRate, PolicerConfig, PolicyConfig};
        let caps = vec![all_caps(), all_caps()];
        let mut n = net_caps(vec![VlanMode::default(); 2], caps, true);
        n.post_rx(1, 40, 2048);
        // 100 packets/s, burst 32: one 20 KB frame cut at 1448 is 14 packets.
        let pol = PolicerConfig {
            rate: BitRate(10_000_000_000),
            burst: None,
            excess_burst: None,
            excess_rate: None,
            pps: Some(100),
        };
        n.ports[0].set_policy(&PolicyConfig { ingress: Some(pol), egress: None, anti_spoof: None }).unwrap();
        let f = gso_frame(false, None, 20_000, FLAGS);
        for _ in 0..4 {
            n.send_with(0, tso4(1448, 14), &f, 1);
        }
        n.poll(0);
        let s = n.ports[0].policy.stats.snapshot();
        assert_eq!(s.policed, 2, "two frames of 14 segments fit a burst of 32 packets, four do not");
        assert_eq!(n.received_hdrs(1).len(), 2);
    }

    /// A receive queue of `size` whose buffers translate through an empty IOTLB (every one
    /// misses) and whose misses go nowhere (counted unsent).
    fn iova_rx(size: u16) -> (MockGuest, MockRing, VirtQueue, Arc<crate::vhost::iotlb::IotlbStats>) {
        let mut g = MockGuest::new(4 << 20);
        let ring = g.ring(size);
        let mut rq = ring.queue(&g, true);
        rq.dma = iommu::Dma::iova(g.mem.clone(), iommu::Iotlb::new(64), 0, Default::default());
        let stats = Arc::<crate::vhost::iotlb::IotlbStats>::default();
        rq.iotlb = Some(Box::new(crate::vhost::iotlb::IotlbLink::new(None, stats.clone())));
        (g, ring, rq, stats)
    }

    #[test]
    fn test_parked_drain_stops_after_a_burst_of_bad_buffers() {
        let (g, mut ring, mut rq, _) = iova_rx(256);
        for _ in 0..200 {
            let gpa = 0x10_0000;
            ring.add_chain(&g, &[(gpa, 0, DESC_F_WRITE)]); // zero-length: malformed
        }
        let frame = vec![0u8; 12 + 60];
        rq.iotlb.as_deref_mut().unwrap().parked.push_back((frame, now_ns()));
        let d = drain_parked(&mut rq);
        assert_eq!(d.malformed, BURST as u64, "one call takes at most a burst of bad buffers");
        assert_eq!(rq.iotlb.as_deref().unwrap().parked.len(), 1, "the frame waits for the next call");
        let d = drain_parked(&mut rq);
        assert_eq!(d.malformed, BURST as u64);
    }

    #[test]
    fn test_rx_lookahead_asks_a_bounded_number_per_pass() {
        let (mut g, mut ring, mut rq, stats) = iova_rx(1024);
        for _ in 0..1000 {
            let gpa = g.alloc(4096, 4096);
            ring.add_chain(&g, &[(gpa, 2048, DESC_F_WRITE)]);
        }
        let asked = || stats.misses_unsent.load(std::sync::atomic::Ordering::Relaxed);
        rx_lookahead(&mut rq);
        assert_eq!(asked(), LOOKAHEAD as u64);
        rx_lookahead(&mut rq);
        assert_eq!(asked(), 2 * LOOKAHEAD as u64, "the next pass goes on where this one stopped");
    }

    #[test]
    fn test_bad_offload_requests_are_dropped_and_ignored_without_offloads() {
        use crate::offload::gso::tests::{gso_frame, FLAGS};
        let caps = vec![all_caps(), all_caps(), Caps::default()];
        let mut n = net_caps(vec![VlanMode::default(); 3], caps, true);
        n.post_rx(1, 16, 2048);
        let f = gso_frame(false, None, 100, 0x18);
        // The checksum field past the frame's end.
        let bad =
            NetHdr { flags: offload::F_NEEDS_CSUM, csum_start: 200, csum_offset: 16, ..NetHdr::default() };
        n.send_with(0, bad, &f, 1);
        // TCPv6 said, IPv4 given.
        let v6 = NetHdr { gso_type: offload::GSO_TCPV6, ..tso4(1448, 14) };
        n.send_with(0, v6, &gso_frame(false, None, 5000, FLAGS), 1);
        // Segment size 0.
        n.send_with(0, tso4(0, 14), &gso_frame(false, None, 5000, FLAGS), 1);
        // Longer than a frame without GSO may be.
        let plain =
            NetHdr { flags: offload::F_NEEDS_CSUM, csum_start: 34, csum_offset: 16, ..NetHdr::default() };
        n.send_with(0, plain, &gso_frame(false, None, 12_000, FLAGS), 1);
        n.poll(0);
        assert_eq!(n.tx_stats(0).drop_malformed, 4);
        assert!(n.received_hdrs(1).is_empty());
        assert_eq!(n.tx_returned(0).len(), 4, "every chain given back");
        // p2 negotiated nothing: whatever its header says is not a request.
        n.send_with(2, tso4(1448, 14), &f, 1);
        n.poll(2);
        assert_eq!(n.received_hdrs(1), vec![(NetHdr::default(), f.clone())]);
    }
}
