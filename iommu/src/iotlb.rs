//! The vhost-user IOTLB: the backend's cache of a guest vIOMMU's translations.
//!
//! With `VIRTIO_F_IOMMU_PLATFORM` every address a frontend puts in a ring is an IOVA. The
//! frontend (QEMU, which runs the vIOMMU) sends `IOTLB_MSG` updates (IOVA range → its own
//! virtual address, with permission) and invalidations; on a miss the backend asks for the
//! translation over the backend channel and retries later. This cache holds the updates:
//! disjoint ranges in a B-tree (O(log n) lookups whatever the number of entries, so no
//! linear-scan cliff), plus a per-user hint of the last range hit, so the common case (the
//! next buffer in the same mapping) is a compare and an add.
//!
//! Each entry is resolved once, when it arrives, to the host address where the switch has the
//! frontend's memory mapped, so a hit costs no second translation.
//!
//! Hostile frontends: an update whose user address range is not inside the frontend's memory
//! is refused (the caller resolves it, within one mapped region, or says it cannot), overlapping
//! updates replace what they overlap,
//! the cache is bounded (the lowest ranges are evicted first; a miss brings them back), and a
//! hint filled before any invalidation is never used after it.

use std::collections::BTreeMap;

use crate::fault::{Access, FaultReason, Perm};

/// Most entries kept by default.
pub const DEFAULT_MAX_ENTRIES: usize = 32768;

/// One translation: `[iova, iova + size)` → `[uaddr, uaddr + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbEntry {
    /// IOVA.
    pub iova: u64,
    /// Bytes.
    pub size: u64,
    /// Frontend virtual address.
    pub uaddr: u64,
    /// Access allowed.
    pub perm: Perm,
}

/// Why an update was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IotlbError {
    /// empty or wrapping
    #[error("IOTLB update at IOVA {iova:#x} of {size:#x} bytes is empty or wraps around")]
    BadRange {
        /// IOVA.
        iova: u64,
        /// Size.
        size: u64,
    },
    /// outside the frontend's memory
    #[error("IOTLB update maps IOVA {iova:#x} to {uaddr:#x}+{size:#x}, which is not inside the frontend's memory table")]
    OutsideMemory {
        /// IOVA.
        iova: u64,
        /// Frontend address.
        uaddr: u64,
        /// Size.
        size: u64,
    },
    /// no permission
    #[error("IOTLB update at IOVA {0:#x} grants neither read nor write")]
    NoPermission(u64),
}

/// Counters of an IOTLB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbCounters {
    /// Updates applied.
    pub updates: u64,
    /// Updates refused.
    pub refused: u64,
    /// Invalidations applied.
    pub invalidations: u64,
    /// Entries evicted to stay within the bound.
    pub evictions: u64,
}

/// Slots of a hint.
pub const HINT_SLOTS: usize = 256;

/// An entry as stored: the update plus where its first byte is mapped here.
#[derive(Clone, Copy, Debug)]
struct Stored {
    e: IotlbEntry,
    host: u64,
}

/// A user's small cache of entries it hit (direct-mapped by 4 KiB IOVA page, so the recurring
/// buffers of a ring find their entry without a tree walk), valid for one generation of the
/// IOTLB.
#[derive(Clone, Copy, Debug)]
pub struct IotlbHint {
    gen: u64,
    slots: [Option<Stored>; HINT_SLOTS],
}

impl Default for IotlbHint {
    fn default() -> Self {
        IotlbHint { gen: 0, slots: [None; HINT_SLOTS] }
    }
}

/// A bounded IOTLB cache.
#[derive(Clone, Debug)]
pub struct Iotlb {
    entries: BTreeMap<u64, Stored>,
    max: usize,
    /// Bumped on every change that can remove or alter a translation.
    gen: u64,
    /// Counters.
    pub counters: IotlbCounters,
}

impl Default for Iotlb {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_ENTRIES)
    }
}

impl Iotlb {
    /// An empty cache holding at most `max_entries` ranges.
    pub fn new(max_entries: usize) -> Self {
        Iotlb {
            entries: BTreeMap::new(),
            max: max_entries.max(1),
            gen: 1,
            counters: IotlbCounters::default(),
        }
    }

