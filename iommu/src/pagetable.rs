//! IO page tables: per-domain, multi-level, like the second-level tables of Intel VT-d.
//!
//! A 4-level radix tree over a 48-bit IOVA space, 512 entries per level, with leaves of
//! 4 KiB (level 1), 2 MiB (level 2) or 1 GiB (level 3) carrying an output address and read /
//! write permission. [`IoPageTable::map`] picks the largest leaf that alignment and length
//! allow; [`IoPageTable::unmap`] splits a large leaf it only partly covers.
//!
//! Translation goes through a small direct-mapped cache ([`TlbCache`]) that each user owns (one
//! per polling thread or queue, no sharing). A cache stays correct by generation: every unmap
//! bumps the table's generation, and a cache filled under an older one is emptied before use,
//! so no translation outlives its mapping.

use crate::fault::{Access, FaultReason, Perm};

/// Smallest page.
pub const PAGE_4K: u64 = 1 << 12;
/// Middle page.
pub const PAGE_2M: u64 = 1 << 21;
/// Largest page.
pub const PAGE_1G: u64 = 1 << 30;
/// IOVAs are below 2^48.
pub const IOVA_BITS: u32 = 48;
/// Entries in a translation cache.
pub const TLB_ENTRIES: usize = 64;

const FANOUT: usize = 512;

/// Why a map or unmap was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// not 4 KiB aligned
    #[error("IOVA {iova:#x}, target {target:#x} and length {len:#x} must all be 4 KiB aligned")]
    Unaligned {
        /// IOVA.
        iova: u64,
        /// Output address.
        target: u64,
        /// Length.
        len: u64,
    },
    /// empty or too large
    #[error("range at {iova:#x} of {len:#x} bytes is empty or runs past the 48-bit IOVA space")]
    BadRange {
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// overlap
    #[error("IOVA range at {iova:#x} of {len:#x} bytes overlaps an existing mapping (unmap it first)")]
    Overlap {
        /// IOVA.
        iova: u64,
        /// Length.
        len: u64,
    },
    /// no permission
    #[error("a mapping needs read or write permission")]
    NoPermission,
}

#[derive(Debug)]
enum Entry {
    Empty,
    Table(Box<Node>),
    Leaf { target: u64, perm: Perm },
}

#[derive(Debug)]
struct Node {
    e: Vec<Entry>,
}

impl Node {
    fn new() -> Box<Node> {
        Box::new(Node { e: (0..FANOUT).map(|_| Entry::Empty).collect() })
    }

    fn is_empty(&self) -> bool {
        self.e.iter().all(|e| matches!(e, Entry::Empty))
    }
}

/// Bytes one entry of a level-`level` node covers (level 1 = 4 KiB).
#[inline(always)]
fn span(level: u32) -> u64 {
    1u64 << (12 + 9 * (level - 1))
}

#[inline(always)]
fn index(iova: u64, level: u32) -> usize {
    ((iova >> (12 + 9 * (level - 1))) & (FANOUT as u64 - 1)) as usize
}

/// The cache slot of `iova`'s 4 KiB page among `slots` (a power of two): a multiplicative
/// hash, so pages a large stride apart (a ring's buffers 1 MiB apart) do not all collide.
#[inline(always)]
pub(crate) fn slot_of(iova: u64, slots: usize) -> usize {
    debug_assert!(slots.is_power_of_two());
    ((iova >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - slots.trailing_zeros())) as usize
}

/// A leaf found by a walk: where it starts, how much it covers, where it points.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Leaf {
    base: u64,
    size: u64,
    target: u64,
    perm: Perm,
}

/// A translation cache owned by one user of a table.
#[derive(Clone, Debug)]
pub struct TlbCache {
    gen: u64,
    slots: [Option<Leaf>; TLB_ENTRIES],
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that walked the table.
    pub misses: u64,
}

impl Default for TlbCache {
    fn default() -> Self {
        TlbCache { gen: 0, slots: [None; TLB_ENTRIES], hits: 0, misses: 0 }
    }
}

/// A domain's IO page table.
#[derive(Debug)]
pub struct IoPageTable {
    root: Box<Node>,
    /// Bumped whenever a translation may have gone away.
    gen: u64,
    mapped: u64,
}

