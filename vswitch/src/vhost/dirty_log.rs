//! The dirty log of live migration (vhost-user `SET_LOG_BASE`, `VHOST_F_LOG_ALL`): one bit per
//! 4 KiB page of guest physical memory, in shared memory the frontend hands over and reads
//! while it copies the guest's memory to the destination. A page the switch writes (a received
//! frame, a used ring entry) must have its bit set before the frontend's next pass, or the
//! destination keeps the stale page.
//!
//! ```text
//!  page p (guest physical address / 4096) ──▶ byte p / 8, bit p % 8   (set with an atomic OR)
//! ```
//!
//! The layout is QEMU's (`vhost_log_chunk_t`, 64-bit words in little-endian order: bit p % 64 of
//! word p / 64 is bit p % 8 of byte p / 8), so a byte-wide OR sets the same bit the frontend's
//! word-wide reader sees.
//!
//! The region is guest-supplied memory like any other: its size and offset are checked against
//! the file, and the file must be a memfd sealed against shrinking (QEMU seals its log memfd), so
//! the log cannot lose pages under the switch (a SIGBUS). A page beyond the log is not marked
//! and is counted: the frontend sized the log for the memory it has.
//!
//! Who marks what (each after the write, so a pass of the frontend that copied the page
//! before the write sees the mark and copies it again):
//! - the copy pass of a delivery (`pmd::burst::fill`, a `const LOG` variant chosen per pass)
//!   and the delivery of frames parked for an IOTLB miss: the bytes written into receive
//!   buffers;
//! - every publish of used entries and every change of the kick suppression: the whole used
//!   ring (`VirtQueue::publish`, `VirtQueue::set_kicks`), found by where it is mapped, so the
//!   frontend's `log_guest_addr` (an IOVA behind a vIOMMU) is not trusted or needed;
//! - a queue plugged into a device is not: the control thread unplugs it before logging
//!   starts (`Control::migration_starts`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Bytes of guest memory one bit stands for.
pub const LOG_PAGE: u64 = 4096;
/// The largest log taken: 4 GiB covers 128 TiB of guest memory.
pub const MAX_LOG_BYTES: u64 = 1 << 32;

/// Why a log region was refused.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A size or offset that cannot be a log of this file.
    #[error("dirty log of {size} bytes at offset {offset}: {why}")]
    Bounds {
        /// The region's size, as sent.
        size: u64,
        /// Its offset in the file, as sent.
        offset: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A file that could lose pages.
    #[error(
        "dirty log file is a {kind}, and {why}: the switch only maps a memfd sealed with \
         F_SEAL_SHRINK for it (QEMU's log is one)"
    )]
    Unsealed {
        /// What the file is.
        kind: &'static str,
        /// Why that can lose pages.
        why: &'static str,
    },
    /// The kernel refused to describe or map the file.
    #[error("dirty log: {what} failed: {source}")]
    Io {
        /// The call.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
}

/// A mapped dirty log.
pub struct DirtyLog {
    /// The mapping (from the page the log starts in).
    map: *mut libc::c_void,
    map_len: usize,
    /// The log's first byte, inside the mapping.
    bits: *const AtomicU8,
    len: u64,
    /// Marks of pages past the log's end (not set).
    beyond: AtomicU64,
}

