//! Hung-thread detection: no switch thread stays blocked on a file a guest controls.
//!
//! A guest's call eventfd is shared with its frontend, which can make it blocking again
//! (`fcntl(F_SETFL, 0)`) and fill its counter, so a write to it may block; there is no
//! per-call non-blocking write for an eventfd. A thread that may write one owns a
//! [`Heartbeat`]: around each such write it stamps the time ([`guest_fd_call`], two relaxed
//! stores per interrupt, nothing per packet), and each loop turn it stores an iteration count.
//! One watchdog thread per switch reads them, and never takes a lock the datapath takes:
//!
//! * a thread in a guest-fd write for longer than [`FD_BOUND`] gets a thread-directed signal
//!   whose handler does nothing and is installed without `SA_RESTART`, so the write fails with
//!   `EINTR` (the caller then revokes that fd, see `VirtQueue::notify`);
//! * a polling thread whose iteration count stops for longer than [`STALL_AFTER`] while it is
//!   not asleep is reported once per episode and counted ([`Heartbeat::stalls`]).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::clock::{ticks, ticks_per_us};

/// Longest a write to a guest's eventfd may block before it is interrupted.
pub const FD_BOUND: Duration = Duration::from_millis(20);
/// How long a polling thread may go without a loop turn (awake) before it is reported.
pub const STALL_AFTER: Duration = Duration::from_secs(1);
/// How often the watchdog looks.
const PERIOD: Duration = Duration::from_millis(5);

/// What one thread publishes for the watchdog.
#[derive(Debug)]
pub struct Heartbeat {
    name: String,
    /// Whether a loop that stops turning is a stall (polling threads), or only guest-fd
    /// writes are watched (the control thread, which sleeps in its own poll).
    stall_check: bool,
    beats: AtomicU64,
    /// `ticks()` when the thread entered a guest-fd write; 0 when it is in none.
    in_guest_fd: AtomicU64,
    sleeping: AtomicBool,
    /// Kernel thread id (0 until the thread attached).
    tid: AtomicI32,
    stalls: AtomicU64,
    interrupts: AtomicU64,
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Heartbeat>>> = const { RefCell::new(None) };
}

impl Heartbeat {
    /// A heartbeat for the thread called `name`; `stall_check` as described on the field.
    pub fn new(name: String, stall_check: bool) -> Self {
        Heartbeat {
            name,
            stall_check,
            beats: AtomicU64::new(0),
            in_guest_fd: AtomicU64::new(0),
            sleeping: AtomicBool::new(false),
            tid: AtomicI32::new(0),
            stalls: AtomicU64::new(0),
            interrupts: AtomicU64::new(0),
        }
    }

    /// Makes this the calling thread's heartbeat: its guest-fd writes are watched from now on.
    pub fn attach(self: &Arc<Self>) {
        // SAFETY: gettid has no preconditions.
        self.tid.store(unsafe { libc::gettid() }, Relaxed);
        CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
    }

    /// One loop turn (a relaxed store of the thread's own counter).
    #[inline(always)]
    pub fn beat(&self, iterations: u64) {
        self.beats.store(iterations, Relaxed);
    }

    /// The thread goes to sleep on purpose (true) or is back (false).
    #[inline]
    pub fn sleeping(&self, on: bool) {
        self.sleeping.store(on, Relaxed);
    }

    /// Stall episodes reported so far.
    pub fn stalls(&self) -> u64 {
        self.stalls.load(Relaxed)
    }

    /// Guest-fd writes interrupted so far.
    pub fn interrupts(&self) -> u64 {
        self.interrupts.load(Relaxed)
    }
}

/// Runs `f`, a write to an fd a guest controls, where the watchdog interrupts it should it block
/// longer than [`FD_BOUND`] (it then returns `EINTR`). On a thread without a heartbeat it simply
/// runs `f`.
#[inline]
pub fn guest_fd_call<R>(f: impl FnOnce() -> R) -> R {
    CURRENT.with(|c| match &*c.borrow() {
        Some(hb) => {
            hb.in_guest_fd.store(ticks().max(1), Relaxed);
            let r = f();
            hb.in_guest_fd.store(0, Relaxed);
            r
        }
        None => f(),
    })
}

/// The signal the watchdog interrupts with (a real-time one nobody else in the process uses).
fn interrupt_signal() -> libc::c_int {
    libc::SIGRTMIN() + 7
}

extern "C" fn on_interrupt(_: libc::c_int) {}

