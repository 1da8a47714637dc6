//! The chain walker and the split ring over fuzzer-written descriptor tables, in guest memory
//! with an inaccessible page on each side.
//!
//! Invariants: no panic and no access outside guest memory (the guard pages fault); an
//! accepted chain has at most the caller's segments and `max_len` bytes, every grant inside
//! guest memory; the walk writes nothing; rust-vmm's virtio-queue walks an accepted chain to the
//! same buffers, and a chain it walks to the end, plain and within every limit, is accepted.
//! The ring never reports more than its size, and used entries land only in the used ring.

use arbitrary::{Arbitrary, Unstructured};
use iommu::grant::Direction;
use iommu::{Grant, Ro, Rw};
use virtio_queue::{Queue, QueueT};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use virtq::mock::{MockGuest, UVA_BASE};
use virtq::ring::{Desc, DESC_F_INDIRECT};
use virtq::{walk_chain, ChainError, RingAddrs, SplitRing, MAX_SEGS};

const MEM: u64 = 0x10000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const TABLE: u64 = 0x4000;

/// A descriptor, its address mostly inside the small guest.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct D {
    addr: Addr,
    len: Len,
    flags: u8,
    next: u16,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Near(u16),
    Table,
    Far(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Len {
    Small(u16),
    Any(u32),
}

impl D {
    fn desc(&self) -> Desc {
        let addr = match self.addr {
            Addr::Near(a) => a as u64,
            Addr::Table => TABLE,
            Addr::Far(a) => a,
        };
        let len = match self.len {
            Len::Small(l) => l as u32,
            Len::Any(l) => l,
        };
        Desc { addr, len, flags: self.flags as u16 & 0x7 | (self.flags as u16 & 0x80) << 8, next: self.next }
    }
}

/// A ring, its descriptors, an indirect table, and what to walk.
#[derive(Arbitrary, Debug)]
pub struct Input {
    size_log2: u8,
    descs: Vec<D>,
    table: Vec<D>,
    heads: Vec<u16>,
    avail_idx: u16,
    used_idx: u16,
    last_avail: u16,
    write: bool,
    indirect_ok: bool,
    max_len: u32,
    nsegs: u8,
}

fn write_desc(g: &MockGuest, at: u64, d: Desc) {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&d.addr.to_le_bytes());
    b[8..12].copy_from_slice(&d.len.to_le_bytes());
    b[12..14].copy_from_slice(&d.flags.to_le_bytes());
    b[14..16].copy_from_slice(&d.next.to_le_bytes());
    g.write(at, &b);
}

/// The libFuzzer entry point.
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(input);
    }
}

/// Walks every head of `input`; panics on a broken invariant.
pub fn run(input: Input) {
    let size = 1u16 << (input.size_log2 % 9);
    let (g, _) = MockGuest::guarded(MEM);
    let descs: Vec<Desc> = input.descs.iter().take(size as usize).map(D::desc).collect();
    for (i, d) in descs.iter().enumerate() {
        write_desc(&g, DESC + 16 * i as u64, *d);
    }
    for (i, d) in input.table.iter().take(64).enumerate() {
        write_desc(&g, TABLE + 16 * i as u64, d.desc());
    }
    let heads: Vec<u16> = input.heads.iter().take(size as usize).copied().collect();
    for (i, h) in heads.iter().enumerate() {
        g.write_u16(AVAIL + 4 + 2 * ((input.last_avail as usize + i) % size as usize) as u64, *h);
    }
    g.write_u16(AVAIL + 2, input.avail_idx);
    g.write_u16(USED + 2, input.used_idx);
    let addrs = RingAddrs { desc: UVA_BASE + DESC, avail: UVA_BASE + AVAIL, used: UVA_BASE + USED };
    let mut dma = g.dma();
    let mut ring =
        SplitRing::new(&mut dma, addrs, size as u32, input.last_avail, false).expect("ring inside memory");
    let nsegs = (input.nsegs as usize % (MAX_SEGS + 1)).max(1);
    let max_len = input.max_len % (1 << 17);
    let plain = descs.iter().all(|d| d.flags & DESC_F_INDIRECT == 0);

    // The walks, each against the oracle, memory unchanged.
    let before = g.read(0, MEM as usize);
    for &head in &heads {
        let ours = if input.write {
            walk::<Rw>(&g, &ring, &mut dma, head, input.indirect_ok, max_len, nsegs)
        } else {
            walk::<Ro>(&g, &ring, &mut dma, head, input.indirect_ok, max_len, nsegs)
        };
        let theirs = oracle(&g, size, head, input.write);
        match &ours {
            Ok(segs) => {
                assert_eq!(Some(segs), theirs.as_ref(), "head {head}: virtio-queue walks another chain");
            }
            Err(e) => {
                if let (true, Some(chain)) = (plain, &theirs) {
                    let total: u64 = chain.iter().map(|c| c.1 as u64).sum();
                    let fits = chain.len() <= nsegs && total <= max_len as u64;
                    assert!(!fits, "head {head}: refused ({e:?}) a chain virtio-queue walks: {chain:?}");
                }
            }
        }
    }
    assert!(g.read(0, MEM as usize) == before, "walking a chain wrote to guest memory");

    // The ring: never more than its size pending; used entries only in the used ring.
    let pending = match ring.avail_pending() {
        Ok(n) => {
            assert!(n <= size, "{n} pending on a ring of {size}");
            n
        }
        Err(_) => 0,
    };
    for k in 0..pending {
        let h = ring.pop_head();
        ring.push_used(h, k as u32);
        if k % 3 == 2 {
            ring.publish_used_but(1);
            ring.needs_interrupt();
        }
    }
    ring.publish_used();
    ring.needs_interrupt();
    let after = g.read(0, MEM as usize);
    let used_end = (USED + 6 + 8 * size as u64) as usize;
    assert!(after[..USED as usize] == before[..USED as usize], "a ring write before the used ring");
    assert!(after[used_end..] == before[used_end..], "a ring write after the used ring");
    assert_eq!(g.read_u16(USED + 2), input.used_idx.wrapping_add(pending), "used idx moved by the pops");
}