impl Default for IoPageTable {
    fn default() -> Self {
        Self::new()
    }
}

impl IoPageTable {
    /// An empty table.
    pub fn new() -> Self {
        IoPageTable { root: Node::new(), gen: 1, mapped: 0 }
    }

    /// Bytes mapped.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped
    }

    /// Maps `[iova, iova + len)` to `[target, target + len)` with `perm`. Refused, changing
    /// nothing, if any part is already mapped.
    pub fn map(&mut self, iova: u64, target: u64, len: u64, perm: Perm) -> Result<(), MapError> {
        if !(iova | target | len).is_multiple_of(PAGE_4K) {
            return Err(MapError::Unaligned { iova, target, len });
        }
        let end = iova.checked_add(len).filter(|&e| len > 0 && e <= 1 << IOVA_BITS);
        let Some(end) = end else { return Err(MapError::BadRange { iova, len }) };
        if target.checked_add(len).is_none() {
            return Err(MapError::BadRange { iova, len });
        }
        if !perm.read && !perm.write {
            return Err(MapError::NoPermission);
        }
        if any_mapped(&self.root, 4, 0, iova, end) {
            return Err(MapError::Overlap { iova, len });
        }
        let (mut at, mut to) = (iova, target);
        while at < end {
            let level = [3u32, 2, 1]
                .into_iter()
                .find(|&l| at % span(l) == 0 && to % span(l) == 0 && end - at >= span(l))
                .unwrap_or(1);
            set_leaf(&mut self.root, 4, at, level, to, perm);
            at += span(level);
            to += span(level);
        }
        self.mapped += len;
        Ok(())
    }

    /// Unmaps whatever is mapped in `[iova, iova + len)`; returns the bytes that were mapped.
    /// A large page only partly inside the range is split, its other parts kept.
    pub fn unmap(&mut self, iova: u64, len: u64) -> Result<u64, MapError> {
        if !(iova | len).is_multiple_of(PAGE_4K) {
            return Err(MapError::Unaligned { iova, target: 0, len });
        }
        let end = iova.checked_add(len).filter(|&e| len > 0 && e <= 1 << IOVA_BITS);
        let Some(end) = end else { return Err(MapError::BadRange { iova, len }) };
        let n = unmap_in(&mut self.root, 4, 0, iova, end);
        self.mapped -= n;
        // Splits change leaf shapes and removals drop translations: every cache starts over.
        self.gen += 1;
        Ok(n)
    }

    /// Makes every cache start over (an explicit IOTLB invalidation).
    pub fn invalidate_caches(&mut self) {
        self.gen += 1;
    }

    fn walk(&self, iova: u64) -> Option<Leaf> {
        if iova >> IOVA_BITS != 0 {
            return None;
        }
        let mut node = &self.root;
        let mut level = 4;
        loop {
            match &node.e[index(iova, level)] {
                Entry::Empty => return None,
                Entry::Table(t) => {
                    node = t;
                    level -= 1;
                }
                Entry::Leaf { target, perm } => {
                    let size = span(level);
                    return Some(Leaf { base: iova & !(size - 1), size, target: *target, perm: *perm });
                }
            }
        }
    }

    /// Translates the start of `[iova, iova + len)`: the output address of `iova` and how many
    /// bytes from there one mapping covers (at most `len`). Callers loop for the rest.
    #[inline]
    pub fn translate(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        cache: &mut TlbCache,
    ) -> Result<(u64, u64), FaultReason> {
        if cache.gen != self.gen {
            cache.slots = [None; TLB_ENTRIES];
            cache.gen = self.gen;
        }
        let slot = slot_of(iova, TLB_ENTRIES);
        let leaf = match cache.slots[slot] {
            Some(l) if iova.wrapping_sub(l.base) < l.size => {
                cache.hits += 1;
                l
            }
            _ => {
                cache.misses += 1;
                let l = self.walk(iova).ok_or(FaultReason::NotMapped)?;
                cache.slots[slot] = Some(l);
                l
            }
        };
        if !leaf.perm.allows(access) {
            return Err(FaultReason::Permission);
        }
        let off = iova - leaf.base;
        Ok((leaf.target + off, len.min(leaf.size - off)))
    }

    /// Translates all of `[iova, iova + len)` to one contiguous output range, or says why not:
    /// a hole (`NotMapped`), a page without the permission, or output pages that are not
    /// contiguous (`CrossesBoundary`).
    pub fn translate_contiguous(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        cache: &mut TlbCache,
    ) -> Result<u64, FaultReason> {
        let (start, mut got) = self.translate(iova, len, access, cache)?;
        while got < len {
            let next = iova.checked_add(got).ok_or(FaultReason::NotMapped)?;
            let (t, n) = self.translate(next, len - got, access, cache)?;
            if t != start + got {
                return Err(FaultReason::CrossesBoundary);
            }
            got += n;
        }
        Ok(start)
    }
}