// SAFETY: the mapping is only touched through atomic byte operations, from any thread.
unsafe impl Send for DirtyLog {}
// SAFETY: as above.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Maps the `size` bytes at `offset` of `file` (a `SET_LOG_BASE`'s region), after checking
    /// them against the file.
    pub fn map(file: &File, size: u64, offset: u64) -> Result<DirtyLog, LogError> {
        let bounds = |why| LogError::Bounds { size, offset, why };
        if size == 0 {
            return Err(bounds("an empty log"));
        }
        if size > MAX_LOG_BYTES {
            return Err(bounds("larger than the 4 GiB a log of 128 TiB of guest memory needs"));
        }
        let end = offset.checked_add(size).ok_or_else(|| bounds("offset and size overflow"))?;
        let backing = iommu::Backing::of(file).map_err(|source| LogError::Io { what: "fstatfs", source })?;
        if backing.can_lose_pages() {
            return Err(LogError::Unsealed { kind: backing.name(), why: backing.why() });
        }
        let flen = file.metadata().map_err(|source| LogError::Io { what: "fstat", source })?.len();
        if end > flen {
            return Err(bounds("it ends past the end of the file"));
        }
        let page = 4096u64;
        let start = offset / page * page;
        let map_len = (end - start) as usize;
        // SAFETY: a new shared mapping of a range the file holds (checked above, and sealed
        // against shrinking); only this struct uses it, until drop.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                start as libc::off_t,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(LogError::Io { what: "mmap", source: io::Error::last_os_error() });
        }
        // SAFETY: `offset - start` is less than a page, inside the mapping.
        let bits = unsafe { map.cast::<u8>().add((offset - start) as usize) } as *const AtomicU8;
        Ok(DirtyLog { map, map_len, bits, len: size, beyond: AtomicU64::new(0) })
    }

    /// Marks every page that `len` bytes at guest physical address `gpa` touch.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let byte = page / 8;
            if byte >= self.len {
                self.beyond.fetch_add(1 + last - page, Ordering::Relaxed);
                return;
            }
            // SAFETY: `byte` is inside the log (checked), which the mapping holds.
            // Release: the bytes written into the page before the mark stay before it (the
            // frontend reads the log with an atomic exchange, then copies the page). On x86-64
            // this is the same `lock or` as a relaxed OR.
            unsafe { &*self.bits.add(byte as usize) }.fetch_or(1 << (page % 8), Ordering::Release);
        }
    }

    /// Marks the pages under `len` bytes the switch wrote at host address `host` in guest memory
    /// `space` (a grant's bytes: the datapath knows host addresses). The guest physical address
    /// is the region's (a scan of at most 8 regions), so this holds behind a vIOMMU too, where
    /// the frontend's addresses are IOVAs but the log is by guest physical address. Bytes in no
    /// region of `space` mark nothing and are counted with [`DirtyLog::beyond`].
    #[inline]
    pub fn mark_host(&self, space: &iommu::AddressSpace, host: *const u8, len: u64) {
        let (mut at, end) = (host as u64, (host as u64).saturating_add(len));
        while at < end {
            let hit = space.regions().iter().find_map(|r| {
                let off = at.checked_sub(r.host() as u64)?;
                (off < r.size()).then(|| (r.gpa() + off, (r.size() - off).min(end - at)))
            });
            let Some((gpa, n)) = hit else {
                self.beyond.fetch_add(1, Ordering::Relaxed);
                return;
            };
            self.mark(gpa, n);
            at += n;
        }
    }

    /// The log's size in bytes (it covers `8 * LOG_PAGE` bytes of guest memory per byte).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the log is empty (never: an empty one is refused).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Page marks that fell past the log's end.
    pub fn beyond(&self) -> u64 {
        self.beyond.load(Ordering::Relaxed)
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: our own mapping, not used after this.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn memfd(len: u64, seal: bool) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"log".as_ptr(), libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new fd we own.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        if seal {
            // SAFETY: fcntl on our own fd.
            let r = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) };
            assert_eq!(r, 0);
        }
        f
    }

    fn bytes(f: &File, offset: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        f.read_exact_at(&mut b, offset).unwrap();
        b
    }

    #[test]
    fn a_page_sets_bit_page_mod_8_of_byte_page_div_8_as_qemus_words_read_it() {
        let f = memfd(8192, true);
        let log = DirtyLog::map(&f, 64, 4096 + 8).unwrap();
        log.mark(0, 1); // page 0
        log.mark(9 * LOG_PAGE + 100, 10); // page 9
        log.mark(63 * LOG_PAGE, LOG_PAGE); // page 63, exactly
        let b = bytes(&f, 4096 + 8, 64);
        assert_eq!(&b[..8], &[0b1, 0b10, 0, 0, 0, 0, 0, 0b1000_0000]);
        // QEMU's reader: bit p % 64 of little-endian word p / 64.
        let word = u64::from_le_bytes(b[..8].try_into().unwrap());
        assert_eq!(word, 1 | 1 << 9 | 1 << 63);
        assert!(b[8..].iter().all(|&x| x == 0));
        // Nothing before the log's offset was touched.
        assert!(bytes(&f, 0, 4096 + 8).iter().all(|&x| x == 0));
    }

    #[test]
    fn a_write_across_pages_marks_each_and_nothing_else() {
        let f = memfd(4096, true);
        let log = DirtyLog::map(&f, 16, 0).unwrap();
        // 64 KiB + 2 bytes starting 1 byte before page 3: pages 2..=19.
        log.mark(3 * LOG_PAGE - 1, 65538);
        let b = bytes(&f, 0, 16);
        let word = u32::from_le_bytes(b[..4].try_into().unwrap());
        assert_eq!(word, ((1u32 << 20) - 1) & !0b11);
        log.mark(5 * LOG_PAGE, 0);
        assert_eq!(bytes(&f, 0, 16), b, "an empty write marks nothing");
        assert_eq!(log.beyond(), 0);
    }

    #[test]
    fn pages_past_the_log_are_counted_not_written_even_at_the_top_of_the_address_space() {
        let f = memfd(8192, true);
        // One byte: pages 0..=7.
        let log = DirtyLog::map(&f, 1, 0).unwrap();
        log.mark(6 * LOG_PAGE, 3 * LOG_PAGE); // pages 6, 7 in; 8 out
        assert_eq!(bytes(&f, 0, 2), [0b1100_0000, 0]);
        assert_eq!(log.beyond(), 1);
        log.mark(u64::MAX - 10, 100);
        log.mark(u64::MAX / 2, u64::MAX);
        assert_eq!(bytes(&f, 0, 2), [0b1100_0000, 0]);
        assert!(log.beyond() > 1);
    }

    #[test]
    fn hostile_regions_are_refused_with_what_is_wrong() {
        let sealed = memfd(4096, true);
        let msg = |r: Result<DirtyLog, LogError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg(DirtyLog::map(&sealed, 0, 0)).contains("an empty log"));
        assert!(msg(DirtyLog::map(&sealed, 4097, 0)).contains("past the end of the file"));
        assert!(msg(DirtyLog::map(&sealed, 8, 4090)).contains("past the end of the file"));
        assert!(msg(DirtyLog::map(&sealed, 8, u64::MAX - 3)).contains("overflow"));
        assert!(msg(DirtyLog::map(&sealed, MAX_LOG_BYTES + 1, 0)).contains("larger than"));
        let unsealed = memfd(4096, false);
        let e = msg(DirtyLog::map(&unsealed, 64, 0));
        assert!(e.contains("F_SEAL_SHRINK"), "{e}");
        let plain = plain_file();
        let e = msg(DirtyLog::map(&plain, 64, 0));
        assert!(e.contains("F_SEAL_SHRINK"), "{e}");
    }

    fn plain_file() -> File {
        let p = std::path::Path::new("/var/tmp").join(format!("vswitch-log-test-{}", std::process::id()));
        let f =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        f.set_len(4096).unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }

    #[test]
    fn a_write_by_host_address_marks_its_guest_physical_pages_in_the_right_region() {
        // Two regions, not in host order: guest 0x10_0000 (16 pages) and 0 (16 pages).
        let hi = iommu::Region::anonymous(0x10_0000, 16 * LOG_PAGE, 0x7000_0000).unwrap();
        let lo = iommu::Region::anonymous(0, 16 * LOG_PAGE, 0x6000_0000).unwrap();
        let (hi_host, lo_host) = (hi.host(), lo.host());
        let space = iommu::AddressSpace::new(vec![hi, lo]).unwrap();
        let f = memfd(4096, true);
        let log = DirtyLog::map(&f, 64, 0).unwrap();
        // 2 bytes across the boundary of pages 3 and 4 of the high region: guest pages 259, 260.
        // SAFETY: inside the region's 16 pages.
        log.mark_host(&space, unsafe { hi_host.add(4 * LOG_PAGE as usize - 1) }, 2);
        // The low region's page 1.
        // SAFETY: inside the region's 16 pages.
        log.mark_host(&space, unsafe { lo_host.add(LOG_PAGE as usize + 7) }, 64);
        let b = bytes(&f, 0, 64);
        let mut want = [0u8; 64];
        want[0] = 0b10;
        want[259 / 8] |= 1 << (259 % 8);
        want[260 / 8] |= 1 << (260 % 8);
        assert_eq!(b, want);
        // An address in no region marks nothing and is counted.
        let stray = [0u8; 8];
        log.mark_host(&space, stray.as_ptr(), 8);
        assert_eq!(bytes(&f, 0, 64), want);
        assert_eq!(log.beyond(), 1);
    }

    #[test]
    fn marks_from_several_threads_all_land() {
        let f = memfd(4096, true);
        let log = std::sync::Arc::new(DirtyLog::map(&f, 512, 0).unwrap());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    // Thread t marks every page p with p % 4 == t: the same bytes as the others.
                    for p in (t..4096).step_by(4) {
                        log.mark(p * LOG_PAGE, 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(bytes(&f, 0, 512).iter().all(|&x| x == 0xff));
    }
}
