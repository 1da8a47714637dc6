//! Guest RAM: one memfd (4 KiB pages, or 2 MiB hugetlbfs pages), mapped shared so the switch
//! can map the same pages from the vhost-user memory table, and registered with KVM.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, RawFd};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::layout::ram_ranges;
use crate::{Error, Result};

/// vm-memory's guest memory over mmap'ed regions.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

const HUGE_2M: u64 = 2 << 20;

/// Guest RAM and the file behind it.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    size: u64,
    hugepages: bool,
}

impl GuestRam {
    /// Creates `size` bytes of zeroed guest RAM (rounded up to 2 MiB), backed by 2 MiB huge
    /// pages when `hugepages` (an error if the kernel's pool is short: it was asked for).
    pub fn new(size: u64, hugepages: bool) -> Result<GuestRam> {
        if size < HUGE_2M {
            return Err(Error::Config(format!("guest memory of {size} bytes is too small (at least 2M)")));
        }
        let size = size.div_ceil(HUGE_2M) * HUGE_2M;
        // Sealable, so that it can be sealed against shrinking below: the switch maps it too,
        // and refuses memory a guest's VMM could truncate under it.
        let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        if hugepages {
            flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
        }
        // SAFETY: the name is NUL-terminated and the flags are valid; the result is checked.
        let fd: RawFd = unsafe { libc::memfd_create(c"hostvm-guest-ram".as_ptr(), flags) };
        if fd < 0 {
            return Err(mem_err("memfd_create", io::Error::last_os_error(), hugepages));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|e| mem_err(&format!("sizing the memfd to {size} bytes"), e, hugepages))?;
        // SAFETY: F_ADD_SEALS on the memfd we own (hugetlb memfds take seals too).
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) } != 0 {
            return Err(mem_err("sealing the memfd", io::Error::last_os_error(), hugepages));
        }
        let mut regions = Vec::new();
        let mut offset = 0u64;
        for (start, len) in ram_ranges(size) {
            let fo = FileOffset::new(file.try_clone().map_err(|e| mem_err("dup", e, false))?, offset);
            let len_us = usize::try_from(len).map_err(|_| Error::Config("guest memory too large".into()))?;
            let map = MmapRegion::from_file(fo, len_us)
                .map_err(|e| mem_err("mmap", io::Error::other(e.to_string()), hugepages))?;
            let region = GuestRegionMmap::new(map, GuestAddress(start))
                .ok_or_else(|| Error::Config("guest memory region wraps the address space".into()))?;
            regions.push(region);
            offset += len;
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| Error::Config(format!("guest memory layout: {e}")))?;
        if hugepages {
            populate(&mem)?;
        }
        Ok(GuestRam { mem, size, hugepages })
    }

    /// The memory, for reads and writes.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether huge pages back it.
    pub fn hugepages(&self) -> bool {
        self.hugepages
    }

    /// End of low RAM (below the MMIO hole).
    pub fn low_end(&self) -> u64 {
        ram_ranges(self.size)[0].1
    }

    /// Registers every region with KVM (slot per region).
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        self.set_slots(vm, 0)
    }

    /// Turns KVM's dirty-page log of every slot on or off (a migration's pre-copy): from
    /// then on [`GuestRam::kvm_dirty_pages`] reports the pages the vCPUs wrote.
    pub fn log_dirty(&self, vm: &VmFd, on: bool) -> Result<()> {
        self.set_slots(vm, if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }

    fn set_slots(&self, vm: &VmFd, flags: u32) -> Result<()> {
        for (slot, r) in self.mem.iter().enumerate() {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::Config(format!("guest memory region: {e}")))?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping lives as long as `self`, which the VM owner keeps alive
            // for as long as the VM exists; regions do not overlap.
            unsafe { vm.set_user_memory_region(region) }.map_err(Error::kvm(
                "KVM_SET_USER_MEMORY_REGION",
                "check the memory size against the host's limits (ulimit -l, memslots)",
            ))?;
        }
        Ok(())
    }

    /// The pages (guest-physical address / 4096) the vCPUs wrote since the last call
    /// (KVM_GET_DIRTY_LOG, which also clears the log); needs [`GuestRam::log_dirty`] on.
    pub fn kvm_dirty_pages(&self, vm: &VmFd) -> Result<Vec<u64>> {
        let mut pages = Vec::new();
        for (slot, r) in self.mem.iter().enumerate() {
            let bitmap = vm
                .get_dirty_log(slot as u32, r.len() as usize)
                .map_err(Error::kvm("KVM_GET_DIRTY_LOG", "was dirty logging turned on for this slot?"))?;
            let first = r.start_addr().0 / 4096;
            for (w, mut v) in bitmap.into_iter().enumerate() {
                while v != 0 {
                    pages.push(first + w as u64 * 64 + u64::from(v.trailing_zeros()));
                    v &= v - 1;
                }
            }
        }
        Ok(pages)
    }

    /// Makes `len` bytes at `gpa` read as zero. With 4 KiB pages the range's pages go back to
    /// the memfd (a hole punched: nothing written, nothing faulted in, and a page never
    /// touched costs nothing); huge pages are written with zeros.
    pub fn zero(&self, gpa: u64, len: usize) -> Result<()> {
        use std::os::fd::AsRawFd;
        let bad = || Error::Config(format!("{len} bytes at {gpa:#x} are not all guest RAM"));
        let (region, at) = self.mem.to_region_addr(GuestAddress(gpa)).ok_or_else(bad)?;
        if at.0 + len as u64 > region.len() {
            return Err(bad());
        }
        match region.file_offset() {
            Some(fo) if !self.hugepages && at.0 % 4096 == 0 && len % 4096 == 0 => {
                let off = fo.start() + at.0;
                // SAFETY: fallocate on our own memfd over a range inside the region's file
                // part; KEEP_SIZE, so the seals against shrinking and growing hold.
                let rc = unsafe {
                    libc::fallocate(
                        fo.file().as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off as libc::off_t,
                        len as libc::off_t,
                    )
                };
                if rc != 0 {
                    return Err(Error::io("punching zero pages into guest memory")(
                        io::Error::last_os_error(),
                    ));
                }
                Ok(())
            }
            _ => {
                let zeros = vec![0u8; len];
                vm_memory::Bytes::write_slice(&self.mem, &zeros, GuestAddress(gpa)).map_err(|_| bad())
            }
        }
    }

    /// Every page of guest RAM (guest-physical address / 4096), ascending.
    pub fn all_pages(&self) -> Vec<u64> {
        self.mem.iter().flat_map(|r| (r.start_addr().0 / 4096)..(r.start_addr().0 + r.len()) / 4096).collect()
    }

    /// The regions as a vhost-user memory table (file descriptors stay owned by `self`).
    pub fn vhost_regions(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.mem.iter().filter_map(|r| VhostUserMemoryRegionInfo::from_guest_region(r).ok()).collect()
    }

    /// Host address of guest-physical `gpa` with `len` bytes readable after it.
    pub fn host_addr(&self, gpa: u64, len: usize) -> Option<u64> {
        let ga = GuestAddress(gpa);
        let slice = self.mem.get_slice(ga, len).ok()?;
        Some(slice.ptr_guard().as_ptr() as u64)
    }
}

