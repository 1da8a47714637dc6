//! Walking a descriptor chain into translated, bounds-checked segments.
//!
//! What a bad chain gets: the walk stops at the first problem and says which; the caller
//! returns the head to the used ring with length 0 and counts a malformed drop. Nothing is read
//! from or written to a buffer before its whole chain has passed every check.

use iommu::grant::Direction;
use iommu::{Access, Dma, DmaError, FaultReason, Grant};

use crate::ring::{Desc, SplitRing, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_RING_SIZE};

/// A ring whose chains [`walk_chain`] walks: a split ring's table, a packed ring's
/// descriptors, or either ([`crate::Ring`]).
pub trait Descs {
    /// Descriptors in the table (or ring).
    fn size(&self) -> u16;
    /// The slot of head `head`'s first descriptor; `None` for a head outside the table.
    fn head_slot(&self, head: u16) -> Option<u16>;
    /// The descriptor at `slot` (< size) in split form (a packed one's `next` is the slot
    /// after it).
    fn desc(&self, slot: u16) -> Desc;
    /// Whether indirect tables hold packed descriptors (in order, no `next`).
    fn packed(&self) -> bool;
}

impl Descs for SplitRing {
    #[inline(always)]
    fn size(&self) -> u16 {
        SplitRing::size(self)
    }
    #[inline(always)]
    fn head_slot(&self, head: u16) -> Option<u16> {
        (head < SplitRing::size(self)).then_some(head)
    }
    #[inline(always)]
    fn desc(&self, slot: u16) -> Desc {
        SplitRing::desc(self, slot)
    }
    #[inline(always)]
    fn packed(&self) -> bool {
        false
    }
}

/// Most buffers one packet may span. Linux and DPDK use one or two for frames without
/// offloads; a Linux TSO frame takes up to MAX_SKB_FRAGS + 2 (19), and so does a receive
/// buffer of a guest with TSO and no mergeable buffers. A chain that needs more is refused
/// rather than walked without bound.
pub const MAX_SEGS: usize = 32;

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// head index outside the descriptor table
    #[error("head index outside the descriptor table")]
    BadHead,
    /// `next` outside the descriptor table
    #[error("next index outside the descriptor table")]
    BadNext,
    /// more descriptors than the table holds: a loop
    #[error("chain longer than its table (a loop)")]
    Loop,
    /// a buffer outside the guest's memory
    #[error("buffer outside the guest's memory")]
    BadAddress,
    /// a device-writable buffer in a chain the device should read, or the reverse
    #[error("buffer with the wrong direction")]
    WrongDirection,
    /// a zero-length buffer
    #[error("zero-length buffer")]
    ZeroLength,
    /// more buffers than a packet may span
    #[error("more than {MAX_SEGS} buffers")]
    TooManySegments,
    /// an indirect table that is not allowed, misshapen, or nested
    #[error("bad indirect descriptor table")]
    BadIndirect,
    /// more bytes than the largest packet
    #[error("chain larger than the largest packet")]
    TooBig,
    /// an IOVA the IOTLB cannot translate yet: ask the frontend and try the chain again later
    #[error("IOTLB miss at IOVA {iova:#x}")]
    Miss {
        /// The address to ask for.
        iova: u64,
    },
}

/// A buffer that translation refused.
#[inline(always)]
fn refused(e: DmaError) -> ChainError {
    match e {
        DmaError::Miss { iova, .. } => ChainError::Miss { iova },
        DmaError::Fault(_) => ChainError::BadAddress,
    }
}

/// Translated segments of one chain.
#[derive(Clone, Copy, Debug)]
pub struct Chain {
    /// Number of valid entries in the caller's segment array.
    pub nseg: u8,
    /// Total bytes.
    pub len: u32,
}