/// Installs the do-nothing handler once, without `SA_RESTART`: a blocked write returns `EINTR`.
fn install_handler() -> std::io::Result<()> {
    static DONE: OnceLock<i32> = OnceLock::new();
    let rc = *DONE.get_or_init(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe (it does
        // nothing); sigemptyset initialises the mask we pass.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(interrupt_signal(), &sa, std::ptr::null_mut())
        }
    });
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::other("cannot install the watchdog's signal handler"))
    }
}

/// What the watchdog remembers of one thread.
struct Watched {
    hb: Weak<Heartbeat>,
    beats: u64,
    since: Instant,
    reported: bool,
}

/// Starts the watchdog thread over `threads`; it ends once all of them are gone.
pub fn spawn(threads: Vec<Weak<Heartbeat>>) -> std::io::Result<()> {
    install_handler()?;
    let now = Instant::now();
    let mut watched: Vec<Watched> =
        threads.into_iter().map(|hb| Watched { hb, beats: 0, since: now, reported: false }).collect();
    std::thread::Builder::new().name("vswitch-watchdog".into()).spawn(move || {
        let bound = FD_BOUND.as_micros() as u64 * ticks_per_us();
        loop {
            std::thread::sleep(PERIOD);
            watched.retain(|w| w.hb.strong_count() > 0);
            if watched.is_empty() {
                return;
            }
            for w in &mut watched {
                if let Some(hb) = w.hb.upgrade() {
                    check(w, &hb, bound);
                }
            }
        }
    })?;
    Ok(())
}

fn check(w: &mut Watched, hb: &Heartbeat, bound: u64) {
    let since = hb.in_guest_fd.load(Relaxed);
    let stuck_ticks = if since == 0 { 0 } else { ticks().wrapping_sub(since) };
    if stuck_ticks > bound && stuck_ticks < u64::MAX / 2 {
        interrupt(hb);
    }
    if !hb.stall_check {
        return;
    }
    let beats = hb.beats.load(Relaxed);
    if beats != w.beats || hb.sleeping.load(Relaxed) {
        w.beats = beats;
        w.since = Instant::now();
        w.reported = false;
    } else if !w.reported && w.since.elapsed() > STALL_AFTER {
        w.reported = true;
        hb.stalls.fetch_add(1, Relaxed);
        let doing = if since != 0 {
            format!("blocked writing a guest's eventfd for {} ms", stuck_ticks / ticks_per_us() / 1000)
        } else {
            "in a burst, or waiting for a queue lock another thread holds".into()
        };
        tracing::error!(
            thread = %hb.name,
            "polling thread has not turned its loop for {:?}: {doing}",
            w.since.elapsed()
        );
    }
}

/// Interrupts the thread's blocked write. Sent again each period until the write returns: a
/// signal that lands just before the write starts to wait is consumed without interrupting it.
fn interrupt(hb: &Heartbeat) {
    let tid = hb.tid.load(Relaxed);
    if tid == 0 {
        return;
    }
    // SAFETY: tgkill to a thread of this process with a signal whose handler is installed.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, interrupt_signal()) };
    if rc == 0 {
        hb.interrupts.fetch_add(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::FromRawFd;

    #[test]
    fn test_blocked_guest_fd_write_is_interrupted() {
        // A blocking eventfd with its counter one below the maximum: any write of 1 blocks.
        // SAFETY: plain syscall; the new fd is owned by the File.
        let mut f = unsafe { std::fs::File::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) };
        f.write_all(&0xffff_ffff_ffff_fffeu64.to_ne_bytes()).unwrap();
        let hb = Arc::new(Heartbeat::new("t".into(), false));
        spawn(vec![Arc::downgrade(&hb)]).unwrap();
        let t = Instant::now();
        let (hb2, f2) = (hb.clone(), f.try_clone().unwrap());
        let r = std::thread::spawn(move || {
            hb2.attach();
            guest_fd_call(|| (&f2).write(&1u64.to_ne_bytes()))
        })
        .join()
        .unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::Interrupted);
        assert!(t.elapsed() < Duration::from_secs(2), "interrupted after {:?}", t.elapsed());
        assert!(hb.interrupts() >= 1);
    }

    #[test]
    fn test_a_loop_that_stops_while_awake_is_one_stall_and_sleep_is_none() {
        let (stopped, asleep) =
            (Arc::new(Heartbeat::new("a".into(), true)), Arc::new(Heartbeat::new("b".into(), true)));
        asleep.sleeping(true);
        spawn(vec![Arc::downgrade(&stopped), Arc::downgrade(&asleep)]).unwrap();
        std::thread::sleep(STALL_AFTER + Duration::from_millis(300));
        assert_eq!(stopped.stalls(), 1);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(stopped.stalls(), 1, "reported once per episode");
        assert_eq!(asleep.stalls(), 0, "a sleeping thread is not stalled");
    }
}
