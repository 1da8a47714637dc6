//! Shared guest memory: one memfd region mapped into this process, and the
//! placement of rings and buffers inside it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use vhost::VhostUserMemoryRegionInfo;

use super::config::FrontendConfig;
use super::error::{Error, Result};

const HUGE_2M: usize = 2 << 20;
const PAGE: usize = 4096;

/// A memfd-backed, `MAP_SHARED` mapping that the backend maps too.
///
/// Guest-physical address `gpa_base + off` is host address `ptr + off`.
pub(crate) struct GuestMemory {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
    gpa_base: u64,
    hugepages: bool,
}

impl GuestMemory {
    /// Creates and maps a zero-filled region of at least `size` bytes.
    ///
    /// With `hugepages`, tries `MFD_HUGETLB | MFD_HUGE_2MB` first (size rounded
    /// up to 2 MiB) and falls back to ordinary pages if the kernel has no huge
    /// pages to give. With `seal`, the memfd is sealed against shrinking and growing, as
    /// QEMU's memory-backend-memfd does.
    pub(crate) fn new(size: usize, hugepages: bool, gpa_base: u64, seal: bool) -> Result<Self> {
        if hugepages {
            let huge_size = size.div_ceil(HUGE_2M) * HUGE_2M;
            match Self::create(huge_size, libc::MFD_HUGETLB | libc::MFD_HUGE_2MB, gpa_base, seal) {
                Ok(mut m) => {
                    m.hugepages = true;
                    return Ok(m);
                }
                Err(e) => {
                    tracing::info!("huge-page guest memory unavailable ({e}); using 4 KiB pages")
                }
            }
        }
        Self::create(size.div_ceil(PAGE) * PAGE, 0, gpa_base, seal)
    }

    fn create(len: usize, extra_flags: libc::c_uint, gpa_base: u64, seal: bool) -> Result<Self> {
        let name = c"vswitch-bench-guest";
        // SAFETY: `name` is a valid NUL-terminated string; the flags are valid
        // memfd_create flags. The returned fd is checked below.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | extra_flags)
        };
        if raw < 0 {
            return Err(Error::Memory { what: "memfd_create", source: io::Error::last_os_error() });
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len).map_err(|_| Error::Memory {
            what: "ftruncate",
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: plain syscall on a valid fd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(Error::Memory { what: "ftruncate", source: io::Error::last_os_error() });
        }
        // Sealed against shrinking, as QEMU's memory-backend-memfd does: the switch refuses
        // memory that could be truncated under it (a SIGBUS there would kill it).
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: F_ADD_SEALS on a memfd we own.
        if seal && unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(Error::Memory { what: "sealing the memfd", source: io::Error::last_os_error() });
        }
        // MAP_POPULATE: fault everything in now, so a huge-page shortage shows
        // up here rather than as SIGBUS on first touch, and the datapath does
        // not take page faults.
        // SAFETY: we map a fresh region (addr NULL) of `len` bytes of a memfd we
        // own and sized to `len`; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Memory { what: "mmap", source: io::Error::last_os_error() });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(Error::Memory {
            what: "mmap",
            source: io::Error::from(io::ErrorKind::AddrNotAvailable),
        })?;
        Ok(GuestMemory { fd, ptr, len, gpa_base, hugepages: false })
    }

    /// The memfd behind the region.
    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Region length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is backed by huge pages.
    pub(crate) fn hugepages(&self) -> bool {
        self.hugepages
    }

    /// Guest-physical address of the region start.
    pub(crate) fn gpa_base(&self) -> u64 {
        self.gpa_base
    }

    /// Host pointer to byte `off` of the region.
    ///
    /// # Panics
    /// If `off` is past the end of the region.
    pub(crate) fn host_ptr(&self, off: usize) -> *mut u8 {
        assert!(off <= self.len, "offset {off} outside guest memory");
        // SAFETY: `off <= len`, so the result stays within (or one past) the mapping.
        unsafe { self.ptr.as_ptr().add(off) }
    }

    /// Our (frontend) virtual address of byte `off`, as sent in `SET_VRING_ADDR`.
    pub(crate) fn uva(&self, off: usize) -> u64 {
        self.host_ptr(off) as u64
    }

    /// The region as announced to the backend.
    pub(crate) fn region_info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.gpa_base,
            memory_size: self.len as u64,
            userspace_addr: self.ptr.as_ptr() as u64,
            mmap_offset: 0,
            mmap_handle: self.fd.as_raw_fd(),
        }
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping created in `create`, and no
        // ring or queue outlives the `Frontend` that owns this memory.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// SAFETY: the mapping is plain shared memory owned by this value; moving it to
// another thread is fine (it is not Sync-shared: users need `&mut` to write).
unsafe impl Send for GuestMemory {}

