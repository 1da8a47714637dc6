use super::*;
use shaping::Colour;

use crate::clock::now_ns;
use crate::l2::{is_group, Mac};
use crate::policy::spoof::{SpoofReason, Verdict};

impl Datapath {
    /// The sender's policy, before anything is learned or copied: anti-spoofing on each frame's
    /// first bytes (read in place), then the policer. One lock and one clock read per burst.
    #[inline(never)]
    pub(super) fn ingress(&mut self, src: &Port, hdr: u32, n: usize, c: &mut SrcCounts) {
        let pol = &src.policy;
        let mut g = pol.ingress.lock();
        let ing = &mut *g;
        if let Some(p) = &mut ing.policer {
            p.advance(now_ns());
        }
        let (mut red, mut yellow) = (0u64, 0u64);
        for i in 0..n {
            if self.desc.pkts[i].action == Action::Drop {
                continue;
            }
            if let Some(f) = &ing.spoof {
                let p = &self.desc.pkts[i];
                let mut v = f.check(&self.desc.heads[i][..p.head_len as usize]);
                let truncated = (p.head_len as u32) < p.len && (p.head_len as usize) < HEAD;
                if matches!(v, Verdict::NeedBytes(_)) || (matches!(v, Verdict::Drop(_)) && truncated) {
                    // A longer look (neighbour discovery, IPv4 options): take a longer
                    // snapshot and decide on it alone.
                    v = match self.snapshot(i, hdr, HEAD, c) {
                        true => match f.check(&self.desc.heads[i][..self.desc.pkts[i].head_len as usize]) {
                            // Longer than any snapshot: cannot be checked atomically, refused.
                            Verdict::NeedBytes(_) => Verdict::Drop(SpoofReason::Nd),
                            v => v,
                        },
                        false => continue, // malformed now (counted)
                    };
                }
                if let Verdict::Drop(r) = v {
                    self.desc.pkts[i].action = Action::Drop;
                    bump(pol.stats.spoof(r), 1);
                    c.policy += 1;
                    continue;
                }
            }
            let p = &mut self.desc.pkts[i];
            if let Some(pl) = &mut ing.policer {
                // A segmentation request is charged as the packets it becomes.
                let (segs, bytes) = if p.offload { self.desc.vhdrs[i].wire_cost(p.len) } else { (1, p.len) };
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

    /// Learns sources, looks up destinations, applies the ingress VLAN rule. Consecutive
    /// packets of one flow reuse the previous decision.
    #[inline(always)]
    pub(super) fn decide(&mut self, src: &Port, n: usize, now: u32, c: &mut SrcCounts) {
        // Every bucket the burst will touch, loading at once (a table larger than the cache
        // misses on most of them). Consecutive packets of one flow are looked up once.
        // A source is learned (and its bucket loaded) once per burst while it repeats: a
        // burst from one guest to many (a mesh) has one source and a new destination for
        // almost every packet, and learning each again cost ~45 instructions per frame.
        let mut last = (0, 0, None);
        let mut last_src = None;
        for p in &self.desc.pkts[..n] {
            if p.action == Action::Drop || (p.src, p.dst, p.tci) == last {
                continue;
            }
            last = (p.src, p.dst, p.tci);
            if let Some(vlan) = src.vlan.ingress(p.tci) {
                if last_src != Some((vlan, p.src)) {
                    self.fdb.prefetch(vlan, p.src);
                    last_src = Some((vlan, p.src));
                }
                self.fdb.prefetch(vlan, p.dst);
            }
        }
        let mut learned = None;
        let mut prev: Option<(Option<u16>, Mac, Mac, u16, Action)> = None;
        for p in &mut self.desc.pkts[..n] {
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
            if !is_group(p.src) && learned != Some((vlan, p.src)) {
                self.fdb.learn(vlan, p.src, src.id, now);
                learned = Some((vlan, p.src));
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
}