/// Walks the chain at `head` into grants of direction `D`, which every buffer must have
/// ([`Rw`](iommu::Rw) for buffers the device fills). `max_len` bounds the total; `segs` bounds
/// the buffer count (never more than [`MAX_SEGS`]).
#[inline(always)]
pub fn walk_chain<D: Direction>(
    ring: &impl Descs,
    dma: &mut Dma,
    head: u16,
    indirect_ok: bool,
    max_len: u32,
    segs: &mut [Grant<D>],
) -> Result<Chain, ChainError> {
    let Some(slot) = ring.head_slot(head) else { return Err(ChainError::BadHead) };
    let d = ring.desc(slot);
    let write = D::ACCESS == Access::Write;
    let plain = if write { DESC_F_WRITE } else { 0 };
    if d.flags == plain {
        // The common case: one buffer holding header and frame.
        if d.len == 0 {
            return Err(ChainError::ZeroLength);
        }
        if d.len > max_len {
            return Err(ChainError::TooBig);
        }
        match dma.grant::<D>(d.addr, d.len) {
            Ok(g) => {
                let Some(s0) = segs.first_mut() else { return Err(ChainError::TooManySegments) };
                *s0 = g;
                return Ok(Chain { nseg: 1, len: d.len });
            }
            // Mapped in pieces by the vIOMMU: the slow walk splits it.
            Err(DmaError::Fault(FaultReason::CrossesBoundary)) if dma.is_iova() => {}
            Err(e) => return Err(refused(e)),
        }
    }
    walk_slow(ring, dma, d, indirect_ok, max_len, segs)
}

struct Acc<'a, D> {
    segs: &'a mut [Grant<D>],
    n: usize,
    total: u32,
    max_len: u32,
}

impl<D: Direction> Acc<'_, D> {
    fn add(&mut self, dma: &mut Dma, d: &Desc) -> Result<(), ChainError> {
        if (d.flags & DESC_F_WRITE != 0) != (D::ACCESS == Access::Write) {
            return Err(ChainError::WrongDirection);
        }
        if d.len == 0 {
            return Err(ChainError::ZeroLength);
        }
        let total = self.total.checked_add(d.len).filter(|t| *t <= self.max_len);
        self.total = total.ok_or(ChainError::TooBig)?;
        let room = self.segs.len().min(MAX_SEGS);
        if self.n == room {
            return Err(ChainError::TooManySegments);
        }
        let (segs, n) = (&mut *self.segs, &mut self.n);
        let mut full = false;
        dma.grant_pieces::<D>(d.addr, d.len, |g| {
            if *n == room {
                full = true;
                return false;
            }
            segs[*n] = g;
            *n += 1;
            true
        })
        .map_err(|e| if full { ChainError::TooManySegments } else { refused(e) })
    }

    fn done(self) -> Chain {
        Chain { nseg: self.n as u8, len: self.total }
    }
}

#[cold]
#[inline(never)]
fn walk_slow<R: Descs, D: Direction>(
    ring: &R,
    dma: &mut Dma,
    first: Desc,
    indirect_ok: bool,
    max_len: u32,
    segs: &mut [Grant<D>],
) -> Result<Chain, ChainError> {
    let mut acc = Acc { segs, n: 0, total: 0, max_len };
    let mut d = first;
    let mut ttl = ring.size();
    loop {
        if d.flags & DESC_F_INDIRECT != 0 {
            // An indirect descriptor must end the chain (virtio 2.7.5.3.1).
            if !indirect_ok || d.flags & DESC_F_NEXT != 0 {
                return Err(ChainError::BadIndirect);
            }
            walk_indirect(dma, &d, &mut acc, ring.packed())?;
            return Ok(acc.done());
        }
        acc.add(dma, &d)?;
        if d.flags & DESC_F_NEXT == 0 {
            return Ok(acc.done());
        }
        ttl -= 1;
        if ttl == 0 {
            return Err(ChainError::Loop);
        }
        if d.next >= ring.size() {
            return Err(ChainError::BadNext);
        }
        d = ring.desc(d.next);
    }
}