/// Offsets (from the region start) of one vring and its buffers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct VringLayout {
    /// Descriptor table (16 bytes per entry).
    pub desc: usize,
    /// Available ring: flags, idx, ring[size], used_event.
    pub avail: usize,
    /// Used ring: flags, idx, ring[size] of (id, len), avail_event.
    pub used: usize,
    /// `size` buffers of `buf_size` bytes, buffer `i` belongs to descriptor `i`.
    pub bufs: usize,
    /// Size of each buffer.
    pub buf_size: usize,
    /// `size` two-entry indirect tables (TX only).
    pub indirect: usize,
}

/// Placement of everything inside the region.
#[derive(Debug)]
pub(crate) struct Layout {
    /// Vring `i` (2k = RX of pair k, 2k+1 = TX of pair k).
    pub vrings: Vec<VringLayout>,
    /// Start of the scratch area handed out by `guest_mem`.
    pub scratch: usize,
    /// Length of the scratch area.
    pub scratch_len: usize,
    /// Bytes needed in total.
    pub total: usize,
}

/// Size of one descriptor.
pub(crate) const DESC_SIZE: usize = 16;
/// Size of one used-ring element.
pub(crate) const USED_ELEM_SIZE: usize = 8;
/// Descriptors in one per-frame indirect table (header, frame).
pub(crate) const INDIRECT_ENTRIES: usize = 2;

fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

impl FrontendConfig {
    /// Smallest `mem_size` that holds the rings, buffers and scratch area
    /// this configuration asks for (here, beside the layout it measures, so the config
    /// does not import the memory module back).
    pub fn required_mem_size(&self) -> usize {
        Layout::new(self).total
    }
}

impl Layout {
    /// Computes the layout for `cfg`. Rings are page aligned; the used ring
    /// (written by the backend) gets its own cache lines.
    pub(crate) fn new(cfg: &FrontendConfig) -> Layout {
        let n = cfg.ring_size as usize;
        let mut off = 0;
        let mut vrings = Vec::with_capacity(2 * cfg.queue_pairs as usize);
        for i in 0..2 * cfg.queue_pairs as usize {
            let is_tx = i % 2 == 1;
            let desc = align(off, PAGE);
            let avail = desc + DESC_SIZE * n;
            let used = align(avail + 6 + 2 * n, 64);
            let buf_size = if is_tx { cfg.tx_buf_size } else { cfg.rx_buf_size } as usize;
            let bufs = align(used + 6 + USED_ELEM_SIZE * n, 64);
            let indirect = align(bufs + buf_size * n, 64);
            off = if is_tx { indirect + INDIRECT_ENTRIES * DESC_SIZE * n } else { indirect };
            vrings.push(VringLayout { desc, avail, used, bufs, buf_size, indirect });
        }
        let scratch = align(off, PAGE);
        let total = scratch + cfg.scratch_size;
        Layout { vrings, scratch, scratch_len: cfg.scratch_size, total }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_zeroed_and_addressable() {
        let m = GuestMemory::new(10_000, false, 0x1_0000_0000, true).expect("memfd");
        assert_eq!(m.len(), 12_288);
        assert_eq!(m.gpa_base(), 0x1_0000_0000);
        let info = m.region_info();
        assert_eq!(info.memory_size, 12_288);
        assert_eq!(info.guest_phys_addr, 0x1_0000_0000);
        assert_eq!(info.userspace_addr, m.uva(0));
        // SAFETY: the offset is inside the fresh mapping, nothing else uses it.
        unsafe {
            assert_eq!(m.host_ptr(m.len() - 1).read(), 0);
            m.host_ptr(5).write(7);
            assert_eq!(m.host_ptr(5).read(), 7);
        }
    }

    #[test]
    fn hugepage_request_falls_back() {
        // Works whether or not huge pages are reserved on this machine.
        let m = GuestMemory::new(1 << 20, true, 0, true).expect("memfd");
        assert!(m.len() >= 1 << 20);
        if m.hugepages() {
            assert_eq!(m.len() % HUGE_2M, 0);
        }
    }

    #[test]
    fn layout_does_not_overlap() {
        let cfg = FrontendConfig { queue_pairs: 2, ring_size: 8, ..FrontendConfig::default() };
        let l = Layout::new(&cfg);
        assert_eq!(l.vrings.len(), 4);
        let mut end = 0;
        for (i, v) in l.vrings.iter().enumerate() {
            assert!(v.desc >= end && v.desc % PAGE == 0);
            assert!(v.avail >= v.desc + 8 * 16);
            assert!(v.used >= v.avail + 6 + 16 && v.used % 4 == 0);
            assert!(v.bufs >= v.used + 6 + 64);
            assert!(v.indirect >= v.bufs + 8 * v.buf_size);
            end = v.indirect + if i % 2 == 1 { 8 * 32 } else { 0 };
        }
        assert!(l.scratch >= end);
        assert_eq!(l.total, l.scratch + cfg.scratch_size);
        assert_eq!(cfg.required_mem_size(), l.total);
        // The defaults fit the default 16 MiB.
        let d = FrontendConfig::default();
        assert!(d.required_mem_size() <= d.mem_size);
    }
}
