//! The flat region table and the bounds-checked translation the datapath uses.

use std::ptr::NonNull;

use crate::region::Region;
use crate::{Error, Result};

/// Most regions one address space may hold. vhost-user's SET_MEM_TABLE carries at most 8;
/// ADD_MEM_REG (CONFIGURE_MEM_SLOTS) lets QEMU hot-plug many more (it asks for up to 509).
pub const MAX_REGIONS: usize = 509;

/// Index of the region that served the last translation; each queue keeps its own, so a burst
/// of buffers from one region costs one comparison each.
pub type RegionHint = u16;

/// A guest's memory as the switch sees it: an immutable, sorted table of mapped regions.
///
/// Changing the table builds a new `AddressSpace` (regions are shared, not remapped) which is
/// handed to the polling threads between bursts; the old one is dropped once they have let go.
#[derive(Clone, Debug, Default)]
pub struct AddressSpace {
    /// Sorted by guest-physical start; non-overlapping.
    regions: Vec<Region>,
}

impl AddressSpace {
    /// Builds a space from regions, refusing overlaps (in guest-physical or frontend-virtual
    /// addresses) and oversized tables.
    pub fn new(mut regions: Vec<Region>) -> Result<Self> {
        if regions.len() > MAX_REGIONS {
            return Err(Error::TooManyRegions(regions.len()));
        }
        regions.sort_by_key(|r| r.gpa());
        for w in regions.windows(2) {
            if w[0].gpa() + w[0].size() > w[1].gpa() {
                return Err(Error::Overlap { a: w[0].gpa(), b: w[1].gpa() });
            }
        }
        let mut by_uva: Vec<&Region> = regions.iter().collect();
        by_uva.sort_by_key(|r| r.desc().userspace_addr);
        for w in by_uva.windows(2) {
            if w[0].desc().userspace_addr + w[0].size() > w[1].desc().userspace_addr {
                return Err(Error::Overlap { a: w[0].gpa(), b: w[1].gpa() });
            }
        }
        Ok(AddressSpace { regions })
    }

    /// A copy of this space with `region` added (ADD_MEM_REG).
    pub fn with_region(&self, region: Region) -> Result<Self> {
        let mut regions = self.regions.clone();
        regions.push(region);
        Self::new(regions)
    }

    /// A copy of this space without the region that starts at `gpa` and has `size` bytes
    /// (REM_MEM_REG).
    pub fn without_region(&self, gpa: u64, size: u64) -> Result<Self> {
        let pos = self
            .regions
            .iter()
            .position(|r| r.gpa() == gpa && r.size() == size)
            .ok_or(Error::NoSuchRegion(gpa))?;
        let mut regions = self.regions.clone();
        regions.remove(pos);
        Ok(AddressSpace { regions })
    }

    /// The regions, sorted by guest-physical address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total bytes of guest memory mapped.
    pub fn total_size(&self) -> u64 {
        self.regions.iter().map(Region::size).sum()
    }

    /// Whether any region lost a page under the SIGBUS guard (see [`Region::faulted`]).
    pub fn faulted(&self) -> bool {
        self.regions.iter().any(Region::faulted)
    }

    /// Host pointer to `[gpa, gpa + len)` if that range lies wholly inside one region.
    ///
    /// `hint` is the caller's last-hit region; it is tried first and updated on a miss. `len`
    /// must be at least 1. Ranges that cross a region boundary are refused: guests place
    /// buffers inside one memory slot, and a buffer that does not is treated as malformed.
    #[inline(always)]
    pub fn translate(&self, gpa: u64, len: u32, hint: &mut RegionHint) -> Option<NonNull<u8>> {
        if let Some(r) = self.regions.get(*hint as usize) {
            if let Some(p) = contains(r, gpa, len) {
                return Some(p);
            }
        }
        self.translate_slow(gpa, len, hint)
    }

    #[cold]
    #[inline(never)]
    fn translate_slow(&self, gpa: u64, len: u32, hint: &mut RegionHint) -> Option<NonNull<u8>> {
        // Last region starting at or below gpa.
        let idx = self.regions.partition_point(|r| r.gpa() <= gpa).checked_sub(1)?;
        let p = contains(&self.regions[idx], gpa, len)?;
        *hint = idx as RegionHint;
        Some(p)
    }

