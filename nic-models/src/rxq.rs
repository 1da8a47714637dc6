//! A device RX queue bound to a guest's virtio receive ring: the Level 1 "no copy" path.
//!
//! The guest posts receive buffers in its own virtio ring, as it would for the switch; the
//! modelled device's DMA engine takes the next one, translates every buffer address through the
//! port's IOMMU domain ([`iommu::Dma`]: the vhost-user memory table, or the vIOMMU's IOTLB),
//! writes the virtio-net header and the frame into it and writes the used entry back, as a
//! vDPA NIC does. No host CPU copies the frame (`cpu_copies` stays 0); the work is counted as
//! the device's: descriptor fetches, write-backs, DMA bytes and TLPs.
//!
//! A buffer the domain refuses (outside the guest, read-only, a malformed chain) is a DMA
//! fault: counted, the buffer returned with length 0, nothing written, the frame dropped. An
//! address the IOTLB does not hold yet is a miss: the buffer is put back untouched and the
//! caller asks the frontend for the translation.

use iommu::{Dma, Grant, GrantWriter, Rw};
use virtq::chain::{walk_chain, ChainError, MAX_SEGS};
use virtq::ring::{RingAddrs, RingError, SplitRing};
use virtq::RingState;

use crate::account::{DeviceCounters, PcieCost};

/// Largest frame a queue takes with its header: a 12-byte virtio-net header, an Ethernet
/// header with one VLAN tag and a 64 KiB IP datagram (a TSO/LRO frame).
pub const MAX_RX: u32 = 12 + 18 + 65_535;
/// Most buffers one frame may take with mergeable receive buffers: a 64 KiB frame in Linux's
/// smallest mergeable buffers (1536 bytes) takes 43.
const MAX_HEADS: usize = 64;
/// Most segments one frame may be written into.
const RX_SEGS: usize = 2 * MAX_SEGS;

/// Why a frame did not reach the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RxDrop {
    /// the guest has posted no (or not enough) receive buffers
    #[error("no receive buffer posted")]
    NoBuffer,
    /// the guest's buffers are smaller than the frame and it did not negotiate mergeable buffers
    #[error("receive buffer smaller than the frame")]
    TooSmall,
    /// a buffer the IOMMU domain refused; the buffer went back with length 0
    #[error("DMA fault: {0}")]
    Fault(ChainError),
    /// the queue was quiesced for a hand-over; the frame is for the ring's next owner
    #[error("queue quiesced")]
    Quiesced,
    /// an address the IOTLB does not hold yet; the buffer was put back, ask for `iova`
    #[error("IOTLB miss at {iova:#x}")]
    Miss {
        /// The address to ask the frontend for.
        iova: u64,
    },
    /// the guest's ring itself is broken (an available index past a ring's worth)
    #[error("ring broken: {0}")]
    Broken(RingError),
}

/// How a guest's receive ring is laid out: what it negotiated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RxFormat {
    /// The virtio-net header length (10, or 12 with VERSION_1 or mergeable buffers).
    pub hdr_len: u32,
    /// Whether a frame may span several buffers (MRG_RXBUF).
    pub mergeable: bool,
    /// Whether the guest may post indirect tables.
    pub indirect: bool,
    /// The bus cost table the TLP counts follow.
    pub cost: PcieCost,
}

/// The DMA engine's working space (reused across frames).
pub struct RxScratch {
    segs: [Grant<Rw>; RX_SEGS],
    heads: [(u16, u32, u8); MAX_HEADS],
}

// SAFETY: the grants in the scratch are only meaningful during one `dma_rx` call, under the
// lock of the ring they point into; between calls they are dead values.
unsafe impl Send for RxScratch {}

impl Default for RxScratch {
    fn default() -> Self {
        RxScratch { segs: [Grant::default(); RX_SEGS], heads: [(0, 0, 0); MAX_HEADS] }
    }
}

