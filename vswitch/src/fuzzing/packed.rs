//! The packed ring and the chain walker over a fuzzer-written descriptor ring, driven by a
//! fuzzer-chosen sequence of device steps (look, take, walk, give back, use, publish, notify)
//! while the driver rewrites descriptors' flags and its event area under it, in guest memory
//! with an inaccessible page on each side.
//!
//! Invariants: no panic and no access outside guest memory (the guard pages fault); never more
//! chains pending than the ring has descriptors; an accepted chain's grants inside guest
//! memory and within the caller's limits; the device writes nothing but the descriptor ring
//! (used descriptors) and its own event area.

use arbitrary::{Arbitrary, Unstructured};
use iommu::grant::Direction;
use iommu::{Grant, Ro, Rw};

use virtq::mock::{MockGuest, UVA_BASE};
use virtq::packed::WRAP_BIT;
use virtq::{walk_chain, ChainError, PackedRing, RingAddrs, RingError, MAX_SEGS};

const MEM: u64 = 0x10000;
const DESC: u64 = 0x1000;
const DRIVER: u64 = 0x2000;
const DEVICE: u64 = 0x2010;
const TABLE: u64 = 0x4000;

/// A descriptor, its address mostly inside the small guest.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct D {
    addr: Addr,
    len: u16,
    id: u16,
    flags: u16,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Near(u16),
    Table,
    Far(u64),
}

impl D {
    fn bytes(&self) -> [u8; 16] {
        let addr = match self.addr {
            Addr::Near(a) => a as u64,
            Addr::Table => TABLE,
            Addr::Far(a) => a,
        };
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&u32::from(self.len).to_le_bytes());
        b[12..14].copy_from_slice(&self.id.to_le_bytes());
        b[14..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// One step of the device or the driver.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    Pending,
    Fresh,
    /// Take a head and walk it (for reading or writing).
    Pop {
        write: bool,
        indirect_ok: bool,
        nsegs: u8,
    },
    /// Give back up to this many heads taken since the last use.
    Unpop(u8),
    /// Use an outstanding head (by index) with a length.
    Push(u8, u32),
    Publish(u8),
    Interrupt,
    Kicks(bool),
    /// The driver rewrites a descriptor's flags.
    Flags(u8, u16),
    /// The driver rewrites its event area.
    Event(u16, u16),
}

/// A ring, its descriptors, an indirect table and the steps.
#[derive(Arbitrary, Debug)]
pub struct Input {
    size: u8,
    start: u16,
    event_idx: bool,
    descs: Vec<D>,
    table: Vec<D>,
    ops: Vec<Op>,
}

/// The libFuzzer entry point.
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(input);
    }
}

/// Runs the steps of `input`; panics on a broken invariant.
pub fn run(input: Input) {
    let size = 1 + u16::from(input.size % 64);
    let (g, _) = MockGuest::guarded(MEM);
    for (i, d) in input.descs.iter().take(size as usize).enumerate() {
        g.write(DESC + 16 * i as u64, &d.bytes());
    }
    for (i, d) in input.table.iter().take(64).enumerate() {
        g.write(TABLE + 16 * i as u64, &d.bytes());
    }
    let addrs = RingAddrs { desc: UVA_BASE + DESC, avail: UVA_BASE + DRIVER, used: UVA_BASE + DEVICE };
    let mut dma = g.dma();
    let start = ((input.start & !WRAP_BIT) % size) | (input.start & WRAP_BIT);
    let mut ring = match PackedRing::new(&mut dma, addrs, size as u32, start, input.event_idx) {
        Ok(r) => r,
        Err(e) => panic!("a ring inside memory at a position inside it was refused: {e}"),
    };
    assert_eq!(
        PackedRing::new(&mut dma, addrs, size as u32, size | WRAP_BIT, false).err(),
        Some(RingError::BadBase(size | WRAP_BIT))
    );
    // What only the driver and the device's own areas may change.
    let outside = |m: &[u8]| -> Vec<u8> {
        let mut v = m.to_vec();
        v[DESC as usize..(DESC + 16 * size as u64) as usize].fill(0);
        v[DRIVER as usize..DRIVER as usize + 4].fill(0);
        v[DEVICE as usize..DEVICE as usize + 4].fill(0);
        v
    };
    let before = outside(&g.read(0, MEM as usize));
    let (mut outstanding, mut recent) = (Vec::<u16>::new(), 0usize);
    let mut pending = 0u16;
    for op in input.ops.iter().take(256) {
        match *op {
            Op::Pending | Op::Fresh => {
                let r =
                    if matches!(op, Op::Pending) { ring.avail_pending() } else { ring.avail_pending_fresh() };
                match r {
                    Ok(n) => {
                        assert!(n <= size, "{n} chains pending on a ring of {size}");
                        assert!(outstanding.len() + n as usize <= size as usize, "more held than the ring");
                        pending = n;
                    }
                    // The switch stops such a queue.
                    Err(RingError::AvailOverrun(_)) => break,
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            Op::Pop { write, indirect_ok, nsegs } => {
                if pending == 0 {
                    continue;
                }
                let h = ring.pop_head();
                pending -= 1;
                outstanding.push(h);
                recent += 1;
                let nsegs = (nsegs as usize % (MAX_SEGS + 1)).max(1);
                let _ = if write {
                    walk::<Rw>(&g, &ring, &mut dma, h, indirect_ok, nsegs)
                } else {
                    walk::<Ro>(&g, &ring, &mut dma, h, indirect_ok, nsegs)
                };
            }
            Op::Unpop(n) => {
                let n = (n as usize).min(recent);
                ring.unpop(n as u16);
                outstanding.truncate(outstanding.len() - n);
                recent -= n;
                pending += n as u16;
            }
            Op::Push(i, len) => {
                if outstanding.is_empty() {
                    continue;
                }
                let h = outstanding.remove(i as usize % outstanding.len());
                ring.push_used(h, len);
                recent = 0;
            }
            Op::Publish(held) => ring.publish_used_but(u16::from(held) % 4),
            Op::Interrupt => {
                ring.needs_interrupt();
            }
            Op::Kicks(on) => {
                ring.set_kicks(on);
            }
            Op::Flags(slot, flags) => g.write_u16(DESC + 16 * (slot as u64 % size as u64) + 14, flags),
            Op::Event(off_wrap, flags) => {
                g.write_u16(DRIVER, off_wrap);
                g.write_u16(DRIVER + 2, flags);
            }
        }
    }
    ring.publish_used();
    ring.needs_interrupt();
    assert!(outside(&g.read(0, MEM as usize)) == before, "a ring write outside the descriptor ring");
}

/// Our walk, its grants checked against guest memory and the limits.
fn walk<D: Direction>(
    g: &MockGuest,
    ring: &PackedRing,
    dma: &mut iommu::Dma,
    head: u16,
    indirect_ok: bool,
    nsegs: usize,
) -> Result<(), ChainError> {
    let mut segs = [Grant::<D>::default(); MAX_SEGS];
    let max_len = 1 << 16;
    let c = walk_chain(ring, dma, head, indirect_ok, max_len, &mut segs[..nsegs])?;
    assert!(c.nseg as usize <= nsegs && c.len <= max_len, "chain {c:?} over its limits");
    let host = g.mem.regions()[0].host() as u64;
    for s in &segs[..c.nseg as usize] {
        let gpa = s.as_ptr() as u64 - host;
        assert!(!s.is_empty() && gpa + s.len() as u64 <= MEM, "grant {gpa:#x}+{}", s.len());
    }
    Ok(())
}
