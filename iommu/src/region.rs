//! One mapped region of guest memory.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use vm_memory::{FileOffset, MmapRegion};

use crate::{Error, Result};

/// A memory-table entry as the frontend sent it (vhost-user `VhostUserMemoryRegion`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegionDesc {
    /// Guest-physical address of the first byte.
    pub guest_phys_addr: u64,
    /// Length in bytes.
    pub memory_size: u64,
    /// The frontend's own virtual address of the first byte (ring addresses use these).
    pub userspace_addr: u64,
    /// Offset of the first byte in the file.
    pub mmap_offset: u64,
}

/// A mapped guest memory region: immutable once built, shared by every address space that
/// contains it, unmapped when the last one lets go.
#[derive(Clone)]
pub struct Region {
    desc: MemoryRegionDesc,
    /// Host address of the region's first byte (the mapping plus `mmap_offset`).
    host: *mut u8,
    _map: Arc<MmapRegion<()>>,
}

// SAFETY: `host` points into `_map`, a shared mapping that lives as long as any clone of this
// region. The region hands out raw pointers only; every access to guest memory through them is
// an unsynchronised access to memory the guest also writes, which callers treat as volatile.
unsafe impl Send for Region {}
// SAFETY: see `Send`: the region itself is immutable.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `desc` from `file`, checking that the file really holds the bytes the table claims
    /// (a short file would turn a guest access into SIGBUS for the whole switch).
    pub fn map(desc: MemoryRegionDesc, file: File) -> Result<Self> {
        let gpa = desc.guest_phys_addr;
        check_desc(&desc)?;
        let meta = file.metadata().map_err(|source| Error::Map { gpa, source })?;
        let need = desc
            .mmap_offset
            .checked_add(desc.memory_size)
            .ok_or(Error::Wraps { gpa, size: desc.memory_size })?;
        // hugetlbfs and memfd report their size; character devices and the like report 0 and are
        // refused rather than trusted.
        if meta.size() < need {
            return Err(Error::FileTooSmall { gpa, need, have: meta.size() });
        }
        // mmap needs a page-aligned file offset, so map from 0 and step over `mmap_offset`
        // (what DPDK does). hugetlbfs needs the length rounded up to its page size.
        let page = (meta.blksize()).max(4096);
        let len = need.div_ceil(page) * page;
        let len = usize::try_from(len).map_err(|_| Error::Wraps { gpa, size: desc.memory_size })?;
        // No MAP_POPULATE: it would allocate every page of the guest's file, holes included
        // (DPDK punches holes in its hugetlbfs files as its memory shrinks); pages the guest
        // uses fault in on first touch.
        let flags = libc::MAP_SHARED | libc::MAP_NORESERVE;
        let map =
            MmapRegion::build(Some(FileOffset::new(file, 0)), len, libc::PROT_READ | libc::PROT_WRITE, flags)
                .map_err(|e| Error::Map { gpa, source: std::io::Error::other(e.to_string()) })?;
        // SAFETY: `mmap_offset + memory_size <= len` was checked above, so the offset stays
        // inside the mapping.
        let host = unsafe { map.as_ptr().add(desc.mmap_offset as usize) };
        Ok(Region { desc, host, _map: Arc::new(map) })
    }

    /// A region of fresh anonymous memory (for tests and in-process frontends): the same
    /// translation rules, no file behind it.
    pub fn anonymous(guest_phys_addr: u64, memory_size: u64, userspace_addr: u64) -> Result<Self> {
        let desc = MemoryRegionDesc { guest_phys_addr, memory_size, userspace_addr, mmap_offset: 0 };
        check_desc(&desc)?;
        let gpa = guest_phys_addr;
        let map = MmapRegion::new(memory_size as usize)
            .map_err(|e| Error::Map { gpa, source: std::io::Error::other(e.to_string()) })?;
        let host = map.as_ptr();
        Ok(Region { desc, host, _map: Arc::new(map) })
    }

    /// The table entry this region was built from.
    pub fn desc(&self) -> &MemoryRegionDesc {
        &self.desc
    }

    /// Guest-physical start.
    pub fn gpa(&self) -> u64 {
        self.desc.guest_phys_addr
    }

    /// Length in bytes.
    pub fn size(&self) -> u64 {
        self.desc.memory_size
    }

    /// Host address of the first byte.
    pub fn host(&self) -> *mut u8 {
        self.host
    }
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region").field("desc", &self.desc).field("host", &self.host).finish()
    }
}

pub(crate) fn check_desc(desc: &MemoryRegionDesc) -> Result<()> {
    let gpa = desc.guest_phys_addr;
    let size = desc.memory_size;
    if size == 0 {
        return Err(Error::EmptyRegion { gpa });
    }
    // Regions that wrap would defeat the one-comparison bounds check in `translate`.
    if gpa.checked_add(size).is_none() || desc.userspace_addr.checked_add(size).is_none() {
        return Err(Error::Wraps { gpa, size });
    }
    if isize::try_from(size).is_err() {
        return Err(Error::Wraps { gpa, size });
    }
    Ok(())
}
