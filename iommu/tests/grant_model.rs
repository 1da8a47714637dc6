//! Grant copies never touch a byte outside the granted ranges: random grants (some read-only,
//! some to a stranger) and random copies with random offsets and lengths, against a shadow
//! copy of every domain's memory updated only by the copies that the rules allow.

use std::sync::Arc;

use iommu::{AddressSpace, CopySide, GrantError, GrantTables, Region};
use proptest::prelude::*;

const BASE: u64 = 0x10000;
const SIZE: usize = 0x4000;
const SWITCH: u32 = 0;

#[derive(Clone, Debug)]
struct GrantSpec {
    dom: u32,
    off: u64,
    len: u32,
    readonly: bool,
    to_switch: bool,
}

fn grant() -> impl Strategy<Value = GrantSpec> {
    (1u32..4, 0u64..SIZE as u64, 1u32..3000, any::<bool>(), prop::bool::weighted(0.8))
        .prop_map(|(dom, off, len, readonly, to_switch)| GrantSpec { dom, off, len, readonly, to_switch })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

    #[test]
    fn copies_stay_inside_grants(
        grants in prop::collection::vec(grant(), 1..12),
        copies in prop::collection::vec((0usize..12, 0usize..12, 0u32..3000, 0u32..3000, 1u32..3000), 1..60),
    ) {
        let g = GrantTables::new();
        let mut mems = Vec::new();
        let mut shadow: Vec<Vec<u8>> = Vec::new();
        for d in 0..4u32 {
            let r = Region::anonymous(BASE, SIZE as u64, 0x7000_0000 + d as u64 * 0x100000).unwrap();
            let bytes: Vec<u8> = (0..SIZE).map(|i| (i as u32 * 7 + d * 31) as u8).collect();
            // SAFETY: fresh mapping of SIZE bytes.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), r.host(), SIZE) };
            let mem = Arc::new(AddressSpace::new(vec![r]).unwrap());
            g.add_domain(d, mem.clone()).unwrap();
            mems.push(mem);
            shadow.push(bytes);
        }
        // Grants that fit the memory are made; the rest must be refused.
        let mut made = Vec::new(); // (spec, gref)
        for s in &grants {
            let grantee = if s.to_switch { SWITCH } else { 3 - (s.dom % 3) };
            let res = g.domain(s.dom).unwrap().grant_access(grantee, BASE + s.off, s.len, s.readonly);
            let fits = s.off + s.len as u64 <= SIZE as u64;
            prop_assert_eq!(res.is_ok(), fits, "{:?}", res);
            if let Ok(r) = res {
                made.push((s.clone(), r));
            }
        }
        prop_assume!(!made.is_empty());
        for (si, di, so, dof, len) in copies {
            let (ss, sr) = &made[si % made.len()];
            let (ds, dr) = &made[di % made.len()];
            let res = g.copy(
                SWITCH,
                CopySide { dom: ss.dom, gref: *sr, offset: so },
                CopySide { dom: ds.dom, gref: *dr, offset: dof },
                len,
            );
            let allowed = ss.to_switch && ds.to_switch && !ds.readonly
                && so as u64 + len as u64 <= ss.len as u64
                && dof as u64 + len as u64 <= ds.len as u64;
            prop_assert_eq!(res.is_ok(), allowed, "{:?}", res);
            if let Err(e) = res {
                let expected = matches!(
                    e,
                    GrantError::NotGrantee { .. } | GrantError::ReadOnly { .. } | GrantError::OutOfRange { .. }
                );
                prop_assert!(expected, "unexpected refusal {:?}", e);
                continue;
            }
            let from = (ss.off + so as u64) as usize;
            let to = (ds.off + dof as u64) as usize;
            let chunk = shadow[ss.dom as usize][from..from + len as usize].to_vec();
            shadow[ds.dom as usize][to..to + len as usize].copy_from_slice(&chunk);
        }
        for d in 0..4usize {
            // SAFETY: the region is SIZE bytes and stays mapped (held by `mems`).
            let real = unsafe { std::slice::from_raw_parts(mems[d].regions()[0].host(), SIZE) };
            prop_assert!(real == &shadow[d][..], "domain {} memory differs from what the allowed copies explain", d);
        }
        // Nothing is left pinned: every grant can be revoked.
        for (s, r) in &made {
            g.domain(s.dom).unwrap().end_access(*r).unwrap();
        }
    }
}