    /// Host pointer to `[uva, uva + len)` given in the frontend's own virtual addresses (how
    /// vhost-user ring addresses arrive), if wholly inside one region.
    pub fn translate_uva(&self, uva: u64, len: u64) -> Option<NonNull<u8>> {
        self.regions.iter().find_map(|r| {
            let off = uva.checked_sub(r.desc().userspace_addr)?;
            if len == 0 || off.checked_add(len)? > r.size() {
                return None;
            }
            // SAFETY: `off + len <= size`, so the pointer stays inside the mapped region.
            NonNull::new(unsafe { r.host().add(off as usize) })
        })
    }

    /// `[uva, uva + len)` cut where it crosses from one region into the next: each piece's
    /// frontend address, length and host address. None if any byte is not mapped.
    pub fn uva_pieces(&self, uva: u64, len: u64) -> Option<Vec<(u64, u64, u64)>> {
        let mut out = Vec::new();
        let mut done = 0u64;
        while done < len {
            let at = uva.checked_add(done)?;
            let r = self
                .regions
                .iter()
                .find(|r| at.checked_sub(r.desc().userspace_addr).is_some_and(|off| off < r.size()))?;
            let off = at - r.desc().userspace_addr;
            let n = (r.size() - off).min(len - done);
            out.push((at, n, r.host() as u64 + off));
            done += n;
        }
        (!out.is_empty()).then_some(out)
    }

    /// Guest-physical address of a frontend virtual address, if mapped.
    pub fn uva_to_gpa(&self, uva: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = uva.checked_sub(r.desc().userspace_addr)?;
            (off < r.size()).then(|| r.gpa() + off)
        })
    }
}

