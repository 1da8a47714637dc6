//! Hostile kick, call and err files (audit F1, F13, F16): no thread of the switch blocks on
//! anything a guest controls. Port `a` is the hostile guest; after each attack the liveness
//! probe checks that `b` and `c` still exchange 100 frames each way within 2 s, that
//! `sw.ports()` answers within 1 s and that dropping the switch returns within 5 s.
//!
//! On a switch that hangs, the probe fails instead of hanging the test: every wait is bounded,
//! and a stuck switch is leaked rather than dropped.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e_tests::{
    connect_default, frame_of_size, init_log, mac, port_info, start_switch, switch_config, wait_until,
    Scratch, BCAST,
};
use vswitch::{Switch, SwitchConfig};
use vswitch_bench::frontend::{Frontend, VringFile};

/// One below an eventfd counter's maximum: any further write of 1 blocks (or fails EAGAIN).
const FULL: u64 = 0xffff_ffff_ffff_fffe;

fn eventfd(flags: i32) -> File {
    // SAFETY: plain syscall; the new fd is owned by the File.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | flags) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    unsafe { File::from_raw_fd(fd) }
}

/// A blocking eventfd whose counter is full: a blocking write to it never returns.
fn full_blocking_eventfd() -> File {
    let mut f = eventfd(0);
    f.write_all(&FULL.to_ne_bytes()).unwrap();
    f
}

fn set_blocking(f: &File) {
    // SAFETY: fcntl on an fd we own, integer arguments only.
    assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, 0) }, 0);
}

fn is_nonblocking(f: &File) -> bool {
    // SAFETY: as above.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) & libc::O_NONBLOCK != 0 }
}

/// Runs `f` on a thread and gives its result if it finished within `limit` (the thread is
/// leaked otherwise).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let r = rx.recv_timeout(limit).ok();
    if r.is_some() {
        let _ = h.join();
    }
    r
}

/// Sends `n` frames `from` -> `to` and returns how many arrived within `limit`.
fn exchange_within(
    from: &mut Frontend,
    to: &mut Frontend,
    src: u8,
    dst: u8,
    n: usize,
    limit: Duration,
) -> usize {
    let t = Instant::now();
    let mut got = 0;
    for i in 0..n {
        let f = frame_of_size(mac(dst), mac(src), None, 60 + i % 100, i as u64);
        while !from.send(0, &f) {
            if t.elapsed() > limit {
                return got;
            }
            from.reclaim_tx(0);
            std::thread::sleep(Duration::from_micros(200));
        }
        got += to.poll_rx(0, |_| {});
    }
    while got < n && t.elapsed() < limit {
        got += to.recv_frames(0, n - got, limit.saturating_sub(t.elapsed())).len();
    }
    got
}

/// The liveness probe. Leaks `sw` (never drops it) once the probe has failed, so a hung switch
/// fails the test instead of hanging it.
fn assert_alive(sw: Switch, b: &mut Frontend, c: &mut Frontend) {
    let limit = Duration::from_secs(2);
    let bc = exchange_within(b, c, 0xb, 0xc, 100, limit);
    let cb = exchange_within(c, b, 0xc, 0xb, 100, limit);
    if bc != 100 || cb != 100 {
        std::mem::forget(sw);
        panic!("b -> c: {bc} of 100 frames, c -> b: {cb} of 100 within {limit:?}: the datapath is stuck");
    }
    let sw = Arc::new(sw);
    let s = sw.clone();
    if !matches!(within(Duration::from_secs(1), move || s.ports().is_ok()), Some(true)) {
        std::mem::forget(sw);
        panic!("ports() did not answer within 1 s: the control thread is stuck");
    }
    let sw = Arc::into_inner(sw).expect("the probe's clone was dropped");
    assert!(within(Duration::from_secs(5), move || drop(sw)).is_some(), "dropping the switch took over 5 s");
}

/// A switch (adaptive polling, one polling thread) with ports a, b and c, all connected.
fn setup(name: &str) -> (Scratch, Switch, Frontend, Frontend, Frontend) {
    let dir = Scratch::new(name);
    let sw = start_switch(&dir, &["a", "b", "c"]);
    let (a, b, c) = (connect_default(&dir, "a"), connect_default(&dir, "b"), connect_default(&dir, "c"));
    (dir, sw, a, b, c)
}

/// `a` sends one frame (its TX completion interrupts it), then `b` broadcasts (delivering to
/// `a`'s receive queue interrupts it): both interrupts go to `a`'s call files.
fn make_switch_interrupt_a(a: &mut Frontend, b: &mut Frontend) {
    a.set_interrupts(0, true);
    assert!(a.send(0, &frame_of_size(mac(0xb), mac(0xa), None, 60, 1)));
    assert!(b.send(0, &frame_of_size(BCAST, mac(0xb), None, 60, 2)));
}

