//! Live migration from the frontend's side: the dirty log a frontend hands its backend
//! (vhost-user `SET_LOG_BASE` with a sealed memfd, `VHOST_F_LOG_ALL`, each ring's log address),
//! read and cleared word by word the way QEMU's pre-copy reads it, and `SEND_RARP`.
//!
//! ```text
//!  start_migration_log ─▶ SET_LOG_BASE (memfd) ─▶ SET_FEATURES | LOG_ALL ─▶ SET_VRING_ADDR + F_LOG each
//!  take_dirty_pages    ─▶ swap each 64-bit word of the log with 0: the pages set since the last take
//!  stop_migration_log  ─▶ SET_FEATURES without LOG_ALL ─▶ SET_VRING_ADDR each
//! ```

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// Guest memory one bit of the log stands for.
pub const LOG_PAGE: u64 = 4096;

/// A dirty log shared with the backend: one bit per 4 KiB page of guest-physical memory.
pub struct DirtyLog {
    file: File,
    map: *mut AtomicU64,
    words: usize,
}

// SAFETY: the mapping is only touched through atomics.
unsafe impl Send for DirtyLog {}

impl DirtyLog {
    /// A log covering guest-physical addresses `0..covering`, in a memfd sealed against
    /// shrinking and growing (as QEMU's `vhost-log` memfd is).
    pub fn new(covering: u64) -> io::Result<DirtyLog> {
        let pages = covering.div_ceil(LOG_PAGE);
        let words = pages.div_ceil(64).max(1) as usize;
        let bytes = words * 8;
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd =
            unsafe { libc::memfd_create(c"vhost-log".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(bytes as u64)?;
        // SAFETY: fcntl on our own fd.
        if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of the whole (sealed) file, owned by this struct.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(DirtyLog { file, map: map.cast(), words })
    }

    /// The log's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.words as u64 * 8
    }

    /// The memfd (sent with SET_LOG_BASE).
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// The pages (guest-physical address / 4096) marked since the last call, clearing them:
    /// each word is swapped with zero, so a mark the backend makes meanwhile is either in
    /// this answer or in the next.
    pub fn take_dirty_pages(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        for w in 0..self.words {
            // SAFETY: w < words, inside the mapping.
            let mut v = unsafe { &*self.map.add(w) }.swap(0, Ordering::AcqRel);
            while v != 0 {
                let b = v.trailing_zeros() as u64;
                pages.push(w as u64 * 64 + b);
                v &= v - 1;
            }
        }
        pages
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: our own mapping, not used after this.
        unsafe { libc::munmap(self.map.cast(), self.words * 8) };
    }
}
