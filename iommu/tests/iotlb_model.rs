//! The IOTLB against a simple model (one entry per 4 KiB page): any sequence of updates
//! (overlapping ones included), invalidations, evictions-free lookups and refused hostile
//! updates gives the same translations, and nothing translates outside the frontend's memory.

use std::collections::BTreeMap;

use iommu::{Access, FaultReason, Iotlb, IotlbEntry, IotlbHint, Perm};
use proptest::prelude::*;

const PAGE: u64 = 0x1000;
/// The frontend's memory: user addresses [MEM_LO, MEM_HI).
const MEM_LO: u64 = 0x10_0000;
const MEM_HI: u64 = 0x90_0000;
/// Host address minus frontend address of the frontend's memory.
const HOST_DELTA: u64 = 0x7f00_0000_0000;

#[derive(Clone, Debug)]
enum Op {
    Update { page: u64, pages: u64, upage: u64, perm: u8 },
    Invalidate { page: u64, pages: u64 },
    Lookup { page: u64, off: u64, len: u64, write: bool, hint: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..64, 1u64..16, 0u64..0xa00, 0u8..4).prop_map(|(page, pages, upage, perm)| Op::Update { page, pages, upage, perm }),
        1 => (0u64..64, 1u64..16).prop_map(|(page, pages)| Op::Invalidate { page, pages }),
        6 => (0u64..80, 0u64..PAGE, 1u64..3 * PAGE, any::<bool>(), 0usize..2)
            .prop_map(|(page, off, len, write, hint)| Op::Lookup { page, off, len, write, hint }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn iotlb_matches_a_page_model(ops in prop::collection::vec(op(), 1..100)) {
        let mut t = Iotlb::new(1 << 20); // no evictions here: the model does not evict
        let mut model: BTreeMap<u64, (u64, Perm)> = BTreeMap::new(); // page → (uaddr, perm)
        let mut hints = [IotlbHint::default(), IotlbHint::default()];
        let inside = |u: u64, s: u64| u >= MEM_LO && u.checked_add(s).is_some_and(|e| e <= MEM_HI);
        // Where the frontend's memory is mapped here.
        let resolve = |u: u64, s: u64| inside(u, s).then_some(u + HOST_DELTA);
        for op in ops {
            match op {
                Op::Update { page, pages, upage, perm } => {
                    let perm = Perm { read: perm & 1 != 0, write: perm & 2 != 0 };
                    let e = IotlbEntry { iova: page * PAGE, size: pages * PAGE, uaddr: upage * PAGE, perm };
                    let ok = t.update(e, resolve).is_ok();
                    let want = (perm.read || perm.write) && inside(e.uaddr, e.size);
                    prop_assert_eq!(ok, want);
                    if ok {
                        for k in 0..pages {
                            model.insert(page + k, (e.uaddr + k * PAGE, perm));
                        }
                    }
                }
                Op::Invalidate { page, pages } => {
                    t.invalidate(page * PAGE, pages * PAGE);
                    for k in 0..pages {
                        model.remove(&(page + k));
                    }
                }
                Op::Lookup { page, off, len, write, hint } => {
                    let access = if write { Access::Write } else { Access::Read };
                    let iova = page * PAGE + off;
                    let got = t.lookup(iova, len, access, &mut hints[hint]);
                    match (got, model.get(&page)) {
                        (Err(FaultReason::NotMapped), None) => {}
                        (Err(FaultReason::Permission), Some((_, p))) => prop_assert!(!p.allows(access)),
                        (Ok((h, n)), Some((mu, p))) => {
                            prop_assert!(p.allows(access));
                            let u = h - HOST_DELTA;
                            prop_assert_eq!(u, mu + off);
                            prop_assert!(n >= 1 && n <= len);
                            // Every byte of the chunk is inside the frontend's memory and where
                            // the model puts it.
                            prop_assert!(u >= MEM_LO && u + n <= MEM_HI);
                            let last = iova + n - 1;
                            let (lu, _) = model.get(&(last / PAGE)).copied().expect("chunk stays mapped");
                            prop_assert_eq!(lu + last % PAGE, u + n - 1);
                        }
                        (got, m) => prop_assert!(false, "{:#x}: got {:?}, model {:?}", iova, got, m),
                    }
                }
            }
        }
    }
}

#[test]
fn many_entries_stay_fast_and_correct() {
    // 4096 disjoint entries, looked up in a scattered order: every one translates right.
    let mut t = Iotlb::default();
    for i in 0..4096u64 {
        t.update(
            IotlbEntry { iova: i * 0x10000, size: PAGE, uaddr: MEM_LO + (i % 512) * PAGE, perm: Perm::RW },
            |u, _| Some(u),
        )
        .unwrap();
    }
    let mut h = IotlbHint::default();
    for k in 0..4096u64 {
        let i = (k * 2654435761) % 4096;
        let (u, n) = t.lookup(i * 0x10000 + 8, 64, Access::Read, &mut h).unwrap();
        assert_eq!((u, n), (MEM_LO + (i % 512) * PAGE + 8, 64));
        assert_eq!(t.lookup(i * 0x10000 + PAGE, 1, Access::Read, &mut h), Err(FaultReason::NotMapped));
    }
}