/// DMAs one frame, given as `parts` laid end to end (a VLAN tag the device strips is left
/// out between two parts), with its virtio-net header `hdr` (at least `hdr_len` bytes; the
/// first `hdr_len` are written, `num_buffers` filled in) into the next buffer(s) of `ring`,
/// translating through `dma`. The used entries become visible when the ring's owner publishes.
pub fn dma_rx(
    ring: &mut SplitRing,
    dma: &mut Dma,
    fmt: &RxFormat,
    s: &mut RxScratch,
    c: &mut DeviceCounters,
    hdr: &[u8],
    parts: &[&[u8]],
) -> Result<(), RxDrop> {
    let flen: usize = parts.iter().map(|p| p.len()).sum();
    let need = fmt.hdr_len + flen as u32;
    if need > MAX_RX || (hdr.len() as u32) < fmt.hdr_len || fmt.hdr_len > 12 {
        return Err(RxDrop::TooSmall);
    }
    let (nheads, nseg) = match take(ring, dma, fmt, s, c, need) {
        Ok(t) => t,
        Err(e) => {
            if e == RxDrop::NoBuffer {
                c.no_buffer += 1;
            }
            return Err(e);
        }
    };
    let mut h = [0u8; 12];
    let hl = fmt.hdr_len as usize;
    h[..hl].copy_from_slice(&hdr[..hl]);
    if fmt.mergeable && hl >= 12 {
        h[10..12].copy_from_slice(&(nheads as u16).to_le_bytes());
    }
    let segs = &s.segs[..nseg];
    let mut w = GrantWriter::new(segs);
    // SAFETY: the grants were made by walking `ring` through `dma`, whose address space the
    // caller keeps mapped while it holds the ring; they cover exactly the guest's buffers.
    let mut ok = unsafe { w.put(&h[..hl]) };
    for p in parts {
        // SAFETY: as above.
        ok &= unsafe { w.put(p) };
    }
    debug_assert!(ok, "buffers were sized before writing");
    // The used entries: each head gets the bytes that landed in its segments.
    let mut left = need;
    let mut first_seg = 0usize;
    for &(head, cap, n) in &s.heads[..nheads] {
        let put = left.min(cap);
        left -= put;
        ring.push_used(head, put);
        let mut here_left = put;
        for g in &segs[first_seg..first_seg + n as usize] {
            // Every contiguous piece the device writes is a run of MPS-sized TLPs.
            let here = g.len().min(here_left);
            here_left -= here;
            if here > 0 {
                c.tlps += fmt.cost.write_tlps(here);
            }
        }
        first_seg += n as usize;
    }
    c.packets += 1;
    c.bytes += u64::from(need);
    c.dma_write_bytes += u64::from(need) + 8 * nheads as u64;
    c.desc_writebacks += nheads as u64;
    c.tlps += nheads as u64;
    Ok(())
}

/// Takes enough buffers for `need` bytes: one chain, or several with mergeable buffers.
/// Returns (heads, segments).
fn take(
    ring: &mut SplitRing,
    dma: &mut Dma,
    fmt: &RxFormat,
    s: &mut RxScratch,
    c: &mut DeviceCounters,
    need: u32,
) -> Result<(usize, usize), RxDrop> {
    let mut nheads = 0usize;
    let mut nseg = 0usize;
    let mut have = 0u32;
    while have < need {
        let pending = ring.avail_pending().map_err(RxDrop::Broken)?;
        if pending == 0 || nheads == MAX_HEADS || nseg == RX_SEGS {
            ring.unpop(nheads as u16);
            return Err(RxDrop::NoBuffer);
        }
        let head = ring.pop_head();
        // The available-ring entry (2 bytes) and the descriptors behind it.
        c.desc_fetches += 1;
        c.dma_read_bytes += 2;
        c.tlps += fmt.cost.read_tlps(2);
        match walk_chain::<Rw>(ring, dma, head, fmt.indirect, MAX_RX, &mut s.segs[nseg..]) {
            Ok(ch) => {
                c.desc_fetches += u64::from(ch.nseg);
                c.dma_read_bytes += 16 * u64::from(ch.nseg);
                c.tlps += fmt.cost.read_tlps(16 * u32::from(ch.nseg));
                c.iotlb_lookups += u64::from(ch.nseg);
                s.heads[nheads] = (head, ch.len, ch.nseg);
                nheads += 1;
                nseg += ch.nseg as usize;
                have += ch.len;
            }
            Err(ChainError::Miss { iova }) => {
                c.iotlb_lookups += 1;
                c.iotlb_misses += 1;
                ring.unpop(nheads as u16 + 1);
                return Err(RxDrop::Miss { iova });
            }
            Err(e) => {
                // Never trusted: the faulting buffer goes back empty. In a split ring the
                // buffers taken before it cannot be skipped without being used, so they go
                // back empty too and the guest reposts them (only a guest that posts a bad
                // buffer loses anything to it).
                c.dma_faults += 1;
                c.iotlb_lookups += 1;
                for &(h, _, _) in &s.heads[..nheads] {
                    ring.push_used(h, 0);
                }
                ring.push_used(head, 0);
                c.desc_writebacks += nheads as u64 + 1;
                c.dma_write_bytes += 8 * (nheads as u64 + 1);
                return Err(RxDrop::Fault(e));
            }
        }
        if !fmt.mergeable && have < need {
            // One chain per frame: a guest that posts small buffers without mergeable buffers
            // cannot take this frame; its buffer stays posted.
            ring.unpop(1);
            return Err(RxDrop::TooSmall);
        }
    }
    Ok((nheads, nseg))
}