fn any_mapped(node: &Node, level: u32, base: u64, start: u64, end: u64) -> bool {
    let s = span(level);
    let first = if start > base { ((start - base) / s) as usize } else { 0 };
    for i in first..FANOUT {
        let eb = base + i as u64 * s;
        if eb >= end {
            break;
        }
        match &node.e[i] {
            Entry::Empty => {}
            Entry::Leaf { .. } => return true,
            Entry::Table(t) => {
                if any_mapped(t, level - 1, eb, start, end) {
                    return true;
                }
            }
        }
    }
    false
}

fn set_leaf(node: &mut Node, level: u32, iova: u64, leaf_level: u32, target: u64, perm: Perm) {
    let i = index(iova, level);
    if level == leaf_level {
        node.e[i] = Entry::Leaf { target, perm };
        return;
    }
    if !matches!(node.e[i], Entry::Table(_)) {
        node.e[i] = Entry::Table(Node::new());
    }
    if let Entry::Table(t) = &mut node.e[i] {
        set_leaf(t, level - 1, iova, leaf_level, target, perm);
    }
}

/// Unmaps `[start, end)` below `node` (covering from `base`); returns bytes unmapped.
fn unmap_in(node: &mut Node, level: u32, base: u64, start: u64, end: u64) -> u64 {
    let s = span(level);
    let first = if start > base { ((start - base) / s) as usize } else { 0 };
    let mut n = 0;
    for i in first..FANOUT {
        let eb = base + i as u64 * s;
        if eb >= end {
            break;
        }
        let whole = start <= eb && eb + s <= end;
        match &mut node.e[i] {
            Entry::Empty => {}
            Entry::Leaf { .. } if whole => {
                node.e[i] = Entry::Empty;
                n += s;
            }
            Entry::Leaf { target, perm } => {
                // Partly covered: split into the next level's leaves, then unmap inside.
                let (target, perm) = (*target, *perm);
                let mut t = Node::new();
                let cs = span(level - 1);
                for (k, e) in t.e.iter_mut().enumerate() {
                    *e = Entry::Leaf { target: target + k as u64 * cs, perm };
                }
                n += unmap_in(&mut t, level - 1, eb, start, end);
                node.e[i] = Entry::Table(t);
            }
            Entry::Table(t) => {
                n += unmap_in(t, level - 1, eb, start, end);
                if t.is_empty() {
                    node.e[i] = Entry::Empty;
                }
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_map_uses_large_pages_when_aligned() {
        let mut t = IoPageTable::new();
        t.map(PAGE_1G, 2 * PAGE_1G, PAGE_1G + PAGE_2M + PAGE_4K, Perm::RW).unwrap();
        let mut c = TlbCache::default();
        assert_eq!(t.walk(PAGE_1G + 5).map(|l| l.size), Some(PAGE_1G));
        assert_eq!(t.walk(2 * PAGE_1G).map(|l| l.size), Some(PAGE_2M));
        assert_eq!(t.walk(2 * PAGE_1G + PAGE_2M).map(|l| l.size), Some(PAGE_4K));
        assert_eq!(t.translate(PAGE_1G + 0x1234, 100, Access::Read, &mut c), Ok((2 * PAGE_1G + 0x1234, 100)));
        // One call covers up to the end of the leaf.
        assert_eq!(t.translate(2 * PAGE_1G - 16, 64, Access::Read, &mut c), Ok((3 * PAGE_1G - 16, 16)));
        assert_eq!(t.translate_contiguous(2 * PAGE_1G - 16, 64, Access::Read, &mut c), Ok(3 * PAGE_1G - 16));
        assert_eq!(t.mapped_bytes(), PAGE_1G + PAGE_2M + PAGE_4K);
    }

    #[test]
    fn test_faults_say_why() {
        let mut t = IoPageTable::new();
        let mut c = TlbCache::default();
        t.map(0, 0x10_0000, PAGE_4K, Perm::RO).unwrap();
        t.map(PAGE_4K, 0x50_0000, PAGE_4K, Perm::RW).unwrap();
        assert_eq!(t.translate(0, 8, Access::Write, &mut c), Err(FaultReason::Permission));
        assert_eq!(t.translate(3 * PAGE_4K, 8, Access::Read, &mut c), Err(FaultReason::NotMapped));
        assert_eq!(t.translate(1 << 50, 8, Access::Read, &mut c), Err(FaultReason::NotMapped));
        assert_eq!(
            t.translate_contiguous(PAGE_4K - 8, 16, Access::Read, &mut c),
            Err(FaultReason::CrossesBoundary),
            "both pages readable but not contiguous behind"
        );
        assert_eq!(
            t.translate_contiguous(PAGE_4K + 8, PAGE_4K, Access::Read, &mut c),
            Err(FaultReason::NotMapped)
        );
    }

    #[test]
    fn test_overlap_and_bad_ranges_are_refused_whole() {
        let mut t = IoPageTable::new();
        t.map(PAGE_2M, 0, PAGE_2M, Perm::RW).unwrap();
        assert_eq!(
            t.map(0, 0, PAGE_2M + PAGE_4K, Perm::RW),
            Err(MapError::Overlap { iova: 0, len: PAGE_2M + PAGE_4K })
        );
        assert!(t.walk(0).is_none(), "a refused map changes nothing");
        assert!(matches!(t.map(1, 0, PAGE_4K, Perm::RW), Err(MapError::Unaligned { .. })));
        assert!(matches!(
            t.map((1 << 48) - PAGE_4K, 0, 2 * PAGE_4K, Perm::RW),
            Err(MapError::BadRange { .. })
        ));
        assert_eq!(t.map(0, 0, PAGE_4K, Perm::default()), Err(MapError::NoPermission));
    }

    #[test]
    fn test_partial_unmap_splits_a_large_page() {
        let mut t = IoPageTable::new();
        let mut c = TlbCache::default();
        t.map(0, PAGE_1G, PAGE_1G, Perm::RW).unwrap();
        assert!(t.translate(PAGE_2M + 5, 1, Access::Read, &mut c).is_ok()); // cached as 1 GiB
        assert_eq!(t.unmap(PAGE_2M, PAGE_4K), Ok(PAGE_4K));
        assert_eq!(
            t.translate(PAGE_2M + 5, 1, Access::Read, &mut c),
            Err(FaultReason::NotMapped),
            "cache emptied"
        );
        assert_eq!(
            t.translate(PAGE_2M + PAGE_4K, 1, Access::Read, &mut c),
            Ok((PAGE_1G + PAGE_2M + PAGE_4K, 1))
        );
        assert_eq!(t.translate(5 * PAGE_2M, 1, Access::Read, &mut c), Ok((PAGE_1G + 5 * PAGE_2M, 1)));
        assert_eq!(t.mapped_bytes(), PAGE_1G - PAGE_4K);
        assert_eq!(t.unmap(0, PAGE_1G), Ok(PAGE_1G - PAGE_4K));
        assert!(t.root.is_empty(), "empty tables are freed");
    }

    #[test]
    fn test_cache_hits_after_first_walk() {
        let mut t = IoPageTable::new();
        let mut c = TlbCache::default();
        t.map(0, 0, PAGE_2M, Perm::RW).unwrap();
        for _ in 0..10 {
            t.translate(0x100, 64, Access::Write, &mut c).unwrap();
        }
        assert_eq!((c.hits, c.misses), (9, 1));
        t.invalidate_caches();
        t.translate(0x100, 64, Access::Write, &mut c).unwrap();
        assert_eq!(c.misses, 2);
    }
}
