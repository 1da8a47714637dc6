//! The IOTLB (iommu crate) against a naive model: a sorted list of disjoint ranges, split on
//! overlap, the lowest evicted when full. Any sequence of updates, invalidations, lookups (with
//! hints reused across generations) and contiguous lookups agrees with the model, and no
//! translation leaves the frontend's memory.

use arbitrary::{Arbitrary, Unstructured};
use iommu::{Access, FaultReason, Iotlb, IotlbEntry, IotlbHint, Perm};

/// The frontend's memory: user addresses [MEM_LO, MEM_HI), mapped at `u + DELTA` here.
const MEM_LO: u64 = 0x10_0000;
const MEM_HI: u64 = 0x90_0000;
const DELTA: u64 = 0x7f00_0000_0000;

/// An address or size: mostly small, so ranges meet.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum V {
    Small(u16),
    Mem(u16),
    Any(u64),
}

impl V {
    fn get(self) -> u64 {
        match self {
            V::Small(v) => v as u64 * 0x100,
            V::Mem(v) => MEM_LO + v as u64 * 0x100,
            V::Any(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Update { iova: V, size: V, uaddr: V, perm: u8 },
    Invalidate { iova: V, size: V },
    Lookup { iova: V, len: V, write: bool, hint: u8 },
    Contiguous { iova: V, len: V, write: bool, hint: u8 },
    Clear,
}

/// A capacity and the operations.
#[derive(Arbitrary, Debug)]
pub struct Input {
    max: u8,
    ops: Vec<Op>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct M {
    iova: u64,
    size: u64,
    uaddr: u64,
    perm: Perm,
}

impl M {
    fn end(&self) -> u64 {
        self.iova + self.size
    }
}

/// Removes `[s, e)` from the model, keeping the parts of ranges outside it.
fn remove(model: &mut Vec<M>, s: u64, e: u64) {
    let mut out = Vec::new();
    for m in model.drain(..) {
        if m.end() <= s || m.iova >= e {
            out.push(m);
            continue;
        }
        if m.iova < s {
            out.push(M { size: s - m.iova, ..m });
        }
        if m.end() > e {
            out.push(M { iova: e, size: m.end() - e, uaddr: m.uaddr + (e - m.iova), perm: m.perm });
        }
    }
    out.sort_by_key(|m| m.iova);
    *model = out;
}

fn find(model: &[M], iova: u64) -> Option<M> {
    model.iter().copied().find(|m| iova >= m.iova && iova < m.end())
}

fn model_lookup(model: &[M], iova: u64, len: u64, access: Access) -> Result<(u64, u64), FaultReason> {
    let m = find(model, iova).ok_or(FaultReason::NotMapped)?;
    if !m.perm.allows(access) {
        return Err(FaultReason::Permission);
    }
    let off = iova - m.iova;
    Ok((m.uaddr + off + DELTA, len.min(m.size - off)))
}

/// The libFuzzer entry point.
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(input);
    }
}

/// Runs the operations on both; panics where they differ.
pub fn run(input: Input) {
    let max = 1 + input.max as usize % 16;
    let mut t = Iotlb::new(max);
    let mut model: Vec<M> = Vec::new();
    let mut hints = [IotlbHint::default(); 3];
    let inside = |u: u64, s: u64| u >= MEM_LO && u.checked_add(s).is_some_and(|e| e <= MEM_HI);
    for op in input.ops.iter().take(512) {
        match *op {
            Op::Update { iova, size, uaddr, perm } => {
                let perm = Perm { read: perm & 1 != 0, write: perm & 2 != 0 };
                let e = IotlbEntry { iova: iova.get(), size: size.get(), uaddr: uaddr.get(), perm };
                let ok = t.update(e, |u, s| inside(u, s).then(|| u + DELTA)).is_ok();
                let want = e.size != 0
                    && e.iova.checked_add(e.size).is_some()
                    && (perm.read || perm.write)
                    && inside(e.uaddr, e.size);
                assert_eq!(ok, want, "update {e:?}");
                if ok {
                    remove(&mut model, e.iova, e.iova + e.size);
                    while model.len() >= max {
                        model.remove(0);
                    }
                    model.push(M { iova: e.iova, size: e.size, uaddr: e.uaddr, perm });
                    model.sort_by_key(|m| m.iova);
                }
            }
            Op::Invalidate { iova, size } => {
                let (s, n) = (iova.get(), size.get());
                t.invalidate(s, n);
                remove(&mut model, s, s.saturating_add(n));
                while model.len() > max {
                    model.remove(0);
                }
            }
            Op::Lookup { iova, len, write, hint } => {
                let access = if write { Access::Write } else { Access::Read };
                let (iova, len) = (iova.get(), len.get().max(1));
                let got = t.lookup(iova, len, access, &mut hints[hint as usize % 3]);
                assert_eq!(got, model_lookup(&model, iova, len, access), "lookup {iova:#x}+{len:#x}");
                if let Ok((h, n)) = got {
                    assert!(n >= 1 && n <= len && inside(h - DELTA, n), "{h:#x}+{n:#x} outside memory");
                }
            }
            Op::Contiguous { iova, len, write, hint } => {
                let access = if write { Access::Write } else { Access::Read };
                let (iova, len) = (iova.get(), len.get().max(1) % (1 << 24));
                let got = t.lookup_contiguous(iova, len.max(1), access, &mut hints[hint as usize % 3]);
                if let Ok(h) = got {
                    // Every byte translates through the model to where the range says.
                    let mut done = 0;
                    while done < len.max(1) {
                        let at = iova + done;
                        let (mh, n) =
                            model_lookup(&model, at, len.max(1) - done, access).expect("model maps it");
                        assert_eq!(mh, h + done, "contiguous {iova:#x}+{len:#x} at {at:#x}");
                        done += n;
                    }
                    assert!(inside(h - DELTA, len.max(1)), "contiguous range outside memory");
                }
            }
            Op::Clear => {
                t.clear();
                model.clear();
            }
        }
        let held: Vec<M> =
            t.entries().map(|e| M { iova: e.iova, size: e.size, uaddr: e.uaddr, perm: e.perm }).collect();
        assert_eq!(held, model, "entries after {op:?}");
        assert!(t.len() <= max, "{} entries, max {max}", t.len());
    }
}