/// Touches every huge page now, so a short pool fails here with a clear error instead of a
/// SIGBUS in the middle of a run.
fn populate(mem: &GuestMemoryMmap) -> Result<()> {
    for r in mem.iter() {
        let host = r
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Config(format!("guest memory region: {e}")))?;
        // SAFETY: `host..host+len` is this region's live mapping.
        let rc = unsafe { libc::madvise(host.cast(), r.len() as usize, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            return Err(mem_err("reserving huge pages", io::Error::last_os_error(), true));
        }
    }
    Ok(())
}

fn mem_err(what: &str, source: io::Error, hugepages: bool) -> Error {
    let hint = if hugepages {
        ". Reserve 2 MiB pages first: echo N > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages \
         (N = memory / 2 MiB), or run without --hugepages"
    } else {
        ""
    };
    Error::Memory { what: what.to_owned(), source, hint }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn zero_punches_pages_back_to_zero_and_refuses_what_is_not_ram() {
        let ram = GuestRam::new(4 << 20, false).unwrap();
        ram.mem().write_slice(&[0xabu8; 3 * 4096], GuestAddress(0x10_0000)).unwrap();
        ram.zero(0x10_1000, 4096).unwrap();
        let mut got = vec![0u8; 3 * 4096];
        ram.mem().read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert!(got[..4096].iter().all(|&b| b == 0xab), "the page before is kept");
        assert!(got[4096..8192].iter().all(|&b| b == 0), "the punched page reads zero");
        assert!(got[8192..].iter().all(|&b| b == 0xab), "the page after is kept");
        // Unaligned: written with zeros instead.
        ram.zero(0x10_0010, 16).unwrap();
        ram.mem().read_slice(&mut got[..32], GuestAddress(0x10_0000)).unwrap();
        assert!(got[..16].iter().all(|&b| b == 0xab) && got[16..32].iter().all(|&b| b == 0));
        assert!(ram.zero((4 << 20) - 4096, 8192).is_err(), "past the end of RAM");
    }

    #[test]
    fn regions_are_file_backed_and_shared_with_the_memory_table() {
        let ram = GuestRam::new(8 << 20, false).unwrap();
        assert_eq!(ram.size(), 8 << 20);
        let regions = ram.vhost_regions();
        assert_eq!(regions.len(), 1);
        assert_eq!(regions[0].guest_phys_addr, 0);
        assert_eq!(regions[0].memory_size, 8 << 20);
        assert!(regions[0].mmap_handle >= 0);
        // Sealed against shrinking: the switch refuses memory that could be truncated under it.
        // SAFETY: F_GET_SEALS on the memfd `ram` owns.
        let seals = unsafe { libc::fcntl(regions[0].mmap_handle, libc::F_GET_SEALS) };
        assert_eq!(
            seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW),
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
        );
        ram.mem().write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
        // What the switch would see through the fd: the same bytes.
        let mut buf = [0u8; 4];
        // SAFETY: plain pread on a valid fd into a local buffer.
        let n = unsafe { libc::pread(regions[0].mmap_handle, buf.as_mut_ptr().cast(), 4, 0x1000) };
        assert_eq!(n, 4);
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        assert!(ram.host_addr(0x1000, 4).is_some());
        assert!(ram.host_addr((8 << 20) - 2, 4).is_none());
        assert!(GuestRam::new(4096, false).is_err());
    }
}