    /// Ranges held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Applies an update. `resolve(uaddr, size)` gives the host address of `uaddr` if the whole
    /// target range lies inside one mapped region of the frontend's memory; if not, the update
    /// is refused and nothing changes.
    pub fn update(
        &mut self,
        e: IotlbEntry,
        resolve: impl FnOnce(u64, u64) -> Option<u64>,
    ) -> Result<(), IotlbError> {
        let bad =
            e.size == 0 || e.iova.checked_add(e.size).is_none() || e.uaddr.checked_add(e.size).is_none();
        let res = if bad {
            Err(IotlbError::BadRange { iova: e.iova, size: e.size })
        } else if !e.perm.read && !e.perm.write {
            Err(IotlbError::NoPermission(e.iova))
        } else {
            resolve(e.uaddr, e.size)
                .filter(|h| h.checked_add(e.size).is_some())
                .ok_or(IotlbError::OutsideMemory { iova: e.iova, uaddr: e.uaddr, size: e.size })
        };
        let host = match res {
            Ok(h) => h,
            Err(err) => {
                self.counters.refused += 1;
                return Err(err);
            }
        };
        self.remove_range(e.iova, e.iova + e.size);
        self.evict_to(self.max - 1);
        self.entries.insert(e.iova, Stored { e, host });
        self.gen += 1;
        self.counters.updates += 1;
        Ok(())
    }

    /// Drops every translation in `[iova, iova + size)` (parts of ranges outside it stay).
    /// Returns how many entries it touched.
    pub fn invalidate(&mut self, iova: u64, size: u64) -> usize {
        let end = iova.saturating_add(size);
        let n = self.remove_range(iova, end);
        // A hole punched in the middle of a range leaves two: without this, a frontend could
        // grow the table past its bound one invalidation at a time. Evicting only costs a miss.
        self.evict_to(self.max);
        self.gen += 1;
        self.counters.invalidations += 1;
        n
    }