/// The one bounds check: the whole of `[gpa, gpa + len)` inside `r`, `len` ≥ 1. Region sizes
/// fit in an isize (checked when built), so `off + len` cannot wrap once `off < size`.
#[inline(always)]
fn contains(r: &Region, gpa: u64, len: u32) -> Option<NonNull<u8>> {
    let off = gpa.wrapping_sub(r.gpa());
    let end = off.wrapping_add(len as u64);
    if off < r.size() && end <= r.size() && end > off {
        // SAFETY: `off + len <= size` so `host + off` lies inside the region's mapping.
        NonNull::new(unsafe { r.host().add(off as usize) })
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryRegionDesc;
    use std::io::Write;

    fn anon(gpa: u64, size: u64, uva: u64) -> Region {
        Region::anonymous(gpa, size, uva).unwrap()
    }

    #[test]
    fn test_translate_inside_and_at_edges() {
        let s = AddressSpace::new(vec![anon(0x1000, 0x2000, 0x7000_0000)]).unwrap();
        let mut h = 0;
        let base = s.translate(0x1000, 1, &mut h).unwrap().as_ptr();
        assert_eq!(s.translate(0x2fff, 1, &mut h).unwrap().as_ptr() as usize - base as usize, 0x1fff);
        assert!(s.translate(0x1000, 0x2000, &mut h).is_some());
        assert!(s.translate(0x1000, 0x2001, &mut h).is_none(), "one byte past the end");
        assert!(s.translate(0x0fff, 1, &mut h).is_none(), "below the region");
        assert!(s.translate(0x1000, 0, &mut h).is_none(), "zero length");
        assert!(s.translate(u64::MAX, 2, &mut h).is_none(), "wrapping range");
    }

    #[test]
    fn test_translate_refuses_range_crossing_adjacent_regions() {
        let s = AddressSpace::new(vec![anon(0, 0x1000, 0x10_0000), anon(0x1000, 0x1000, 0x20_0000)]).unwrap();
        let mut h = 0;
        assert!(s.translate(0xff0, 0x20, &mut h).is_none());
        assert!(s.translate(0x1ff0, 0x10, &mut h).is_some());
        assert_eq!(h, 1, "hint moves to the region that served the miss");
    }

    #[test]
    fn test_many_regions_binary_search() {
        let regs: Vec<_> = (0..64).map(|i| anon(i * 0x10000, 0x1000, 0x4000_0000 + i * 0x10000)).collect();
        let s = AddressSpace::new(regs).unwrap();
        let mut h = 0;
        for i in 0..64u64 {
            assert!(s.translate(i * 0x10000 + 0x800, 0x800, &mut h).is_some());
            assert!(s.translate(i * 0x10000 + 0x1000, 1, &mut h).is_none(), "hole after region {i}");
        }
    }

    #[test]
    fn test_overlap_refused() {
        let e = AddressSpace::new(vec![anon(0, 0x2000, 0x10_0000), anon(0x1000, 0x1000, 0x20_0000)]);
        assert!(matches!(e, Err(Error::Overlap { .. })));
    }

    #[test]
    fn test_wrapping_region_refused() {
        assert!(matches!(Region::anonymous(u64::MAX - 10, 0x1000, 0), Err(Error::Wraps { .. })));
        assert!(matches!(Region::anonymous(0, 0, 0), Err(Error::EmptyRegion { .. })));
    }

    #[test]
    fn test_uva_translation() {
        let s = AddressSpace::new(vec![anon(0x8000, 0x1000, 0x7f00_0000)]).unwrap();
        assert_eq!(s.uva_to_gpa(0x7f00_0010), Some(0x8010));
        assert!(s.translate_uva(0x7f00_0ff0, 0x10).is_some());
        assert!(s.translate_uva(0x7f00_0ff0, 0x11).is_none());
        assert!(s.uva_to_gpa(0x7f00_1000).is_none());
    }

    #[test]
    fn test_uva_pieces_split_at_region_edges() {
        let s = AddressSpace::new(vec![anon(0, 0x1000, 0x10_0000), anon(0x1000, 0x1000, 0x10_1000)]).unwrap();
        let p = s.uva_pieces(0x10_0800, 0x1000).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].0, p[0].1, p[1].0, p[1].1), (0x10_0800, 0x800, 0x10_1000, 0x800));
        assert_eq!(p[1].2, s.regions()[1].host() as u64);
        assert!(s.uva_pieces(0x10_1800, 0x1000).is_none(), "runs past the last region");
        assert!(s.uva_pieces(0x10_0000, 0).is_none());
    }

    #[test]
    fn test_map_refuses_short_file() {
        let mut f = tempfile();
        f.write_all(&[0u8; 4096]).unwrap();
        let desc =
            MemoryRegionDesc { guest_phys_addr: 0, memory_size: 8192, userspace_addr: 0, mmap_offset: 0 };
        assert!(matches!(Region::map(desc, f, crate::Unsealed::Guard), Err(Error::FileTooSmall { .. })));
    }

    #[test]
    fn test_map_with_offset_shares_file_bytes() {
        let mut f = tempfile();
        let mut data = vec![0u8; 8192];
        data[4096 + 5] = 0xab;
        f.write_all(&data).unwrap();
        let desc = MemoryRegionDesc {
            guest_phys_addr: 0x10000,
            memory_size: 4096,
            userspace_addr: 0,
            mmap_offset: 4096,
        };
        let s = AddressSpace::new(vec![Region::map(desc, f, crate::Unsealed::Guard).unwrap()]).unwrap();
        let mut h = 0;
        let p = s.translate(0x10005, 1, &mut h).unwrap();
        // SAFETY: translate returned a pointer to one mapped byte.
        assert_eq!(unsafe { p.as_ptr().read_volatile() }, 0xab);
    }

    #[test]
    fn test_remove_region() {
        let s = AddressSpace::new(vec![anon(0, 0x1000, 0x10_0000), anon(0x1000, 0x1000, 0x20_0000)]).unwrap();
        let s2 = s.without_region(0x1000, 0x1000).unwrap();
        let mut h = 0;
        assert!(s2.translate(0x1800, 1, &mut h).is_none());
        assert!(s.translate(0x1800, 1, &mut h).is_some(), "old space keeps its mapping");
        assert!(matches!(s.without_region(0x5000, 1), Err(Error::NoSuchRegion(_))));
    }

    fn tempfile() -> std::fs::File {
        let name = std::ffi::CString::new("iommu-test").unwrap();
        // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor we own.
        unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }
}
