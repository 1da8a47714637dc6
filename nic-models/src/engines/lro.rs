//! Large receive offload: consecutive TCP segments of one flow coalesced into one large frame
//! before it is DMAed to the guest, by the rules the Linux kernel's GRO applies
//! (`inet_gro_receive` in `net/ipv4/af_inet.c`, `ipv6_gro_receive` in
//! `net/ipv6/ip6_offload.c`, `tcp_gro_receive` in `net/ipv4/tcp_offload.c`), so that what the
//! guest gets is what its own GRO would have built:
//!
//! - same flow: addresses, ports, VLAN; IPv4 without options or fragments, with a valid header
//!   checksum, the same TOS, TTL and DF, and an IP id that increments per segment (or stays
//!   fixed with DF); IPv6 with the same traffic class, flow label and hop limit and no
//!   extension headers;
//! - in order: each segment starts where the last ended; the same ACK number and identical TCP
//!   options; flags equal except CWR, FIN and PSH; no CWR on a merged segment;
//! - the first segment's payload sets the MSS; a later one may not be longer, and one that is
//!   shorter, or carries PSH, FIN, URG, RST or SYN, is merged last and ends the frame;
//! - a pure ACK (no payload), a bad TCP checksum, SYN, RST or URG on a segment that would start
//!   a frame: not held, delivered as it is (after its flow's held frame);
//! - bounds: 65,535 bytes of IP datagram, `max_segs` segments, and a timer (`flush_due`).
//!
//! A merged frame comes out with its IP length and checksum and its TCP checksum rewritten, and
//! the MSS and segment count a guest's virtio-net header needs (`GSO_TCPV4/6`, `gso_size`).

use super::csum::{fold, insert_l4, pseudo, verify};
use super::{ip_end, layout, set_ip_len, Layout, TCP};

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const URG: u8 = 0x20;
const CWR: u8 = 0x80;

/// The engine's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LroConfig {
    /// Flows held at once (GRO keeps 8 per NAPI context).
    pub flows: usize,
    /// Most segments in one frame (MAX_SKB_FRAGS + 1 = 18 in Linux).
    pub max_segs: u16,
    /// Longest a frame is held, ns.
    pub timeout_ns: u64,
    /// Give coalesced frames a partial TCP checksum (the pseudo-header sum, for the receiver
    /// or the next hop to complete: virtio's `NEEDS_CSUM` with `csum_start` at the TCP header
    /// and `csum_offset` 16), as a host stack hands GRO's frames on, rather than a whole one.
    pub partial: bool,
    /// Segments with less payload are not held: a GSO frame with a segment size under the
    /// receiver's minimum (Linux's TCP_MIN_MSS, 88) would be refused by whoever takes it.
    pub min_mss: u16,
}

impl Default for LroConfig {
    fn default() -> Self {
        LroConfig { flows: 8, max_segs: 18, timeout_ns: 20_000, partial: false, min_mss: 0 }
    }
}

/// A frame the engine gives back: coalesced (`segs > 1`) or as it came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Out {
    /// The frame.
    pub frame: Vec<u8>,
    /// Segments in it.
    pub segs: u16,
    /// The first segment's payload length (`gso_size` for the guest when `segs > 1`).
    pub mss: u16,
    /// IPv6.
    pub v6: bool,
}

struct Flow {
    frame: Vec<u8>,
    l: Layout,
    /// The flow's identity: the bytes a segment must match (addresses, ports, VLAN).
    key: Key,
    next_seq: u32,
    first_id: u16,
    segs: u16,
    mss: u16,
    since: u64,
}

/// Counters of what the engine did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LroCounters {
    /// Segments merged into a held frame.
    pub merged: u64,
    /// Frames given back with more than one segment.
    pub coalesced: u64,
    /// Frames given back as they came.
    pub passed: u64,
}

/// The coalescing engine of one RX queue.
pub struct Lro {
    cfg: LroConfig,
    flows: Vec<Flow>,
    /// Frame buffers given back by the engine's user, reused (no allocation once warm).
    free: Vec<Vec<u8>>,
    /// What the engine did.
    pub counters: LroCounters,
}

/// The bytes that name a segment's flow: VLAN tag, addresses, ports (at most 4 + 32 + 4).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    b: [u8; 40],
    n: u8,
}

