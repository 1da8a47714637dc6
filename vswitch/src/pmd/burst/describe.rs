use super::*;
use crate::l2::mac_from_bytes;
use crate::offload::{self, Caps};
use crate::virtio::VirtQueue;
use virtq::ChainError;

use super::super::copy::{read_bytes, read_prefix, Frame};
use super::viommu::tx_miss;

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

impl Datapath {
    /// Takes up to `n` heads and turns each into a `PacketRef`: chain walked and checked, header
    /// fields read in place. Returns how many were taken: a chain waiting for an IOTLB
    /// translation stays in the ring, with those after it.
    #[inline(always)]
    pub(super) fn describe(
        &mut self,
        q: &mut VirtQueue,
        mut n: usize,
        spoof_check: bool,
        c: &mut SrcCounts,
    ) -> usize {
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
            let p = &mut self.desc.pkts[i];
            *p = PacketRef { head, give_back: true, ..PacketRef::default() };
            let segs = &mut self.desc.segs[i];
            let chain = q.ring.walk(&mut q.dma, head, q.indirect, q.max_frame + hdr, segs);
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
        self.describe_frames(n, hdr, q.caps, spoof_check, c);
        n
    }

    /// Pass 2, for any source: snapshots the L2 header of each forwardable packet (the whole
    /// head the anti-spoofing check looks at, if the port has one) and reads its offload
    /// request if the sender may make one (`caps`).
    #[inline(always)]
    pub(super) fn describe_frames(
        &mut self,
        n: usize,
        hdr: u32,
        caps: Caps,
        spoof_check: bool,
        c: &mut SrcCounts,
    ) {
        let want = if spoof_check { spoof::PREFIX } else { L2_HEAD };
        for i in 0..n {
            if self.desc.pkts[i].action == Action::Drop {
                continue;
            }
            if !self.snapshot(i, hdr, want, c) {
                continue;
            }
            if caps.any_tx() && !self.read_request(i, caps, hdr, c) {
                continue;
            }
            c.packets += 1;
            c.bytes += self.desc.pkts[i].len as u64;
        }
    }

    /// Reads and checks the offload request in packet `i`'s virtio-net header (its sender
    /// negotiated offloads). A GSO frame's whole header goes into the snapshot and must parse.
    /// False: refused, the packet dropped (counted malformed).
    #[inline(always)]
    pub(super) fn read_request(&mut self, i: usize, caps: Caps, hdr: u32, c: &mut SrcCounts) -> bool {
        let s0 = self.desc.segs[i][0];
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
    pub(super) fn read_request_slow(&mut self, i: usize, caps: Caps, hdr: u32, c: &mut SrcCounts) -> bool {
        let p = &self.desc.pkts[i];
        let mut b = [0u8; 10];
        let f = Frame { segs: &self.desc.segs[i][..p.nseg as usize], skip: 0, len: hdr, head: &[] };
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
                let p = &self.desc.pkts[i];
                let head = &self.desc.heads[i][..p.head_len as usize];
                Segmenter::new(head, p.len, h.gso_size, h.gso_v6(), TagEdit::Keep)
                    .map(|sg| h.canonical_gso(&sg))
                    .map_err(offload::BadRequest::Gso)
            }
            Err(e) => Err(e),
        };
        match checked {
            Ok(h) => {
                self.desc.vhdrs[i] = h;
                self.desc.pkts[i].offload = true;
                true
            }
            Err(e) => {
                tracing::debug!("offload request refused: {e}");
                self.desc.pkts[i].action = Action::Drop;
                c.malformed += 1;
                false
            }
        }
    }

    /// Reads packet `i`'s first `want` bytes into its snapshot and takes its L2 fields from
    /// there. False (packet dropped, counted) if it is too short for its VLAN tag.
    #[inline(always)]
    pub(super) fn snapshot(&mut self, i: usize, hdr: u32, want: usize, c: &mut SrcCounts) -> bool {
        let p = &mut self.desc.pkts[i];
        let f = Frame { segs: &self.desc.segs[i][..p.nseg as usize], skip: hdr, len: p.len, head: &[] };
        let h = &mut self.desc.heads[i];
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
}
