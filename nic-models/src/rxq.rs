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

/// Largest frame a queue takes (a 64 KiB TSO/LRO frame and its header).
pub const MAX_RX: u32 = 65_550;
/// Most buffers one frame may take with mergeable receive buffers.
const MAX_HEADS: usize = MAX_SEGS;

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

/// A device RX queue over a guest's receive ring.
pub struct RxQueue {
    ring: SplitRing,
    dma: Dma,
    /// The virtio-net header length the guest negotiated (10, or 12 with VERSION_1 or
    /// mergeable buffers).
    hdr_len: u32,
    mergeable: bool,
    cost: PcieCost,
    segs: [Grant<Rw>; MAX_SEGS],
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
        Ok(RxQueue {
            ring,
            dma,
            hdr_len,
            mergeable,
            cost: PcieCost::default(),
            segs: [Grant::default(); MAX_SEGS],
            counters: DeviceCounters::default(),
        })
    }

    /// Sets the bus cost table the TLP counts follow.
    pub fn set_cost(&mut self, cost: PcieCost) {
        self.cost = cost;
    }

    /// The ring state to hand back (after [`publish`](Self::publish)).
    pub fn state(&self) -> RingState {
        self.ring.state()
    }

    /// The IOMMU domain the queue translates through (to add IOTLB entries after a miss).
    pub fn dma_mut(&mut self) -> &mut Dma {
        &mut self.dma
    }

    /// DMAs one frame with its virtio-net header `hdr` (at least `hdr_len` bytes; the first
    /// `hdr_len` are written, `num_buffers` filled in) into the guest's next buffer(s). The
    /// used entries become visible at [`publish`](Self::publish).
    pub fn receive(&mut self, hdr: &[u8], frame: &[u8]) -> Result<(), RxDrop> {
        let need = self.hdr_len + frame.len() as u32;
        if need > MAX_RX || (hdr.len() as u32) < self.hdr_len {
            return Err(RxDrop::TooSmall);
        }
        let mut heads = [(0u16, 0u32, 0u8); MAX_HEADS];
        let (nheads, nseg) = match self.take(need, &mut heads) {
            Ok(t) => t,
            Err(e) => {
                if e == RxDrop::NoBuffer {
                    self.counters.no_buffer += 1;
                }
                return Err(e);
            }
        };
        let mut h = [0u8; 12];
        let hl = self.hdr_len as usize;
        h[..hl].copy_from_slice(&hdr[..hl]);
        if self.mergeable && hl >= 12 {
            h[10..12].copy_from_slice(&(nheads as u16).to_le_bytes());
        }
        let segs = &self.segs[..nseg];
        let mut w = GrantWriter::new(segs);
        // SAFETY: the grants were made by walking this ring through `self.dma`, which keeps the
        // guest's memory mapped while the queue lives; they cover exactly the guest's buffers.
        let ok = unsafe { w.put(&h[..hl]) && w.put(frame) };
        debug_assert!(ok, "buffers were sized before writing");
        // The used entries: each head gets the bytes that landed in its segments.
        let mut left = need;
        let mut first_seg = 0usize;
        for &(head, cap, n) in &heads[..nheads] {
            let put = left.min(cap);
            left -= put;
            self.ring.push_used(head, put);
            for s in &segs[first_seg..first_seg + n as usize] {
                // Every contiguous piece the device writes is a run of MPS-sized TLPs.
                let here = s.len().min(put);
                if here > 0 {
                    self.counters.tlps += self.cost.write_tlps(here);
                }
            }
            first_seg += n as usize;
        }
        let c = &mut self.counters;
        c.packets += 1;
        c.bytes += u64::from(need);
        c.dma_write_bytes += u64::from(need) + 8 * nheads as u64;
        c.desc_writebacks += nheads as u64;
        c.tlps += nheads as u64;
        Ok(())
    }

    /// Takes enough buffers for `need` bytes: one chain, or several with mergeable buffers.
    /// Returns (heads, segments).
    fn take(&mut self, need: u32, heads: &mut [(u16, u32, u8); MAX_HEADS]) -> Result<(usize, usize), RxDrop> {
        let mut nheads = 0usize;
        let mut nseg = 0usize;
        let mut have = 0u32;
        while have < need {
            let pending = self.ring.avail_pending().map_err(RxDrop::Broken)?;
            if pending == 0 || nheads == MAX_HEADS || nseg == MAX_SEGS {
                self.ring.unpop(nheads as u16);
                return Err(RxDrop::NoBuffer);
            }
            let head = self.ring.pop_head();
            let c = &mut self.counters;
            // The available-ring entry (2 bytes) and the descriptors behind it.
            c.desc_fetches += 1;
            c.dma_read_bytes += 2;
            c.tlps += self.cost.read_tlps(2);
            match walk_chain::<Rw>(&self.ring, &mut self.dma, head, true, MAX_RX, &mut self.segs[nseg..]) {
                Ok(ch) => {
                    let c = &mut self.counters;
                    c.desc_fetches += u64::from(ch.nseg);
                    c.dma_read_bytes += 16 * u64::from(ch.nseg);
                    c.tlps += self.cost.read_tlps(16 * u32::from(ch.nseg));
                    c.iotlb_lookups += u64::from(ch.nseg);
                    heads[nheads] = (head, ch.len, ch.nseg);
                    nheads += 1;
                    nseg += ch.nseg as usize;
                    have += ch.len;
                }
                Err(ChainError::Miss { iova }) => {
                    self.counters.iotlb_lookups += 1;
                    self.ring.unpop(nheads as u16 + 1);
                    return Err(RxDrop::Miss { iova });
                }
                Err(e) => {
                    // Never trusted: the faulting buffer goes back empty, the ones taken before
                    // it go back to the ring for the next frame.
                    self.counters.dma_faults += 1;
                    self.counters.iotlb_lookups += 1;
                    self.ring.unpop(nheads as u16 + 1);
                    // Re-take just the faulting head to return it: the heads before it are
                    // fine and stay available.
                    self.return_faulted(nheads);
                    return Err(RxDrop::Fault(e));
                }
            }
            if !self.mergeable && have < need {
                // One chain per frame: a guest that posts small buffers without mergeable
                // buffers cannot take this frame; its buffer stays posted.
                self.ring.unpop(1);
                return Err(RxDrop::TooSmall);
            }
        }
        Ok((nheads, nseg))
    }

    /// Returns the faulting buffer (the `skip`-th from the next) with length 0. The good ones
    /// before it cannot be skipped in a split ring without using them, so they go back with
    /// length 0 too: the guest reposts them. (Only a guest that posts a bad buffer loses
    /// buffers to it.)
    fn return_faulted(&mut self, skip: usize) {
        for _ in 0..=skip {
            let head = self.ring.pop_head();
            self.ring.push_used(head, 0);
            self.counters.desc_writebacks += 1;
            self.counters.dma_write_bytes += 8;
        }
    }

    /// Makes the used entries visible (one index write); whether the guest asked to be
    /// interrupted for them (the moderator decides when).
    pub fn publish(&mut self) -> bool {
        self.ring.publish_used();
        self.ring.needs_interrupt()
    }
}