/// Our walk: the segments as (guest address, length).
fn walk<D: Direction>(
    g: &MockGuest,
    ring: &SplitRing,
    dma: &mut iommu::Dma,
    head: u16,
    indirect_ok: bool,
    max_len: u32,
    nsegs: usize,
) -> Result<Vec<(u64, u32)>, ChainError> {
    let mut segs = [Grant::<D>::default(); MAX_SEGS];
    let c = walk_chain(ring, dma, head, indirect_ok, max_len, &mut segs[..nsegs])?;
    let host = g.mem.regions()[0].host() as u64;
    let out: Vec<(u64, u32)> =
        segs[..c.nseg as usize].iter().map(|s| (s.as_ptr() as u64 - host, s.len())).collect();
    assert!(c.nseg as usize <= nsegs && c.len <= max_len, "chain {c:?} over its limits");
    assert_eq!(out.iter().map(|s| s.1 as u64).sum::<u64>(), c.len as u64, "segment lengths");
    for &(gpa, len) in &out {
        assert!(len > 0 && gpa.checked_add(len as u64).is_some_and(|e| e <= MEM), "grant {gpa:#x}+{len}");
    }
    Ok(out)
}

/// virtio-queue's walk: `Some` only for a chain it walks to a last descriptor, every buffer
/// non-empty, inside memory and of the direction the device wants.
fn oracle(g: &MockGuest, size: u16, head: u16, write: bool) -> Option<Vec<(u64, u32)>> {
    // Guest-physical 0 is the memfd's first byte (as the mock maps it).
    let file = FileOffset::new(g.file.try_clone().ok()?, 0);
    let gm =
        GuestMemoryMmap::<()>::from_ranges_with_files([(GuestAddress(0), MEM as usize, Some(file))]).ok()?;
    let mut q = Queue::new(size).ok()?;
    q.set_size(size);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    // One available entry, `head`, in the first slot; the slot and index are put back after.
    let saved = (g.read_u16(AVAIL + 2), g.read_u16(AVAIL + 4));
    g.write_u16(AVAIL + 2, 1);
    g.write_u16(AVAIL + 4, head);
    let chain = q.pop_descriptor_chain(&gm);
    g.write_u16(AVAIL + 2, saved.0);
    g.write_u16(AVAIL + 4, saved.1);
    let mut out = Vec::new();
    let mut last_next = true;
    for d in chain? {
        let inside = d.addr().0.checked_add(d.len() as u64).is_some_and(|e| e <= MEM);
        if d.len() == 0 || !inside || d.is_write_only() != write {
            return None;
        }
        out.push((d.addr().0, d.len()));
        last_next = d.has_next();
    }
    (!last_next && !out.is_empty()).then_some(out)
}