/// A device RX queue that owns a guest's receive ring (a standalone model, the harness, a
/// Level 2 queue pair); the switch runs [`dma_rx`] on the rings it holds instead.
pub struct RxQueue {
    ring: SplitRing,
    handoff: virtq::RingHandoff,
    dma: Dma,
    fmt: RxFormat,
    scratch: RxScratch,
    /// What the queue has done.
    pub counters: DeviceCounters,
}

impl RxQueue {
    /// Takes over a receive ring at `state` (the accelerator contract's plug): from here the
    /// device fills it. `hdr_len` and `mergeable` come from the negotiated features.
    pub fn new(
        mut dma: Dma,
        addrs: RingAddrs,
        size: u32,
        state: RingState,
        event_idx: bool,
        hdr_len: u32,
        mergeable: bool,
    ) -> Result<Self, RingError> {
        let ring = SplitRing::new(&mut dma, addrs, size, state.last_avail, event_idx)?;
        let fmt = RxFormat { hdr_len, mergeable, indirect: true, cost: PcieCost::default() };
        let handoff = virtq::RingHandoff { addrs, size: ring.size(), state, event_idx };
        Ok(RxQueue {
            ring,
            handoff,
            dma,
            fmt,
            scratch: RxScratch::default(),
            counters: DeviceCounters::default(),
        })
    }

    /// Sets the bus cost table the TLP counts follow.
    pub fn set_cost(&mut self, cost: PcieCost) {
        self.fmt.cost = cost;
    }

    /// The ring state to hand back (after [`publish`](Self::publish)).
    pub fn state(&self) -> RingState {
        self.ring.state()
    }

    /// The ring as it would be handed on now (after [`publish`](Self::publish)).
    pub fn handoff(&self) -> virtq::RingHandoff {
        virtq::RingHandoff { state: self.ring.state(), ..self.handoff }
    }

    /// The IOMMU domain the queue translates through (to add IOTLB entries after a miss).
    pub fn dma_mut(&mut self) -> &mut Dma {
        &mut self.dma
    }

    /// The guest's ring and the domain it is read through, together (a look-ahead over the
    /// posted buffers for translations to ask for, as a device with ATS does).
    pub fn ring_and_dma(&mut self) -> (&mut SplitRing, &mut Dma) {
        (&mut self.ring, &mut self.dma)
    }

    /// DMAs one frame with its virtio-net header into the guest's next buffer(s); see
    /// [`dma_rx`].
    pub fn receive(&mut self, hdr: &[u8], frame: &[u8]) -> Result<(), RxDrop> {
        self.receive_parts(hdr, &[frame])
    }

    /// [`receive`](Self::receive) of a frame in pieces (a stripped VLAN tag leaves two).
    pub fn receive_parts(&mut self, hdr: &[u8], frame: &[&[u8]]) -> Result<(), RxDrop> {
        dma_rx(&mut self.ring, &mut self.dma, &self.fmt, &mut self.scratch, &mut self.counters, hdr, frame)
    }

    /// Makes the used entries visible (one index write); whether the guest asked to be
    /// interrupted for them (the moderator decides when).
    pub fn publish(&mut self) -> bool {
        self.ring.publish_used();
        self.ring.needs_interrupt()
    }
}
