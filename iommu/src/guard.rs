//! Surviving SIGBUS in guest mappings whose file can lose pages.
//!
//! A region is mapped `MAP_SHARED | MAP_NORESERVE` from a file the frontend keeps. If the
//! frontend truncates that file, or punches a hole in a hugetlbfs file while the huge-page
//! pool is empty (`MAP_NORESERVE` reserved nothing for it), the next access to a lost page
//! raises SIGBUS, which kills the whole switch. A memfd sealed with `F_SEAL_SHRINK` cannot
//! lose pages (a hole punched in shmem reads back as zeros); every other file can.
//!
//! For those files the switch can opt in to a guard: such a mapping is registered here, and a
//! process-wide SIGBUS handler that finds the faulting address inside a registered mapping
//! maps an anonymous zero page over the lost page (the access then retries and succeeds),
//! marks the mapping faulted and returns. The owner polls [`faults`] and drops the port whose
//! region faulted. A SIGBUS anywhere else goes to the handler that was there before (Rust's
//! stack-overflow check), or kills the process as it always did.
//!
//! The registry is a fixed array of atomics: the handler neither allocates nor locks.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Most guarded mappings alive at once (all ports together). Each costs 32 bytes of static
/// memory; a hugetlbfs- or file-backed guest usually brings 1-8 regions.
pub const GUARD_SLOTS: usize = 4096;

const FREE: u8 = 0;
/// Being filled in or cleared: the handler skips it.
const BUSY: u8 = 1;
const LIVE: u8 = 2;

struct Slot {
    state: AtomicU8,
    faulted: AtomicBool,
    start: AtomicUsize,
    len: AtomicUsize,
    /// The mapping's page size (a huge page for hugetlbfs): the replacement covers one.
    page: AtomicUsize,
}

impl Slot {
    const fn new() -> Self {
        Slot {
            state: AtomicU8::new(FREE),
            faulted: AtomicBool::new(false),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            page: AtomicUsize::new(0),
        }
    }
}

static SLOTS: [Slot; GUARD_SLOTS] = [const { Slot::new() }; GUARD_SLOTS];
/// Lost pages replaced so far (all mappings).
static FAULTS: AtomicU64 = AtomicU64::new(0);
/// The SIGBUS action before ours, set once before ours is installed.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Every guarded slot is taken.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// A registered mapping; unregistered when dropped, which must happen before it is unmapped
/// (the handler would otherwise map a page into whatever reuses the addresses).
#[derive(Debug)]
pub struct Guard {
    slot: usize,
}

impl Guard {
    /// Registers `[start, start + len)`, a mapping of `page`-sized pages (a power of two;
    /// `start` aligned to it), and installs the SIGBUS handler if it is not yet.
    pub fn register(start: usize, len: usize, page: usize) -> Result<Guard, Full> {
        debug_assert!(page.is_power_of_two() && start.is_multiple_of(page));
        install()?;
        for (i, s) in SLOTS.iter().enumerate() {
            if s.state.compare_exchange(FREE, BUSY, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                s.start.store(start, Ordering::Relaxed);
                s.len.store(len, Ordering::Relaxed);
                s.page.store(page, Ordering::Relaxed);
                s.faulted.store(false, Ordering::Relaxed);
                s.state.store(LIVE, Ordering::Release);
                return Ok(Guard { slot: i });
            }
        }
        Err(Full)
    }

    /// Whether a page of this mapping was lost and replaced with zeros.
    pub fn faulted(&self) -> bool {
        SLOTS[self.slot].faulted.load(Ordering::Acquire)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &SLOTS[self.slot];
        s.state.store(BUSY, Ordering::Release);
        s.start.store(0, Ordering::Relaxed);
        s.len.store(0, Ordering::Relaxed);
        s.state.store(FREE, Ordering::Release);
    }
}

/// Lost pages replaced so far, process-wide: a change means some guarded mapping faulted.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Acquire)
}