#[test]
fn test_full_blocking_call_eventfd_does_not_stall_the_switch() {
    let (_dir, sw, mut a, mut b, mut c) = setup("fds-call");
    let (rx_call, tx_call) = (full_blocking_eventfd(), full_blocking_eventfd());
    a.set_vring_file(0, VringFile::Call, &rx_call).unwrap();
    a.set_vring_file(1, VringFile::Call, &tx_call).unwrap();
    make_switch_interrupt_a(&mut a, &mut b);
    assert!(wait_until(Duration::from_secs(1), || a.tx_completed(0) == 1), "a's frame was taken");
    std::thread::sleep(Duration::from_millis(50));
    // The switch made the lazy frontend's eventfds non-blocking: a full counter is EAGAIN.
    assert!(is_nonblocking(&rx_call) && is_nonblocking(&tx_call));
    assert_eq!(port_info(&sw, "a").device.calls_revoked, 0, "EAGAIN is a delivered interrupt");
    assert_alive(sw, &mut b, &mut c);
}

#[test]
fn test_call_eventfd_made_blocking_again_is_interrupted_revoked_and_its_frontend_disconnected() {
    let (_dir, sw, mut a, mut b, mut c) = setup("fds-call-again");
    let calls = Arc::new([full_blocking_eventfd(), full_blocking_eventfd()]);
    a.set_vring_file(0, VringFile::Call, &calls[0]).unwrap();
    a.set_vring_file(1, VringFile::Call, &calls[1]).unwrap();
    // The frontend shares the file description, so it can undo the switch's O_NONBLOCK.
    let stop = Arc::new(AtomicBool::new(false));
    let undo = {
        let (calls, stop) = (calls.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                calls.iter().for_each(set_blocking);
                std::thread::sleep(Duration::from_micros(100));
            }
        })
    };
    // The undoing thread must have run before the interrupts (on a loaded machine 5 ms were
    // not always enough, and a write to a non-blocking fd never blocks).
    assert!(wait_until(Duration::from_secs(2), || calls.iter().all(|c| !is_nonblocking(c))));
    make_switch_interrupt_a(&mut a, &mut b);
    // Asked from another thread: a stuck control thread fails the test instead of hanging it.
    let sw = Arc::new(sw);
    let s = sw.clone();
    let gone = within(Duration::from_secs(4), move || {
        wait_until(Duration::from_secs(3), || !port_info(&s, "a").connected)
    });
    stop.store(true, Ordering::Relaxed);
    undo.join().unwrap();
    if gone != Some(true) {
        std::mem::forget(sw);
        panic!("port a was not disconnected within 3 s ({gone:?})");
    }
    let sw = Arc::into_inner(sw).expect("the waiter's clone was dropped");
    assert!(port_info(&sw, "a").device.calls_revoked >= 1);
    let st = sw.stats().unwrap();
    assert!(st.pmds[0].fd_interrupts >= 1, "the watchdog interrupted the write: {:?}", st.pmds[0]);
    assert_alive(sw, &mut b, &mut c);
}

#[test]
fn test_kick_call_and_err_files_that_are_not_eventfds_are_refused() {
    let (dir, sw, mut a, mut b, _c) = setup("fds-not-eventfd");
    let mut p = [0i32; 2];
    // SAFETY: p has room for two fds.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: fresh fds, owned by the Files from here on.
    let (pr, pw) = unsafe { (File::from_raw_fd(p[0]), File::from_raw_fd(p[1])) };
    let regular = File::create(dir.path("regular")).unwrap();
    let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let files: [(&str, &dyn AsRawFd); 4] =
        [("pipe read end", &pr), ("pipe write end", &pw), ("regular file", &regular), ("socket", &sock)];
    let mut refused = 0;
    for (what, f) in files {
        for (vring, which) in
            [(1, VringFile::Kick), (0, VringFile::Call), (1, VringFile::Call), (0, VringFile::Err)]
        {
            let r = a.set_vring_file(vring, which, &f.as_raw_fd());
            assert!(r.is_err(), "a {what} as the {which:?} file of vring {vring} was accepted");
            refused += 1;
        }
    }
    let info = port_info(&sw, "a");
    assert!(info.connected, "refusals keep the connection");
    assert_eq!(info.device.protocol_errors, refused);
    // The queues still run with their first (eventfd) files.
    assert_eq!(exchange_within(&mut a, &mut b, 0xa, 0xb, 20, Duration::from_secs(2)), 20);
    assert_eq!(exchange_within(&mut b, &mut a, 0xb, 0xa, 20, Duration::from_secs(2)), 20);
}

/// Thread ids of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> Vec<String> {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap().flatten();
    let named = |t: &std::fs::DirEntry| {
        std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
    };
    tasks.filter(named).map(|t| t.file_name().to_string_lossy().into_owned()).collect()
}

/// Moves the calling thread off CPU 0 (if there is another CPU).
fn pin_away_from_cpu0() {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it; 0 names this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 1..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The system call thread `tid` of this process is blocked in, if any.
fn syscall_of(tid: &str) -> Option<libc::c_long> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    s.split(' ').next()?.parse().ok()
}

