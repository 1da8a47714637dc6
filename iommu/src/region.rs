//! One mapped region of guest memory.
//!
//! Only `[page_floor(mmap_offset), page_ceil(mmap_offset + size))` of the file is mapped (a
//! sparse multi-TiB file cannot fill the switch's address space), and the file is closed once
//! mapped (a frontend cannot make the switch hold one fd per region).
//!
//! The mapping is `MAP_SHARED | MAP_NORESERVE`, so a page the file loses after it was mapped
//! (truncation; a hole punched in a hugetlbfs file while the pool is empty) raises SIGBUS on
//! access. [`Backing`] says which files can do that; [`Unsealed`] says whether such a file is
//! refused or mapped under the SIGBUS guard (`crate::guard`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use crate::guard::Guard;
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

/// What to do with a region whose file could lose pages under the switch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unsealed {
    /// Refuse it.
    #[default]
    Refuse,
    /// Map it under the SIGBUS guard: a lost page reads as zeros and marks the region faulted.
    Guard,
}

/// What kind of file backs a region, as far as losing pages goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A memfd (shmem) sealed with `F_SEAL_SHRINK`: its pages cannot go away (a punched hole
    /// reads back as zeros).
    SealedMemfd,
    /// A memfd or tmpfs file that can be truncated.
    UnsealedMemfd,
    /// A hugetlbfs file or hugetlb memfd: even sealed, a hole punched while the pool is empty
    /// cannot be faulted back in.
    Hugetlb,
    /// Any other file: it can be truncated.
    File,
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

impl Backing {
    /// Classifies `file` by its filesystem and seals.
    pub fn of(file: &File) -> std::io::Result<Backing> {
        // SAFETY: statfs is plain data; all zeroes is a valid value.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs on a valid fd into a struct we own.
        if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(match st.f_type as i64 {
            HUGETLBFS_MAGIC => Backing::Hugetlb,
            TMPFS_MAGIC => {
                // SAFETY: F_GET_SEALS takes no argument; a failure reads as "no seals".
                let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
                if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
                    Backing::SealedMemfd
                } else {
                    Backing::UnsealedMemfd
                }
            }
            _ => Backing::File,
        })
    }

    /// Whether a page mapped from this file can disappear (and SIGBUS the switch).
    pub fn can_lose_pages(self) -> bool {
        self != Backing::SealedMemfd
    }

    /// Short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Backing::SealedMemfd => "sealed memfd",
            Backing::UnsealedMemfd => "memfd",
            Backing::Hugetlb => "hugetlbfs",
            Backing::File => "file",
        }
    }

    /// Why such a file can lose pages.
    pub fn why(self) -> &'static str {
        match self {
            Backing::SealedMemfd => "",
            Backing::UnsealedMemfd => "it has no F_SEAL_SHRINK seal",
            Backing::Hugetlb => "huge pages punched out of it cannot come back while the pool is empty",
            Backing::File => "a plain file can be truncated",
        }
    }
}

/// The mapping behind a region: unregistered from the guard, then unmapped, when the last
/// region sharing it goes.
struct Mapping {
    base: *mut u8,
    len: usize,
    guard: Option<Guard>,
}

// SAFETY: the mapping is process-wide memory owned by this struct; nothing in it is tied to a
// thread, and it is unmapped once, by whichever thread drops the last reference.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`; the struct is immutable after construction.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Unregister first: the handler must never map over addresses that are no longer ours.
        self.guard.take();
        // SAFETY: `base..base + len` is a mapping this struct created and nothing else unmaps.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// A mapped guest memory region: immutable once built, shared by every address space that
/// contains it, unmapped when the last one lets go.
#[derive(Clone)]
pub struct Region {
    desc: MemoryRegionDesc,
    /// Host address of the region's first byte (inside the mapping, `mmap_offset` rounded
    /// down to a page from its start).
    host: *mut u8,
    map: Arc<Mapping>,
}