fn walk_indirect<D: Direction>(
    dma: &mut Dma,
    ind: &Desc,
    acc: &mut Acc<'_, D>,
    packed: bool,
) -> Result<(), ChainError> {
    let count = ind.len / 16;
    if !ind.len.is_multiple_of(16) || count == 0 || count > MAX_RING_SIZE as u32 {
        return Err(ChainError::BadIndirect);
    }
    let table = match dma.translate(ind.addr, ind.len, Access::Read) {
        Ok(p) => p,
        Err(DmaError::Miss { iova, .. }) => return Err(ChainError::Miss { iova }),
        Err(DmaError::Fault(r)) => {
            if r == FaultReason::CrossesBoundary && dma.is_iova() {
                // A table must be one contiguous range; not recorded by translate.
                dma.fault(ind.addr, ind.len as u64, Access::Read, r);
            }
            return Err(ChainError::BadIndirect);
        }
    };
    let read = |i: u32| -> Desc {
        // SAFETY: i < count and the table's count*16 bytes were translated as one range.
        // Unaligned volatile read: nothing obliges the guest to align an indirect table.
        let raw: [u8; 16] =
            unsafe { (table.as_ptr().add(i as usize * 16) as *const [u8; 16]).read_volatile() };
        let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        if packed {
            // Packed: every entry in order, WRITE the only flag that counts (virtio 1.2,
            // 2.8.19); `id` is ignored.
            let more = if i + 1 < count { DESC_F_NEXT } else { 0 };
            let flags = (u16::from_le_bytes([raw[14], raw[15]]) & DESC_F_WRITE) | more;
            return Desc { addr, len, flags, next: (i + 1) as u16 };
        }
        Desc {
            addr,
            len,
            flags: u16::from_le_bytes([raw[12], raw[13]]),
            next: u16::from_le_bytes([raw[14], raw[15]]),
        }
    };
    let mut i = 0u32;
    let mut ttl = count;
    loop {
        let d = read(i);
        if d.flags & DESC_F_INDIRECT != 0 {
            return Err(ChainError::BadIndirect);
        }
        acc.add(dma, &d)?;
        if d.flags & DESC_F_NEXT == 0 {
            return Ok(());
        }
        ttl -= 1;
        if ttl == 0 {
            return Err(ChainError::Loop);
        }
        if d.next as u32 >= count {
            return Err(ChainError::BadNext);
        }
        i = d.next as u32;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::undocumented_unsafe_blocks)]
    use super::*;
    use crate::mock::{MockDevice, MockGuest, MockRing};
    use crate::ring::{Desc, SplitRing};

    fn walk(
        q: &mut MockDevice,
        head: u16,
        write: bool,
        indirect: bool,
    ) -> Result<Vec<(u64, u32)>, ChainError> {
        fn go<D: Direction>(
            q: &mut MockDevice,
            head: u16,
            indirect: bool,
        ) -> Result<Vec<(u64, u32)>, ChainError> {
            let mut segs = [Grant::<D>::default(); MAX_SEGS];
            let base = q.dma.mem().regions()[0].host() as u64;
            let c = walk_chain(&q.ring, &mut q.dma, head, indirect, 1 << 20, &mut segs)?;
            Ok(segs[..c.nseg as usize].iter().map(|s| (s.as_ptr() as u64 - base, s.len())).collect())
        }
        if write {
            go::<iommu::Rw>(q, head, indirect)
        } else {
            go::<iommu::Ro>(q, head, indirect)
        }
    }

    fn setup() -> (MockGuest, MockRing, MockDevice) {
        let mut g = MockGuest::new(1 << 20);
        let r = g.ring(16);
        let q = r.device(&g);
        (g, r, q)
    }

    #[test]
    fn test_single_and_chained_descriptors() {
        let (g, mut r, mut q) = setup();
        let h = r.add_chain(&g, &[(0x8000, 100, 0)]);
        assert_eq!(walk(&mut q, h, false, false), Ok(vec![(0x8000, 100)]));
        let h = r.add_chain(&g, &[(0x9000, 12, 0), (0xa000, 60, 0)]);
        assert_eq!(walk(&mut q, h, false, false), Ok(vec![(0x9000, 12), (0xa000, 60)]));
    }

    #[test]
    fn test_malformed_chains_are_refused() {
        let (g, mut r, mut q) = setup();
        let h = r.add_chain(&g, &[(0x8000, 100, DESC_F_WRITE)]);
        assert_eq!(
            walk(&mut q, h, false, false),
            Err(ChainError::WrongDirection),
            "device-writable buffer on TX"
        );
        let h = r.add_chain(&g, &[(0x8000, 0, 0)]);
        assert_eq!(walk(&mut q, h, false, false), Err(ChainError::ZeroLength));
        let h = r.add_chain(&g, &[((1 << 20) - 10, 100, 0)]);
        assert_eq!(walk(&mut q, h, false, false), Err(ChainError::BadAddress), "runs off the end of memory");
        let h = r.add_chain(&g, &[(u64::MAX - 5, 100, 0)]);
        assert_eq!(walk(&mut q, h, false, false), Err(ChainError::BadAddress), "wrapping address");
        assert_eq!(walk(&mut q, 16, false, false), Err(ChainError::BadHead));
        // A loop: descriptor 0 → 1 → 0.
        r.write_desc(&g, 0, Desc { addr: 0x8000, len: 10, flags: DESC_F_NEXT, next: 1 });
        r.write_desc(&g, 1, Desc { addr: 0x8000, len: 10, flags: DESC_F_NEXT, next: 0 });
        assert!(matches!(walk(&mut q, 0, false, false), Err(ChainError::Loop | ChainError::TooManySegments)));
        r.write_desc(&g, 2, Desc { addr: 0x8000, len: 10, flags: DESC_F_NEXT, next: 99 });
        assert_eq!(walk(&mut q, 2, false, false), Err(ChainError::BadNext));
    }

    #[test]
    fn test_chain_longer_than_max_segments_is_refused() {
        let mut g = MockGuest::new(1 << 20);
        let mut r = g.ring(64);
        let mut q = r.device(&g);
        let bufs: Vec<_> = (0..MAX_SEGS as u64 + 1).map(|i| (0x8000 + i * 64, 64, 0)).collect();
        let h = r.add_chain(&g, &bufs);
        assert_eq!(walk(&mut q, h, false, false), Err(ChainError::TooManySegments));
    }

    #[test]
    fn test_chain_loop_longer_than_ring_stops() {
        let mut g = MockGuest::new(1 << 20);
        let r = g.ring(4);
        let mut q = r.device(&g);
        for i in 0..4 {
            r.write_desc(&g, i, Desc { addr: 0x8000, len: 1, flags: DESC_F_NEXT, next: (i + 1) % 4 });
        }
        let mut segs = [Grant::<iommu::Ro>::default(); 64];
        let e = walk_chain(&q.ring, &mut q.dma, 0, false, 1 << 20, &mut segs);
        assert_eq!(e.unwrap_err(), ChainError::Loop);
    }

    #[test]
    fn test_indirect_tables() {
        let (mut g, mut r, mut q) = setup();
        let table = g.alloc(64, 16);
        let descs = [
            Desc { addr: 0x9000, len: 12, flags: DESC_F_NEXT, next: 1 },
            Desc { addr: 0xa000, len: 60, flags: 0, next: 0 },
        ];
        write_table(&g, table, &descs);
        let h = r.add_chain(&g, &[(table, 32, DESC_F_INDIRECT)]);
        assert_eq!(walk(&mut q, h, false, true), Ok(vec![(0x9000, 12), (0xa000, 60)]));
        assert_eq!(walk(&mut q, h, false, false), Err(ChainError::BadIndirect), "not negotiated");
        let h = r.add_chain(&g, &[(table, 24, DESC_F_INDIRECT)]);
        assert_eq!(walk(&mut q, h, false, true), Err(ChainError::BadIndirect), "length not a multiple of 16");
        let nested = g.alloc(16, 16);
        write_table(&g, nested, &[Desc { addr: table, len: 32, flags: DESC_F_INDIRECT, next: 0 }]);
        let h = r.add_chain(&g, &[(nested, 16, DESC_F_INDIRECT)]);
        assert_eq!(walk(&mut q, h, false, true), Err(ChainError::BadIndirect), "nested table");
        let looping = g.alloc(32, 16);
        write_table(
            &g,
            looping,
            &[
                Desc { addr: 0x9000, len: 1, flags: DESC_F_NEXT, next: 1 },
                Desc { addr: 0x9000, len: 1, flags: DESC_F_NEXT, next: 0 },
            ],
        );
        let h = r.add_chain(&g, &[(looping, 32, DESC_F_INDIRECT)]);
        assert_eq!(walk(&mut q, h, false, true), Err(ChainError::Loop));
    }

    fn write_table(g: &MockGuest, gpa: u64, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&d.addr.to_le_bytes());
            b[8..12].copy_from_slice(&d.len.to_le_bytes());
            b[12..14].copy_from_slice(&d.flags.to_le_bytes());
            b[14..16].copy_from_slice(&d.next.to_le_bytes());
            g.write(gpa + 16 * i as u64, &b);
        }
    }

    /// Same rings, same chains: our walker against rust-vmm's virtio-queue on random direct,
    /// chained and indirect chains.
    #[test]
    fn test_walker_matches_virtio_queue_oracle() {
        use virtio_queue::{Queue, QueueT};
        use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

        let mut g = MockGuest::new(4 << 20);
        let mut r = g.ring(256);
        let mut q = r.device(&g);
        let gm = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            4 << 20,
            Some(FileOffset::new(g.file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        let mut oracle = Queue::new(256).unwrap();
        oracle.set_size(256);
        oracle.set_desc_table_address(Some(r.desc as u32), Some((r.desc >> 32) as u32));
        oracle.set_avail_ring_address(Some(r.avail as u32), Some((r.avail >> 32) as u32));
        oracle.set_used_ring_address(Some(r.used as u32), Some((r.used >> 32) as u32));
        oracle.set_ready(true);

        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..2000 {
            let k = 1 + rnd(4) as usize;
            let write = rnd(2) == 0;
            let flag = if write { DESC_F_WRITE } else { 0 };
            let bufs: Vec<(u64, u32, u16)> =
                (0..k).map(|_| (0x10_0000 + rnd(0x2f_0000), 1 + rnd(2000) as u32, flag)).collect();
            let head = if rnd(4) == 0 {
                let table = g.alloc(16 * k as u64, 16);
                let descs: Vec<Desc> = bufs
                    .iter()
                    .enumerate()
                    .map(|(i, b)| Desc {
                        addr: b.0,
                        len: b.1,
                        flags: b.2 | if i + 1 < k { DESC_F_NEXT } else { 0 },
                        next: i as u16 + 1,
                    })
                    .collect();
                write_table(&g, table, &descs);
                r.add_chain(&g, &[(table, 16 * k as u32, DESC_F_INDIRECT)])
            } else {
                r.add_chain(&g, &bufs)
            };
            // Device side, both implementations, same ring.
            let chain = oracle.pop_descriptor_chain(&gm).expect("oracle sees the chain");
            assert_eq!(chain.head_index(), head);
            let expect: Vec<(u64, u32)> = chain.map(|d| (d.addr().0, d.len())).collect();
            assert!(q.ring.avail_pending().unwrap() >= 1);
            let h = q.ring.pop_head();
            assert_eq!(h, head, "round {round}");
            assert_eq!(walk(&mut q, h, write, true), Ok(expect), "round {round}");
            q.ring.push_used(h, 0);
            q.ring.publish_used();
            oracle.add_used(&gm, head, 0).unwrap();
        }
        assert_eq!(g.read_u16(r.used + 2), 2000, "every chain returned once");
    }

    #[test]
    fn test_ring_size_must_be_power_of_two() {
        let mut g = MockGuest::new(1 << 20);
        let r = g.ring(16);
        for bad in [0u32, 3, 100, 65536] {
            assert!(SplitRing::new(&mut g.dma(), r.addrs(), bad, 0, false).is_err(), "size {bad}");
        }
    }
}