    /// Drops everything (the frontend reset its vIOMMU, or disconnected).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.gen += 1;
    }

    /// Evicts the lowest ranges until at most `n` are held.
    fn evict_to(&mut self, n: usize) {
        while self.entries.len() > n {
            self.entries.pop_first();
            self.counters.evictions += 1;
        }
    }

    fn remove_range(&mut self, s: u64, e: u64) -> usize {
        let hit: Vec<u64> = self
            .entries
            .range(..e)
            .rev()
            .take_while(|(_, x)| x.e.iova + x.e.size > s)
            .map(|(&k, _)| k)
            .collect();
        // Entries are disjoint and sorted, so those ending after `s` form a run back from `e`.
        for &k in &hit {
            let Some(Stored { e: x, host }) = self.entries.remove(&k) else { continue };
            let xe = x.iova + x.size;
            if x.iova < s {
                self.entries.insert(x.iova, Stored { e: IotlbEntry { size: s - x.iova, ..x }, host });
            }
            if xe > e {
                let cut = e - x.iova;
                let tail = IotlbEntry { iova: e, size: xe - e, uaddr: x.uaddr + cut, perm: x.perm };
                self.entries.insert(e, Stored { e: tail, host: host + cut });
            }
        }
        hit.len()
    }

    /// Translates the start of `[iova, iova + len)`: the host address of `iova` and how many
    /// bytes from there one entry covers (at most `len`). `NotMapped` is a miss: ask the
    /// frontend, retry later.
    #[inline]
    pub fn lookup(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        hint: &mut IotlbHint,
    ) -> Result<(u64, u64), FaultReason> {
        if hint.gen != self.gen {
            hint.slots = [None; HINT_SLOTS];
            hint.gen = self.gen;
        }
        let slot = crate::pagetable::slot_of(iova, HINT_SLOTS);
        let s = match hint.slots[slot] {
            Some(s) if iova.wrapping_sub(s.e.iova) < s.e.size => s,
            _ => {
                let (_, &s) = self.entries.range(..=iova).next_back().ok_or(FaultReason::NotMapped)?;
                if iova - s.e.iova >= s.e.size {
                    return Err(FaultReason::NotMapped);
                }
                hint.slots[slot] = Some(s);
                s
            }
        };
        if !s.e.perm.allows(access) {
            return Err(FaultReason::Permission);
        }
        let off = iova - s.e.iova;
        Ok((s.host + off, len.min(s.e.size - off)))
    }

    /// Translates all of `[iova, iova + len)` to one contiguous host range, following entries
    /// while each continues where the last ended (page-sized vIOMMU mappings of contiguous
    /// memory). On failure, the address where translation stopped and why: `NotMapped` there
    /// is a miss to ask for; `CrossesBoundary` means the range is mapped in separate pieces.
    pub fn lookup_contiguous(
        &self,
        iova: u64,
        len: u64,
        access: Access,
        hint: &mut IotlbHint,
    ) -> Result<u64, (u64, FaultReason)> {
        let (host, n) = self.lookup(iova, len, access, hint).map_err(|r| (iova, r))?;
        let mut done = n;
        while done < len {
            let at = iova.checked_add(done).ok_or((iova, FaultReason::CrossesBoundary))?;
            let (h, n) = self.lookup(at, len - done, access, hint).map_err(|r| (at, r))?;
            if h != host + done {
                return Err((at, FaultReason::CrossesBoundary));
            }
            done += n;
        }
        Ok(host)
    }

    /// Every entry, in IOVA order (for display and tests).
    pub fn entries(&self) -> impl Iterator<Item = &IotlbEntry> {
        self.entries.values().map(|s| &s.e)
    }

    /// Whether any entry overlaps `[iova, iova + size)`.
    pub fn overlaps(&self, iova: u64, size: u64) -> bool {
        let end = iova.saturating_add(size);
        self.entries.range(..end).next_back().is_some_and(|(_, s)| s.e.iova + s.e.size > iova)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(iova: u64, size: u64, uaddr: u64) -> IotlbEntry {
        IotlbEntry { iova, size, uaddr, perm: Perm::RW }
    }

    #[test]
    fn test_lookup_hits_and_misses() {
        let mut t = Iotlb::default();
        let mut h = IotlbHint::default();
        t.update(ent(0x1000, 0x2000, 0x7f00_0000), |u, _| Some(u)).unwrap();
        assert_eq!(t.lookup(0x1800, 0x100, Access::Read, &mut h), Ok((0x7f00_0800, 0x100)));
        assert_eq!(
            t.lookup(0x2f00, 0x200, Access::Read, &mut h),
            Ok((0x7f00_1f00, 0x100)),
            "chunk ends with the entry"
        );
        assert_eq!(t.lookup(0x3000, 1, Access::Read, &mut h), Err(FaultReason::NotMapped));
        assert_eq!(t.lookup(0xfff, 1, Access::Read, &mut h), Err(FaultReason::NotMapped));
    }

    #[test]
    fn test_overlapping_update_replaces_what_it_covers() {
        let mut t = Iotlb::default();
        let mut h = IotlbHint::default();
        t.update(ent(0, 0x10000, 0x100000), |u, _| Some(u)).unwrap();
        assert!(t.lookup(0x8000, 1, Access::Write, &mut h).is_ok());
        t.update(IotlbEntry { iova: 0x4000, size: 0x2000, uaddr: 0x900000, perm: Perm::RO }, |u, _| Some(u))
            .unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup(0x4100, 1, Access::Read, &mut h), Ok((0x900100, 1)));
        assert_eq!(t.lookup(0x4100, 1, Access::Write, &mut h), Err(FaultReason::Permission));
        assert_eq!(t.lookup(0x6000, 1, Access::Read, &mut h), Ok((0x106000, 1)), "tail kept, shifted");
        assert_eq!(t.lookup(0x3fff, 1, Access::Read, &mut h), Ok((0x103fff, 1)), "head kept");
    }

    #[test]
    fn test_invalidations_that_split_ranges_never_grow_past_the_bound() {
        // Found by the iotlb fuzz target: each hole punched in one big range added an entry.
        let mut t = Iotlb::new(4);
        t.update(ent(0, 0x100000, 0x100000), |u, _| Some(u)).unwrap();
        for k in 1..64 {
            t.invalidate(k * 0x1000, 0x10);
            assert!(t.len() <= 4, "{} entries after {k} holes", t.len());
        }
        let mut h = IotlbHint::default();
        assert_eq!(t.lookup(0xff000, 1, Access::Read, &mut h), Ok((0x1ff000, 1)), "the highest kept");
    }

    #[test]
    fn test_invalidation_beats_the_hint() {
        let mut t = Iotlb::default();
        let mut h = IotlbHint::default();
        t.update(ent(0, 0x10000, 0x100000), |u, _| Some(u)).unwrap();
        assert!(t.lookup(0x100, 1, Access::Read, &mut h).is_ok());
        assert_eq!(t.invalidate(0, 0x1000), 1);
        assert_eq!(t.lookup(0x100, 1, Access::Read, &mut h), Err(FaultReason::NotMapped));
        assert_eq!(t.lookup(0x1000, 1, Access::Read, &mut h), Ok((0x101000, 1)));
    }

    #[test]
    fn test_hostile_updates_are_refused_and_counted() {
        let mut t = Iotlb::default();
        let inside = |u: u64, s: u64| (u >= 0x1000_0000 && u + s <= 0x2000_0000).then_some(u);
        assert!(matches!(
            t.update(ent(0, 0x1000, 0x1fff_f000 + 1), inside),
            Err(IotlbError::OutsideMemory { .. })
        ));
        assert!(matches!(
            t.update(ent(u64::MAX - 10, 0x1000, 0x1000_0000), inside),
            Err(IotlbError::BadRange { .. })
        ));
        assert!(matches!(t.update(ent(0, 0, 0x1000_0000), inside), Err(IotlbError::BadRange { .. })));
        let none = IotlbEntry { perm: Perm::default(), ..ent(0, 0x1000, 0x1000_0000) };
        assert_eq!(t.update(none, inside), Err(IotlbError::NoPermission(0)));
        assert!(t.is_empty());
        assert_eq!(t.counters.refused, 4);
        let e = t.update(ent(0, 0x1000, 0x3000_0000), inside).unwrap_err().to_string();
        assert!(e.contains("not inside the frontend's memory"), "{e}");
    }

    #[test]
    fn test_contiguous_lookup_follows_adjacent_pages() {
        let mut t = Iotlb::default();
        let mut h = IotlbHint::default();
        // Two pages contiguous in host memory, then one elsewhere.
        t.update(ent(0x1000, 0x1000, 0x50_0000), |u, _| Some(u)).unwrap();
        t.update(ent(0x2000, 0x1000, 0x50_1000), |u, _| Some(u)).unwrap();
        t.update(ent(0x3000, 0x1000, 0x90_0000), |u, _| Some(u)).unwrap();
        assert_eq!(t.lookup_contiguous(0x1800, 0x1000, Access::Read, &mut h), Ok(0x50_0800));
        assert_eq!(
            t.lookup_contiguous(0x2800, 0x1000, Access::Read, &mut h),
            Err((0x3000, FaultReason::CrossesBoundary))
        );
        assert_eq!(
            t.lookup_contiguous(0x3800, 0x1000, Access::Read, &mut h),
            Err((0x4000, FaultReason::NotMapped)),
            "the miss is reported where it is"
        );
        assert!(t.overlaps(0x3fff, 1) && !t.overlaps(0x4000, 0x1000) && !t.overlaps(0, 0x1000));
    }

    #[test]
    fn test_bounded_by_evicting_the_lowest() {
        let mut t = Iotlb::new(4);
        for i in 0..10u64 {
            t.update(ent(i * 0x1000, 0x1000, 0x100000 + i * 0x1000), |u, _| Some(u)).unwrap();
        }
        assert_eq!(t.len(), 4);
        assert_eq!(t.counters.evictions, 6);
        let mut h = IotlbHint::default();
        assert_eq!(t.lookup(0, 1, Access::Read, &mut h), Err(FaultReason::NotMapped));
        assert!(t.lookup(9 * 0x1000, 1, Access::Read, &mut h).is_ok());
    }
}