// SAFETY: `host` points into `map`, a shared mapping that lives as long as any clone of this
// region. The region hands out raw pointers only; every access to guest memory through them is
// an unsynchronised access to memory the guest also writes, which callers treat as volatile.
unsafe impl Send for Region {}
// SAFETY: see `Send`: the region itself is immutable.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `desc` from `file`, checking that the file really holds the bytes the table claims
    /// (a short file would turn a guest access into SIGBUS for the whole switch) and that it
    /// cannot lose them later unless `unsealed` allows it. `file` is closed on return.
    pub fn map(desc: MemoryRegionDesc, file: File, unsealed: Unsealed) -> Result<Self> {
        let gpa = desc.guest_phys_addr;
        let size = desc.memory_size;
        check_desc(&desc)?;
        let meta = file.metadata().map_err(|source| Error::Map { gpa, source })?;
        let need = desc.mmap_offset.checked_add(size).ok_or(Error::Wraps { gpa, size })?;
        // hugetlbfs and memfd report their size; character devices, pipes and sockets report
        // 0 and are refused rather than trusted.
        if meta.size() < need {
            return Err(Error::FileTooSmall { gpa, need, have: meta.size() });
        }
        let backing = Backing::of(&file).map_err(|source| Error::Map { gpa, source })?;
        if backing.can_lose_pages() && unsealed == Unsealed::Refuse {
            return Err(Error::CanLosePages { gpa, size, backing: backing.name(), why: backing.why() });
        }
        // mmap needs a file offset aligned to the file's page (a huge page on hugetlbfs).
        let page = file_page(meta.blksize());
        let first = desc.mmap_offset / page * page;
        let len = need.div_ceil(page) * page - first;
        let len = usize::try_from(len).map_err(|_| Error::Wraps { gpa, size })?;
        let offset = libc::off_t::try_from(first).map_err(|_| Error::Wraps { gpa, size })?;
        // No MAP_POPULATE: it would allocate every page of the guest's file, holes included
        // (DPDK punches holes in its hugetlbfs files as its memory shrinks); pages the guest
        // uses fault in on first touch.
        // SAFETY: a fresh mapping (no address hint) of `len` bytes of `file` from a page-aligned
        // offset; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::Map { gpa, source: std::io::Error::last_os_error() });
        }
        let mut map = Mapping { base: base.cast(), len, guard: None };
        if backing.can_lose_pages() {
            map.guard = Some(
                Guard::register(base as usize, len, page as usize).map_err(|_| Error::GuardFull { gpa })?,
            );
        }
        // SAFETY: `mmap_offset - first < page <= len`, so the pointer stays inside the mapping.
        let host = unsafe { map.base.add((desc.mmap_offset - first) as usize) };
        Ok(Region { desc, host, map: Arc::new(map) })
    }

    /// A region of fresh anonymous memory (for tests and in-process frontends): the same
    /// translation rules, no file behind it.
    pub fn anonymous(guest_phys_addr: u64, memory_size: u64, userspace_addr: u64) -> Result<Self> {
        let desc = MemoryRegionDesc { guest_phys_addr, memory_size, userspace_addr, mmap_offset: 0 };
        check_desc(&desc)?;
        let gpa = guest_phys_addr;
        let len = memory_size as usize;
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(Error::Map { gpa, source: std::io::Error::last_os_error() });
        }
        let map = Mapping { base: base.cast(), len, guard: None };
        Ok(Region { desc, host: map.base, map: Arc::new(map) })
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

    /// Bytes of address space the mapping takes (the region rounded out to whole pages).
    pub fn mapped_len(&self) -> u64 {
        self.map.len as u64
    }

    /// Whether the region is mapped under the SIGBUS guard (its file can lose pages).
    pub fn guarded(&self) -> bool {
        self.map.guard.is_some()
    }

    /// Whether a page of the region was lost (its file shrank) and replaced with zeros: the
    /// frontend broke its memory, and its port should be dropped.
    pub fn faulted(&self) -> bool {
        self.map.guard.as_ref().is_some_and(Guard::faulted)
    }
}

/// The page size mappings of a file use: its block size when that is a power of two of at
/// least a page (hugetlbfs reports its huge page size), else the system page.
fn file_page(blksize: u64) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let sys = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    if blksize.is_power_of_two() && blksize >= sys && blksize <= 1 << 30 {
        blksize
    } else {
        sys
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd(size: u64, seals: libc::c_int) -> File {
        // SAFETY: memfd_create with a valid C string; the fd is owned by the File.
        let f = unsafe {
            File::from_raw_fd(libc::memfd_create(c"region-test".as_ptr(), libc::MFD_ALLOW_SEALING))
        };
        f.set_len(size).unwrap();
        if seals != 0 {
            // SAFETY: F_ADD_SEALS on a memfd we own.
            assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) }, 0);
        }
        f
    }

    fn desc(size: u64, mmap_offset: u64) -> MemoryRegionDesc {
        MemoryRegionDesc { guest_phys_addr: 0, memory_size: size, userspace_addr: 0x7000_0000, mmap_offset }
    }

    #[test]
    fn test_backing_of_memfds_by_seal() {
        assert_eq!(Backing::of(&memfd(4096, 0)).unwrap(), Backing::UnsealedMemfd);
        assert_eq!(Backing::of(&memfd(4096, libc::F_SEAL_GROW)).unwrap(), Backing::UnsealedMemfd);
        assert_eq!(Backing::of(&memfd(4096, libc::F_SEAL_SHRINK)).unwrap(), Backing::SealedMemfd);
        let plain = File::open("/proc/self/exe").unwrap();
        assert_eq!(Backing::of(&plain).unwrap(), Backing::File);
    }

    #[test]
    fn test_unsealed_memfd_refused_unless_guarded() {
        let e = Region::map(desc(4096, 0), memfd(4096, 0), Unsealed::Refuse).unwrap_err().to_string();
        assert!(e.contains("no F_SEAL_SHRINK seal") && e.contains("memfd"), "{e}");
        let r = Region::map(desc(4096, 0), memfd(4096, 0), Unsealed::Guard).unwrap();
        assert!(r.guarded() && !r.faulted());
        let r = Region::map(desc(4096, 0), memfd(4096, libc::F_SEAL_SHRINK), Unsealed::Refuse).unwrap();
        assert!(!r.guarded(), "a sealed memfd needs no guard");
    }

    #[test]
    fn test_only_the_regions_pages_are_mapped() {
        // A sparse 64 TiB file with the region in its last page: one page is mapped, not 64 TiB.
        let f = memfd(1 << 46, libc::F_SEAL_SHRINK);
        let r = Region::map(desc(4096, (1 << 46) - 4096), f, Unsealed::Refuse).unwrap();
        assert_eq!(r.mapped_len(), 4096);
        // An unaligned offset maps the pages it touches.
        let r = Region::map(desc(4096, 4096 + 8), memfd(3 * 4096, libc::F_SEAL_SHRINK), Unsealed::Refuse)
            .unwrap();
        assert_eq!(r.mapped_len(), 2 * 4096);
    }

    #[test]
    fn test_offset_past_the_end_of_the_file_refused() {
        let e = Region::map(desc(4096, 4096), memfd(4096, libc::F_SEAL_SHRINK), Unsealed::Guard);
        assert!(matches!(e, Err(Error::FileTooSmall { .. })));
        let e = Region::map(desc(4096, u64::MAX - 4095), memfd(4096, libc::F_SEAL_SHRINK), Unsealed::Guard);
        assert!(matches!(e, Err(Error::Wraps { .. })));
    }
}
