//! Any sequence of map / unmap / invalidate gives the same translations as a simple model: a
//! sorted list of disjoint intervals. The table's caches (several, as several threads would
//! hold) are in the loop, so a stale translation shows up as a difference.

use std::collections::BTreeMap;

use iommu::pagetable::{PAGE_1G, PAGE_2M, PAGE_4K};
use iommu::{Access, FaultReason, IoPageTable, MapError, Perm, TlbCache};
use proptest::prelude::*;

/// start → (end, target, perm)
#[derive(Default)]
struct Model(BTreeMap<u64, (u64, u64, Perm)>);

impl Model {
    fn overlaps(&self, s: u64, e: u64) -> bool {
        self.0.range(..e).next_back().is_some_and(|(_, &(end, _, _))| end > s)
    }
    fn map(&mut self, s: u64, t: u64, len: u64, p: Perm) -> bool {
        if self.overlaps(s, s + len) {
            return false;
        }
        self.0.insert(s, (s + len, t, p));
        true
    }
    fn unmap(&mut self, s: u64, e: u64) -> u64 {
        let hit: Vec<u64> = self.0.range(..e).filter(|(_, &(end, _, _))| end > s).map(|(&k, _)| k).collect();
        let mut n = 0;
        for k in hit {
            let (end, t, p) = self.0.remove(&k).unwrap();
            if k < s {
                self.0.insert(k, (s, t, p));
            }
            if end > e {
                self.0.insert(e, (end, t + (e - k), p));
            }
            n += end.min(e) - k.max(s);
        }
        n
    }
    fn lookup(&self, a: u64) -> Option<(u64, Perm)> {
        let (&k, &(end, t, p)) = self.0.range(..=a).next_back()?;
        (a < end).then_some((t + (a - k), p))
    }
}

#[derive(Clone, Debug)]
enum Op {
    Map { iova: u64, target: u64, len: u64, perm: u8 },
    Unmap { iova: u64, len: u64 },
    Translate { iova: u64, len: u64, write: bool, cache: usize },
    Invalidate,
}

/// Addresses in small windows (the first 32 MiB, and the first few GiB on 1 GiB boundaries) so
/// operations collide and translations repeat (a stale cache entry must get the chance to
/// show); alignment from 4 KiB to 1 GiB so every leaf size appears.
fn aligned() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (0u64..16).prop_map(|k| k * PAGE_4K),
        3 => (0u64..16).prop_map(|k| k * PAGE_2M),
        1 => (0u64..4).prop_map(|k| k * PAGE_1G),
    ]
}

fn length() -> impl Strategy<Value = u64> {
    prop_oneof![
        (1u64..64).prop_map(|k| k * PAGE_4K),
        (1u64..4).prop_map(|k| k * PAGE_2M),
        (1u64..3).prop_map(|k| k * PAGE_2M + k * PAGE_4K),
        Just(PAGE_1G),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (aligned(), aligned(), length(), 1u8..4).prop_map(|(iova, target, len, perm)| Op::Map { iova, target, len, perm }),
        2 => (aligned(), length()).prop_map(|(iova, len)| Op::Unmap { iova, len }),
        6 => (aligned(), 0u64..4, 1u64..3 * PAGE_4K, any::<bool>(), 0usize..3)
            .prop_map(|(a, off, len, write, cache)| Op::Translate { iova: a + off * 0x801, len, write, cache }),
        1 => Just(Op::Invalidate),
    ]
}

fn perm(p: u8) -> Perm {
    Perm { read: p & 1 != 0, write: p & 2 != 0 }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn table_matches_the_interval_model(ops in prop::collection::vec(op(), 1..80)) {
        let mut t = IoPageTable::new();
        let mut m = Model::default();
        let mut caches = [TlbCache::default(), TlbCache::default(), TlbCache::default()];
        for op in ops {
            match op {
                Op::Map { iova, target, len, perm: p } => {
                    let ours = t.map(iova, target, len, perm(p));
                    let model = m.map(iova, target, len, perm(p));
                    prop_assert_eq!(ours.is_ok(), model, "map {:#x}+{:#x}: {:?}", iova, len, ours);
                    if !model {
                        prop_assert_eq!(ours, Err(MapError::Overlap { iova, len }));
                    }
                }
                Op::Unmap { iova, len } => {
                    prop_assert_eq!(t.unmap(iova, len), Ok(m.unmap(iova, iova + len)));
                }
                Op::Invalidate => t.invalidate_caches(),
                Op::Translate { iova, len, write, cache } => {
                    let access = if write { Access::Write } else { Access::Read };
                    // Walk the range chunk by chunk; each byte must match the model.
                    let (mut at, end) = (iova, iova + len);
                    while at < end {
                        let ours = t.translate(at, end - at, access, &mut caches[cache]);
                        match (ours, m.lookup(at)) {
                            (Err(FaultReason::NotMapped), None) => break,
                            (Err(FaultReason::Permission), Some((_, p))) => {
                                prop_assert!(!p.allows(access));
                                break;
                            }
                            (Ok((target, n)), Some((mt, p))) => {
                                prop_assert!(p.allows(access));
                                prop_assert_eq!(target, mt, "target of {:#x}", at);
                                prop_assert!(n > 0 && n <= end - at);
                                // The last byte of the chunk maps where the model says too.
                                let last = m.lookup(at + n - 1);
                                prop_assert_eq!(last.map(|l| l.0), Some(mt + n - 1));
                                at += n;
                            }
                            (ours, model) => prop_assert!(false, "{:#x}: ours {:?}, model {:?}", at, ours, model),
                        }
                    }
                }
            }
            prop_assert_eq!(t.mapped_bytes(), m.0.iter().map(|(k, v)| v.0 - k).sum::<u64>());
        }
    }
}