#[test]
fn test_kick_eventfd_read_back_by_its_frontend_does_not_block_the_polling_thread() {
    // The polling thread on CPU 0, this thread on another: a kick then wakes it on its own
    // CPU instead of preempting us, and the two reads really race.
    let dir = Scratch::new("fds-kick-race");
    init_log();
    let sw =
        Switch::start(SwitchConfig { pmd_cores: vec![0], ..switch_config(&dir, &["a", "b", "c"]) }).unwrap();
    let (mut a, mut b, mut c) =
        (connect_default(&dir, "a"), connect_default(&dir, "b"), connect_default(&dir, "c"));
    pin_away_from_cpu0();
    let kick = Arc::new(eventfd(0));
    a.set_vring_file(1, VringFile::Kick, &*kick).unwrap();
    set_blocking(&kick);
    // The frontend kicks and at once reads its own kick back: a switch that reads kicks after
    // epoll said "readable" finds the counter at 0 and blocks.
    let pmds = threads_named("pmd");
    assert!(!pmds.is_empty());
    let any_in = |nrs: &[libc::c_long]| pmds.iter().any(|t| syscall_of(t).is_some_and(|n| nrs.contains(&n)));
    let asleep = [libc::SYS_epoll_wait, libc::SYS_epoll_pwait, libc::SYS_epoll_pwait2];
    let t = Instant::now();
    let mut buf = [0u8; 8];
    // How long after kicking to read back: shortened while the switch reads first (EAGAIN),
    // lengthened while we do, so it settles where the switch's read follows its epoll_wait.
    let (mut lag_ns, mut rng) = (5_000u64, 0x9e37_79b9_7f4a_7c15u64);
    while t.elapsed() < Duration::from_secs(4) {
        // Kick only a polling thread asleep in epoll (bounded wait), so each kick is a race.
        let w = Instant::now();
        while !any_in(&asleep) && w.elapsed() < Duration::from_millis(2) {}
        let _ = (&*kick).write(&1u64.to_ne_bytes());
        // Jitter of up to 4 µs around it (xorshift), in case it settled where it cannot win.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let w = Instant::now();
        while w.elapsed() < Duration::from_nanos(lag_ns + rng % 4_000) {
            std::hint::spin_loop();
        }
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: 8 };
        // Never blocks the test itself (RWF_NOWAIT), whoever read the counter first.
        // SAFETY: a valid iovec over a local buffer.
        let ours = unsafe { libc::preadv2(kick.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) } == 8;
        lag_ns = if ours { (lag_ns + 250).min(100_000) } else { lag_ns.saturating_sub(250) };
        if any_in(&[libc::SYS_read]) {
            // Won the race: a polling thread waits for a kick that will not come.
            break;
        }
    }
    assert_alive(sw, &mut b, &mut c);
}

#[test]
fn test_broken_tx_queue_lets_an_adaptive_polling_thread_sleep() {
    let (_dir, sw, mut a, _b, _c) = setup("fds-broken-sleep");
    // Avail index more than a ring ahead of what the switch took: the queue is broken.
    a.store_tx_avail_idx_raw(0, a.ring_size() + 1);
    std::thread::sleep(Duration::from_millis(300));
    let sleeps = |sw: &Switch| sw.stats().unwrap().pmds[0].sleeps;
    let before = sleeps(&sw);
    std::thread::sleep(Duration::from_millis(500));
    let after = sleeps(&sw);
    assert!(after >= before + 2, "the polling thread slept {} times in 500 ms", after - before);
}

/// `eventfd-id` of an eventfd open in this process as fd `fd`.
fn eventfd_id(fd: &str) -> Option<String> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines().find_map(|l| l.strip_prefix("eventfd-id:")).map(|v| v.trim().to_string())
}

/// How many fds of this process refer to the same eventfd as `f`.
fn open_copies(f: &File) -> usize {
    let id = eventfd_id(&f.as_raw_fd().to_string()).expect("an eventfd");
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().flatten();
    fds.filter(|e| eventfd_id(&e.file_name().to_string_lossy()).as_ref() == Some(&id)).count()
}

#[test]
fn test_departed_frontends_kick_eventfd_is_let_go() {
    let (_dir, sw, mut a, _b, _c) = setup("fds-kick-gone");
    let kick = eventfd(0);
    a.set_vring_file(1, VringFile::Kick, &kick).unwrap();
    // The polling thread sleeps on it (nothing else runs), then the frontend goes.
    assert!(wait_until(Duration::from_secs(2), || sw.stats().unwrap().pmds[0].sleeps > 2));
    assert!(open_copies(&kick) >= 2, "the switch holds the kick");
    drop(a);
    assert!(wait_until(Duration::from_secs(2), || !port_info(&sw, "a").connected));
    // The idle polling thread goes back to sleep every 100 ms at most.
    let gone = wait_until(Duration::from_secs(2), || open_copies(&kick) == 1);
    assert!(gone, "{} copies of the departed frontend's kick are still open", open_copies(&kick));
}
