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
//!
//! The watchdog looks every [`PERIOD`] only while guest-fd writes happen (one in the last
//! [`AWAKE_AFTER_WRITE`]). Otherwise it dozes for [`DOZE`] (enough for stall checks) and the
//! first write to start wakes it ([`guest_fd_call`]: a store and a load of a flag, plus an
//! unpark only when it dozes). The switch's threads share CPUs with the polling threads (a
//! benchmark pins the whole process to one), and a look every 5 ms preempted a busy-polling
//! thread 200 times a second, a source of its latency tail.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::clock::{ticks, ticks_per_us};

/// Longest a write to a guest's eventfd may block before it is interrupted.
pub const FD_BOUND: Duration = Duration::from_millis(20);
/// How long a polling thread may go without a loop turn (awake) before it is reported.
pub const STALL_AFTER: Duration = Duration::from_secs(1);
/// How often the watchdog looks while guest-fd writes happen.
pub const PERIOD: Duration = Duration::from_millis(5);
/// How long it keeps looking every [`PERIOD`] after the last guest-fd write began.
pub const AWAKE_AFTER_WRITE: Duration = Duration::from_secs(1);
/// How long it sleeps when no thread writes to guest fds (woken by the first write).
pub const DOZE: Duration = Duration::from_millis(200);

/// One watchdog thread, as the threads it watches see it.
#[derive(Debug)]
struct Watcher {
    thread: std::thread::Thread,
    dozing: AtomicBool,
    /// Times it looked (woke up), for tests.
    looks: AtomicU64,
}

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
    /// `ticks()` when the last guest-fd write began (0: none yet).
    last_write: AtomicU64,
    /// The watchdog watching this thread, once it started.
    watcher: OnceLock<Arc<Watcher>>,
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
            last_write: AtomicU64::new(0),
            watcher: OnceLock::new(),
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

    /// Times the watchdog watching this thread has looked so far (0 before it started).
    pub fn watchdog_looks(&self) -> u64 {
        self.watcher.get().map_or(0, |w| w.looks.load(Relaxed))
    }
}

/// Runs `f`, a write to an fd a guest controls, where the watchdog interrupts it should it block
/// longer than [`FD_BOUND`] (it then returns `EINTR`). On a thread without a heartbeat it simply
/// runs `f`.
#[inline]
pub fn guest_fd_call<R>(f: impl FnOnce() -> R) -> R {
    CURRENT.with(|c| match &*c.borrow() {
        Some(hb) => {
            let now = ticks().max(1);
            hb.last_write.store(now, Relaxed);
            // SeqCst store, then SeqCst load of `dozing`: either the watchdog, about to doze,
            // sees this write in progress, or this sees it dozing and wakes it.
            hb.in_guest_fd.store(now, SeqCst);
            if let Some(w) = hb.watcher.get() {
                if w.dozing.load(SeqCst) {
                    w.thread.unpark();
                }
            }
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
    let weak: Vec<Weak<Heartbeat>> = watched.iter().map(|w| w.hb.clone()).collect();
    let (tx, rx) = std::sync::mpsc::channel::<Arc<Watcher>>();
    let handle = std::thread::Builder::new().name("vswitch-watchdog".into()).spawn(move || {
        let Ok(me) = rx.recv() else { return };
        let bound = FD_BOUND.as_micros() as u64 * ticks_per_us();
        let awake = AWAKE_AFTER_WRITE.as_micros() as u64 * ticks_per_us();
        loop {
            watched.retain(|w| w.hb.strong_count() > 0);
            if watched.is_empty() {
                return;
            }
            me.looks.fetch_add(1, Relaxed);
            let mut writing = false;
            for w in &mut watched {
                if let Some(hb) = w.hb.upgrade() {
                    check(w, &hb, bound);
                    let last = hb.last_write.load(Relaxed);
                    writing |= last != 0 && ticks().wrapping_sub(last) < awake;
                }
            }
            if writing {
                std::thread::sleep(PERIOD);
                continue;
            }
            me.dozing.store(true, SeqCst);
            let in_write =
                watched.iter().any(|w| w.hb.upgrade().is_some_and(|hb| hb.in_guest_fd.load(SeqCst) != 0));
            if !in_write {
                std::thread::park_timeout(DOZE);
            }
            me.dozing.store(false, SeqCst);
        }
    })?;
    let me = Arc::new(Watcher {
        thread: handle.thread().clone(),
        dozing: AtomicBool::new(false),
        looks: AtomicU64::new(0),
    });
    for hb in weak.iter().filter_map(Weak::upgrade) {
        let _ = hb.watcher.set(me.clone());
    }
    let _ = tx.send(me);
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
        // No write yet: the watchdog dozes, and the write below must wake it.
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        let (hb2, f2) = (hb.clone(), f.try_clone().unwrap());
        let r = std::thread::spawn(move || {
            hb2.attach();
            guest_fd_call(|| (&f2).write(&1u64.to_ne_bytes()))
        })
        .join()
        .unwrap();
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::Interrupted);
        // FD_BOUND plus a period or two, not a doze.
        assert!(t.elapsed() < DOZE, "interrupted after {:?}", t.elapsed());
        assert!(hb.interrupts() >= 1);
    }

    #[test]
    fn test_the_watchdog_dozes_without_guest_fd_writes_and_looks_often_with_them() {
        let hb = Arc::new(Heartbeat::new("busy".into(), true));
        spawn(vec![Arc::downgrade(&hb)]).unwrap();
        let (hb2, stop) = (hb.clone(), Arc::new(AtomicBool::new(false)));
        let stop2 = stop.clone();
        let t = std::thread::spawn(move || {
            hb2.attach();
            let mut i = 0;
            while !stop2.load(Relaxed) {
                i += 1;
                hb2.beat(i);
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        let l0 = hb.watchdog_looks();
        std::thread::sleep(Duration::from_millis(600));
        let dozing = hb.watchdog_looks() - l0;
        assert!(dozing <= 5, "{dozing} looks in 600 ms without writes (a look per {DOZE:?} expected)");
        // Writes (to an fd that never blocks): it looks every PERIOD again.
        let f = std::fs::File::open("/dev/null").unwrap();
        let (hb3, l1) = (hb.clone(), hb.watchdog_looks());
        std::thread::spawn(move || {
            hb3.attach();
            for _ in 0..30 {
                let _ = guest_fd_call(|| f.metadata().map(|_| ()));
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .join()
        .unwrap();
        let awake = hb.watchdog_looks() - l1;
        assert!(awake >= 20, "{awake} looks in 300 ms of writes ({PERIOD:?} period expected)");
        stop.store(true, Relaxed);
        t.join().unwrap();
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