fn flow_key(f: &[u8], l: &Layout) -> Key {
    let mut k = Key { b: [0; 40], n: 0 };
    let addrs = if l.v6 { l.l3 + 8..l.l3 + 40 } else { l.l3 + 12..l.l3 + 20 };
    for part in [&f[14..l.l3], &f[addrs], &f[l.l4..l.l4 + 4]] {
        let n = k.n as usize;
        k.b[n..n + part.len()].copy_from_slice(part);
        k.n += part.len() as u8;
    }
    k
}

/// Whether a segment may start or join a held frame at all (GRO's per-packet checks).
fn holdable(f: &[u8], l: &Layout) -> bool {
    if l.proto != TCP || l.payload >= ip_end(f, l) {
        return false;
    }
    let fl = f[l.l4 + 13];
    if fl & (SYN | RST | URG | CWR) != 0 || fl & ACK == 0 {
        return false;
    }
    if !l.v6 && (l.l4 - l.l3 != 20) {
        return false;
    }
    let s = verify(f);
    s.l4_checked && !s.l4_error && !s.ip_error
}

impl Lro {
    /// An engine with no flow held.
    pub fn new(cfg: LroConfig) -> Self {
        Lro { cfg, flows: Vec::with_capacity(cfg.flows), free: Vec::new(), counters: LroCounters::default() }
    }

    /// Takes back a frame buffer the engine gave out, to reuse.
    pub fn recycle(&mut self, mut frame: Vec<u8>) {
        if self.free.len() < 2 * self.cfg.flows + 64 {
            frame.clear();
            self.free.push(frame);
        }
    }

    /// A buffer holding a copy of `bytes`.
    fn buf(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut b = self.free.pop().unwrap_or_default();
        b.clear();
        b.extend_from_slice(bytes);
        b
    }

    /// Flows held now.
    pub fn held(&self) -> usize {
        self.flows.len()
    }

    /// Offers a received frame at `now`; frames ready to go to the guest are pushed to `out`,
    /// in arrival order per flow.
    pub fn receive(&mut self, f: &[u8], now: u64, out: &mut Vec<Out>) {
        let Some(l) = layout(f).filter(|l| l.proto == TCP) else {
            return self.pass(f, out);
        };
        let key = flow_key(f, &l);
        let at = self.flows.iter().position(|fl| fl.key == key);
        if let Some(i) = at {
            if holdable(f, &l) && self.fits(i, f, &l) {
                let end = self.merge(i, f, &l);
                if end {
                    let fl = self.flows.remove(i);
                    self.emit(fl, out);
                }
                return;
            }
            // Not the next segment of this frame: the held frame goes first.
            let fl = self.flows.remove(i);
            self.emit(fl, out);
        }
        let len = (ip_end(f, &l) - l.payload) as u16;
        let fl = f[l.l4 + 13];
        let ends = fl & (PSH | FIN) != 0;
        if !holdable(f, &l) || ends || len < self.cfg.min_mss {
            return self.pass(f, out);
        }
        if self.flows.len() == self.cfg.flows {
            // Full: the oldest flow goes (GRO evicts the oldest too).
            let fl = self.flows.remove(0);
            self.emit(fl, out);
        }
        let seq = u32::from_be_bytes(f[l.l4 + 4..l.l4 + 8].try_into().expect("4 bytes"));
        let first_id = u16::from_be_bytes([f[l.l3 + 4], f[l.l3 + 5]]);
        let frame = self.buf(&f[..ip_end(f, &l)]);
        self.flows.push(Flow {
            frame,
            l,
            key,
            next_seq: seq.wrapping_add(u32::from(len)),
            first_id,
            segs: 1,
            mss: len,
            since: now,
        });
    }