/// The registered mapping holding `addr`: its slot index, page size.
fn lookup(addr: usize) -> Option<(usize, usize)> {
    SLOTS.iter().enumerate().find_map(|(i, s)| {
        if s.state.load(Ordering::Acquire) != LIVE {
            return None;
        }
        let off = addr.wrapping_sub(s.start.load(Ordering::Relaxed));
        (off < s.len.load(Ordering::Relaxed)).then(|| (i, s.page.load(Ordering::Relaxed)))
    })
}

fn install() -> Result<(), Full> {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    let ok = *INSTALLED.get_or_init(|| {
        // SAFETY: sigaction with zeroed, then filled-in structs; the previous action is stored
        // before ours can run, and the handler is async-signal-safe (atomics and mmap only).
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return false;
            }
            let _ = PREVIOUS.set(old);
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            // SA_ONSTACK: Rust's stack-overflow handler, which we chain to, expects the
            // alternate stack it set up for each thread.
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) == 0
        }
    });
    if ok {
        Ok(())
    } else {
        Err(Full)
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    if let Some((i, page)) = lookup(addr) {
        let at = addr & !(page - 1);
        // SAFETY: `[at, at + page)` lies inside a live guarded mapping (it is unregistered
        // before it is unmapped), so MAP_FIXED replaces only guest memory we own; mmap is
        // async-signal-safe.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            SLOTS[i].faulted.store(true, Ordering::Release);
            FAULTS.fetch_add(1, Ordering::AcqRel);
            return;
        }
    }
    chain(sig, info, ctx);
}

/// Not a guest page: do what would have happened without us.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.get().map(|a| (a.sa_sigaction, a.sa_flags));
    match prev {
        Some((h, flags)) if h != libc::SIG_DFL && h != libc::SIG_IGN => {
            if flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous action was installed as an SA_SIGINFO handler.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: the previous action was installed as a plain handler.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
        }
        _ => {
            // SAFETY: restoring the default action; returning re-executes the faulting access,
            // which then kills the process with SIGBUS as if no handler had been installed.
            unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_registered_range_is_found_and_cleared_on_drop() {
        let g = Guard::register(0x7f00_0000_0000, 0x20_0000, 0x1000).unwrap();
        assert_eq!(lookup(0x7f00_0000_0000), Some((g.slot, 0x1000)));
        assert_eq!(lookup(0x7f00_001f_ffff), Some((g.slot, 0x1000)));
        assert_eq!(lookup(0x7f00_0020_0000), None, "one past the end");
        assert_eq!(lookup(0x7eff_ffff_ffff), None, "one before the start");
        assert!(!g.faulted());
        let slot = g.slot;
        drop(g);
        assert_eq!(lookup(0x7f00_0000_0000), None);
        assert_eq!(SLOTS[slot].state.load(Ordering::Relaxed), FREE, "slot reusable");
    }

    #[test]
    fn test_lost_page_reads_zero_and_marks_only_its_mapping() {
        let page = 4096;
        // SAFETY: a memfd of 4 pages mapped shared, then truncated to one page: pages 1..3
        // are lost, as when a hostile frontend truncates guest memory.
        unsafe {
            let fd = libc::memfd_create(c"guard-test".as_ptr(), 0);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, 4 * page as i64), 0);
            let p = libc::mmap(
                std::ptr::null_mut(),
                4 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let p = p as *mut u8;
            p.add(2 * page).write_volatile(7);
            let g = Guard::register(p as usize, 4 * page, page).unwrap();
            let other = Guard::register(0x1000_0000, page, page).unwrap();
            let before = faults();
            assert_eq!(libc::ftruncate(fd, page as i64), 0);
            assert_eq!(p.add(2 * page + 5).read_volatile(), 0, "lost page reads back as zeros");
            p.add(3 * page).write_volatile(9);
            assert_eq!(p.add(3 * page).read_volatile(), 9, "replacement page is writable");
            assert!(g.faulted());
            assert!(!other.faulted());
            assert!(faults() >= before + 2);
            drop(g);
            libc::munmap(p.cast(), 4 * page);
            libc::close(fd);
        }
    }
}