    /// Whether segment `f` continues held frame `i` (the GRO rules above).
    fn fits(&self, i: usize, f: &[u8], l: &Layout) -> bool {
        let fl = &self.flows[i];
        let h = &fl.frame;
        let (a, b) = (fl.l, *l);
        if a.l4 - a.l3 != b.l4 - b.l3 || a.payload - a.l4 != b.payload - b.l4 {
            return false;
        }
        let len = ip_end(f, l) - l.payload;
        if len > fl.mss as usize || fl.segs >= self.cfg.max_segs || h.len() - a.l3 + len > 65_535 {
            return false;
        }
        if a.v6 {
            // Version, traffic class, flow label; next header; hop limit.
            if h[a.l3..a.l3 + 4] != f[b.l3..b.l3 + 4] || h[a.l3 + 6..a.l3 + 8] != f[b.l3 + 6..b.l3 + 8] {
                return false;
            }
        } else {
            let (ttl_tos_a, ttl_tos_b) = ((h[a.l3 + 1], h[a.l3 + 8]), (f[b.l3 + 1], f[b.l3 + 8]));
            let df_a = h[a.l3 + 6] & 0x40;
            let df_b = f[b.l3 + 6] & 0x40;
            if ttl_tos_a != ttl_tos_b || df_a != df_b {
                return false;
            }
            let id = u16::from_be_bytes([f[b.l3 + 4], f[b.l3 + 5]]);
            let incrementing = id == fl.first_id.wrapping_add(fl.segs);
            let fixed = df_b != 0 && id == fl.first_id;
            if !incrementing && !fixed {
                return false;
            }
        }
        let seq = u32::from_be_bytes(f[b.l4 + 4..b.l4 + 8].try_into().expect("4 bytes"));
        let (fa, fb) = (h[a.l4 + 13], f[b.l4 + 13]);
        seq == fl.next_seq
            && h[a.l4 + 8..a.l4 + 12] == f[b.l4 + 8..b.l4 + 12]
            && (fa ^ fb) & !(CWR | FIN | PSH) == 0
            && h[a.l4 + 20..a.payload] == f[b.l4 + 20..b.payload]
    }

    /// Appends segment `f` to held frame `i`; whether the frame must now go.
    fn merge(&mut self, i: usize, f: &[u8], l: &Layout) -> bool {
        let fl = &mut self.flows[i];
        let len = ip_end(f, l) - l.payload;
        fl.frame.extend_from_slice(&f[l.payload..l.payload + len]);
        fl.next_seq = fl.next_seq.wrapping_add(len as u32);
        fl.segs += 1;
        let flags = f[l.l4 + 13];
        fl.frame[fl.l.l4 + 13] |= flags & (FIN | PSH);
        self.counters.merged += 1;
        len < fl.mss as usize || flags & (PSH | FIN) != 0
    }

    fn pass(&mut self, f: &[u8], out: &mut Vec<Out>) {
        self.counters.passed += 1;
        let (mss, v6) = match layout(f) {
            Some(l) => ((ip_end(f, &l) - l.payload) as u16, l.v6),
            None => (0, false),
        };
        let frame = self.buf(f);
        out.push(Out { frame, segs: 1, mss, v6 });
    }

    fn emit(&mut self, mut fl: Flow, out: &mut Vec<Out>) {
        if fl.segs == 1 {
            self.counters.passed += 1;
            out.push(Out { frame: fl.frame, segs: 1, mss: fl.mss, v6: fl.l.v6 });
            return;
        }
        let l = fl.l;
        let f = &mut fl.frame;
        set_ip_len(f, &l, None);
        if self.cfg.partial {
            let end = f.len();
            let at = l.l4 + 16;
            let ph = fold(pseudo(f, &l, end - l.l4));
            f[at..at + 2].copy_from_slice(&ph.to_be_bytes());
        } else {
            insert_l4(f, &l);
        }
        self.counters.coalesced += 1;
        out.push(Out { frame: fl.frame, segs: fl.segs, mss: fl.mss, v6: l.v6 });
    }

    /// Gives back every frame held since before `now - timeout`.
    pub fn flush_due(&mut self, now: u64, out: &mut Vec<Out>) {
        let t = self.cfg.timeout_ns;
        while let Some(i) = self.flows.iter().position(|fl| now.saturating_sub(fl.since) >= t) {
            let fl = self.flows.remove(i);
            self.emit(fl, out);
        }
    }

    /// Gives back every held frame (the end of a poll, as NAPI does).
    pub fn flush_all(&mut self, out: &mut Vec<Out>) {
        for fl in std::mem::take(&mut self.flows) {
            self.emit(fl, out);
        }
    }
}
