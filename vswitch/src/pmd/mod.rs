//! Polling threads ("PMDs"): each owns a set of guest transmit queues and runs bursts over them.
//!
//! Control changes (ports added or removed) arrive on a channel and land between bursts; the
//! thread checks one relaxed flag per loop. In adaptive mode an idle thread turns guest kicks
//! back on and sleeps in epoll on the kick eventfds, so an idle switch costs next to no CPU;
//! in busy-poll mode it never sleeps and never asks for kicks.
//!
//! Nothing here blocks on a file a guest controls: kick eventfds are watched edge-triggered and
//! never read, and the interrupt writes run under the [`watchdog`](crate::watchdog).

pub mod burst;
pub mod copy;

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::l2::Fdb;
use crate::port::{Port, Queue};
use crate::watchdog::Heartbeat;
use burst::Datapath;

/// Empty polls in a row before an adaptive thread goes to sleep (~tens of µs).
const SPINS_BEFORE_SLEEP: u32 = 2000;
/// Longest sleep; bounds how stale an unkickable queue can get.
const MAX_SLEEP_MS: i32 = 100;
/// Longest sleep while a queue waits for an IOTLB translation.
const STALL_SLEEP_MS: i32 = 10;
/// Loop iterations between releases of shaped ports' held packets (a few µs when idle).
const SHAPER_TICK: u64 = 64;

/// A change for a polling thread.
pub enum PmdCmd {
    /// Learn a port (for delivery) and poll the listed transmit queue pairs of it.
    AddPort {
        /// The port.
        port: Arc<Port>,
        /// Transmit queue pairs this thread polls.
        poll_pairs: Vec<u16>,
        /// Acknowledged once applied.
        done: Sender<()>,
    },
    /// Forget a port; acknowledged once no burst can touch it any more.
    DelPort {
        /// Port id.
        id: u16,
        /// Acknowledged once applied.
        done: Sender<()>,
    },
    /// Exit the thread.
    Stop,
}

/// Counters of one polling thread.
#[derive(Debug, Default)]
pub struct PmdStats {
    /// TSC ticks spent in bursts that moved packets.
    pub busy_ticks: AtomicU64,
    /// TSC ticks spent in polls that found nothing.
    pub idle_ticks: AtomicU64,
    /// Packets taken from guests.
    pub packets: AtomicU64,
    /// Loop iterations.
    pub iterations: AtomicU64,
    /// Iterations that moved packets (packets / busy_iterations = mean burst size).
    pub busy_iterations: AtomicU64,
    /// Times the thread went to sleep (adaptive mode).
    pub sleeps: AtomicU64,
    /// Batching under load: waits for a second burst started, and those that ran out.
    pub batch_holds: AtomicU64,
    /// See [`PmdStats::batch_holds`].
    pub batch_expired: AtomicU64,
}

/// The control side's handle on a polling thread.
pub struct PmdHandle {
    /// Thread index.
    pub idx: usize,
    /// CPU it is pinned to, if any.
    pub core: Option<usize>,
    tx: Sender<PmdCmd>,
    pending: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    /// Its counters.
    pub stats: Arc<PmdStats>,
    /// What the watchdog reads of it (and its stall counters).
    pub heartbeat: Arc<Heartbeat>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PmdHandle {
    /// Starts a polling thread.
    pub fn spawn(
        idx: usize,
        core: Option<usize>,
        busy_poll: bool,
        batch_wait_us: u32,
        fdb: Arc<Fdb>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let pending = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let stats = Arc::new(PmdStats::default());
        let heartbeat = Arc::new(Heartbeat::new(format!("pmd{idx}"), true));
        let mut dp = Datapath::new(idx, fdb);
        dp.batch.wait = batch_wait_us as u64 * ticks_per_us();
        let mut pmd = Pmd {
            dp,
            polls: Vec::new(),
            rx,
            pending: pending.clone(),
            wake: wake.clone(),
            stats: stats.clone(),
            busy_poll,
            sleeper: None,
            heartbeat: heartbeat.clone(),
        };
        let thread = std::thread::Builder::new().name(format!("pmd{idx}")).spawn(move || {
            if let Some(c) = core {
                pin_to(c);
            }
            pmd.heartbeat.attach();
            pmd.run();
        })?;
        Ok(PmdHandle { idx, core, tx, pending, wake, stats, heartbeat, thread: Some(thread) })
    }

    /// Something that wakes this thread from its sleep without a command (a queue started).
    pub fn waker(&self) -> Arc<EventFd> {
        self.wake.clone()
    }

    /// Posts a command and wakes the thread.
    pub fn send(&self, cmd: PmdCmd) {
        if self.tx.send(cmd).is_ok() {
            self.pending.store(true, Ordering::Release);
            let _ = self.wake.write(1);
        }
    }

    /// Posts a command built around an ack channel and waits (bounded) for the ack.
    pub fn call(&self, make: impl FnOnce(Sender<()>) -> PmdCmd) -> bool {
        let (done, ack) = crossbeam_channel::bounded(1);
        self.send(make(done));
        ack.recv_timeout(Duration::from_secs(5)).is_ok()
    }
}

impl Drop for PmdHandle {
    fn drop(&mut self) {
        self.send(PmdCmd::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A transmit queue a polling thread polls, and the busy ticks it spent on it not yet added
/// to the queue's slot.
struct Polled {
    port: Arc<Port>,
    pair: u16,
    busy: u64,
}

impl Polled {
    /// Adds the ticks spent on the queue to its slot, where the control thread reads them.
    fn publish(&mut self) {
        if self.busy != 0 {
            self.port.txq[self.pair as usize].busy_ticks.fetch_add(self.busy, Ordering::Relaxed);
            self.busy = 0;
        }
    }
}

struct Pmd {
    dp: Datapath,
    polls: Vec<Polled>,
    rx: Receiver<PmdCmd>,
    pending: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    stats: Arc<PmdStats>,
    busy_poll: bool,
    sleeper: Option<Sleeper>,
    heartbeat: Arc<Heartbeat>,
}

impl Pmd {
    fn run(&mut self) {
        let (mut busy, mut idle, mut packets, mut iters, mut busy_iters) = (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut empty = 0u32;
        let mut now = 0u32;
        loop {
            if self.pending.load(Ordering::Relaxed) && !self.apply_commands() {
                return;
            }
            if iters % 256 == 0 {
                // The FDB's clock has one-second resolution; no need to read it every loop.
                now = self.dp.fdb.now();
            }
            let t0 = ticks();
            let mut moved = 0;
            // Each queue that moved packets is charged the ticks since the last reading (its
            // burst, and the empty polls before it): the load that balancing reads. An empty
            // poll reads no clock.
            let mut t = t0;
            for p in &mut self.polls {
                let n = self.dp.poll_queue(&p.port, p.pair as usize, now);
                if n > 0 {
                    let t1 = ticks();
                    p.busy += t1.wrapping_sub(t);
                    t = t1;
                    moved += n;
                }
            }
            let dt = ticks().wrapping_sub(t0);
            iters += 1;
            self.heartbeat.beat(iters);
            if moved > 0 {
                busy += dt;
                busy_iters += 1;
                packets += moved as u64;
                empty = 0;
            } else {
                idle += dt;
                empty += 1;
            }
            if iters % SHAPER_TICK == 0 {
                // Held packets of shaped ports go out as tokens come back, traffic or not.
                self.dp.release_shaped();
                self.dp.translate_rx_ahead();
            }
            if iters % 1024 == 0 || empty == SPINS_BEFORE_SLEEP {
                let s = &self.stats;
                s.busy_ticks.store(busy, Ordering::Relaxed);
                s.idle_ticks.store(idle, Ordering::Relaxed);
                s.packets.store(packets, Ordering::Relaxed);
                s.iterations.store(iters, Ordering::Relaxed);
                s.busy_iterations.store(busy_iters, Ordering::Relaxed);
                s.batch_holds.store(self.dp.batch.holds, Ordering::Relaxed);
                s.batch_expired.store(self.dp.batch.expired, Ordering::Relaxed);
                self.polls.iter_mut().for_each(Polled::publish);
            }
            if !self.busy_poll && empty >= SPINS_BEFORE_SLEEP {
                self.sleep();
                empty = 0;
            }
        }
    }

    /// Applies queued commands; false on Stop.
    fn apply_commands(&mut self) -> bool {
        self.pending.store(false, Ordering::Relaxed);
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                PmdCmd::AddPort { port, poll_pairs, done } => {
                    // Also how a queue moves to another thread: this thread's list for the
                    // port is replaced (its load so far stays with the queue's slot).
                    self.polls.iter_mut().filter(|p| p.port.id == port.id).for_each(Polled::publish);
                    self.polls.retain(|p| p.port.id != port.id);
                    for pair in poll_pairs {
                        self.polls.push(Polled { port: port.clone(), pair, busy: 0 });
                    }
                    // Kicks of queues no longer polled here must not wake this thread; the
                    // next sleep watches those it still polls.
                    if let Some(s) = &mut self.sleeper {
                        s.forget_port(port.id);
                    }
                    self.dp.add_port(port);
                    let _ = done.send(());
                }
                PmdCmd::DelPort { id, done } => {
                    self.polls.iter_mut().filter(|p| p.port.id == id).for_each(Polled::publish);
                    self.polls.retain(|p| p.port.id != id);
                    self.dp.del_port(id);
                    if let Some(s) = &mut self.sleeper {
                        s.forget_port(id);
                    }
                    let _ = done.send(());
                }
                PmdCmd::Stop => return false,
            }
        }
        true
    }

    /// Turns kicks on for every queue, re-checks for work, and sleeps until a kick, a command
    /// or the timeout. Kicks go back off on wake.
    fn sleep(&mut self) {
        if self.sleeper.is_none() {
            match Sleeper::new(&self.wake) {
                Ok(s) => self.sleeper = Some(s),
                Err(e) => {
                    tracing::warn!("cannot sleep (epoll failed: {e}); busy-polling instead");
                    self.busy_poll = true;
                    return;
                }
            }
        }
        let Some(sleeper) = self.sleeper.as_mut() else { return };
        let mut work = false;
        let mut blind = false; // a running queue we cannot be woken for
        let mut short_sleep = false; // IOTLB work: a stalled queue, or receive buffers to look at
        let mut nic_tx_ms: Option<i32> = None; // a NIC's shaped transmit queue
        for p in &self.polls {
            let (port, pair) = (&p.port, &p.pair);
            let mut g = port.txq[*pair as usize].lock();
            // A stopped queue's kick may belong to a frontend that has gone, and a broken one
            // always shows "new" entries it will never take: neither may wake us or keep us up.
            match g.as_mut().filter(|q| q.live()) {
                Some(Queue::Virtio(q)) => {
                    if q.set_kicks(true) {
                        // A queue stalled on an IOTLB miss is not work until the update comes
                        // (which wakes us); we look again soon in case it never does.
                        if q.iotlb.as_ref().is_some_and(|l| l.stalled()) {
                            short_sleep = true;
                        } else {
                            work = true;
                        }
                    }
                    match &q.kick {
                        Some((file, gen)) => sleeper.watch(port.id, *pair, file, *gen),
                        None => blind = true,
                    }
                }
                // A device's file is readable when a frame waits (edge-triggered: the burst
                // read it empty before we got here, so any frame after that wakes us).
                Some(Queue::Tap(t)) => sleeper.watch(port.id, *pair, t.file(), 0),
                Some(Queue::Nic(n)) => {
                    // Going idle: the device holds no interrupt back.
                    if n.irq_held != 0 {
                        self.dp.raise_held(n, true);
                    }
                    // Frames its shapers hold must go out on time.
                    if let Some(ns) = burst::tx_wait_ns(port) {
                        nic_tx_ms = Some(
                            nic_tx_ms
                                .unwrap_or(i32::MAX)
                                .min(ns.div_ceil(1_000_000).clamp(1, MAX_SLEEP_MS as u64) as i32),
                        );
                    }
                    // An in-process wire rings its bell only for an armed receiver.
                    if n.wire.arm() {
                        work = true;
                    }
                    sleeper.watch(port.id, *pair, n.wire.file(), 0)
                }
                // The device polls a plugged ring: the guest's doorbell wakes it as it would
                // the software path, and frames it holds for the wire or a rate are work soon.
                Some(Queue::AccelTx(a)) => {
                    if a.q.set_kicks(true) {
                        // Stalled on an IOTLB miss: work once the update comes (it wakes us).
                        if a.shell.iotlb.as_ref().is_some_and(|l| l.stalled()) {
                            short_sleep = true;
                        } else {
                            work = true;
                        }
                    }
                    if a.q.in_flight() > 0 {
                        short_sleep = true;
                    }
                    match &a.shell.kick {
                        Some((file, gen)) => sleeper.watch(port.id, *pair, file, *gen),
                        None => blind = true,
                    }
                }
                Some(Queue::NicTx(_) | Queue::AccelRx(_)) => sleeper.unwatch(port.id, *pair),
                None => sleeper.unwatch(port.id, *pair),
            }
        }
        // Packets a shaper holds back must go out on time even if nothing kicks us.
        let shaped_ms =
            self.dp.release_shaped().map(|ns| ns.div_ceil(1_000_000).clamp(1, MAX_SLEEP_MS as u64) as i32);
        let shaped_ms = match (shaped_ms, nic_tx_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Receive buffers posted by guests behind a vIOMMU get their translations asked for
        // within a short sleep, before packets need them (no kick tells us they were posted).
        if self.dp.translate_rx_ahead() {
            short_sleep = true;
        }
        if !work && !self.pending.load(Ordering::Acquire) {
            self.stats.sleeps.fetch_add(1, Ordering::Relaxed);
            let timeout = if blind {
                1
            } else if short_sleep {
                STALL_SLEEP_MS
            } else {
                MAX_SLEEP_MS
            };
            self.heartbeat.sleeping(true);
            sleeper.wait(shaped_ms.map_or(timeout, |ms| ms.min(timeout)));
            self.heartbeat.sleeping(false);
        }
        for p in &self.polls {
            let mut g = p.port.txq[p.pair as usize].lock();
            match g.as_mut() {
                Some(Queue::Virtio(q)) => {
                    q.set_kicks(false);
                }
                Some(Queue::AccelTx(a)) => {
                    a.q.set_kicks(false);
                }
                _ => {}
            }
        }
    }
}

/// epoll set of kick eventfds (edge-triggered, never read) plus the thread's wake eventfd
/// (level-triggered, read on wake).
///
/// A kick eventfd is shared with the frontend, which may make it blocking and read it back
/// before we do, so reading it could block. Edge-triggered, every write the guest makes wakes
/// a waiter whatever the counter holds, so it never needs reading.
///
/// Each watched kick file is held open until it has been removed from the set: epoll forgets a
/// closed fd by itself, and its number may by then belong to another port's kick, which a later
/// `EPOLL_CTL_DEL` by number would wrongly remove.
struct Sleeper {
    epfd: RawFd,
    wake: RawFd,
    watched: HashMap<(u16, u16), (Arc<std::fs::File>, u64)>,
}

impl Sleeper {
    fn new(wake: &EventFd) -> std::io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned by Sleeper and closed in Drop.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = Sleeper { epfd, wake: wake.as_raw_fd(), watched: HashMap::new() };
        s.ctl(libc::EPOLL_CTL_ADD, s.wake, libc::EPOLLIN);
        Ok(s)
    }

    fn ctl(&self, op: i32, fd: RawFd, events: i32) {
        let mut ev = libc::epoll_event { events: events as u32, u64: fd as u64 };
        // SAFETY: valid epoll fd and event struct; errors (closed fd) are harmless here.
        unsafe { libc::epoll_ctl(self.epfd, op, fd, &mut ev) };
    }

    /// Makes sure the queue's current kick file (by generation) is in the set.
    fn watch(&mut self, port: u16, pair: u16, file: &Arc<std::fs::File>, gen: u64) {
        if let Some((old, g)) = self.watched.get(&(port, pair)) {
            if *g == gen {
                return;
            }
            // Still open (we hold it), so this removes exactly the old kick.
            self.ctl(libc::EPOLL_CTL_DEL, old.as_raw_fd(), 0);
        }
        self.ctl(libc::EPOLL_CTL_ADD, file.as_raw_fd(), libc::EPOLLIN | libc::EPOLLET);
        self.watched.insert((port, pair), (file.clone(), gen));
    }

    /// Stops watching the queue's kick (the queue stopped or broke) and lets go of the file.
    fn unwatch(&mut self, port: u16, pair: u16) {
        if let Some((file, _)) = self.watched.remove(&(port, pair)) {
            self.ctl(libc::EPOLL_CTL_DEL, file.as_raw_fd(), 0);
        }
    }

    fn forget_port(&mut self, port: u16) {
        let gone: Vec<_> = self.watched.keys().filter(|(p, _)| *p == port).copied().collect();
        for k in gone {
            self.unwatch(k.0, k.1);
        }
    }

    /// Sleeps until a kick, a wake or the timeout; resets the wake eventfd if it fired. Kick
    /// eventfds are not read (see the type's comment).
    fn wait(&mut self, timeout_ms: i32) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 32];
        // SAFETY: evs is a valid buffer of 32 events.
        let n = unsafe { libc::epoll_wait(self.epfd, evs.as_mut_ptr(), 32, timeout_ms) };
        if evs.iter().take(n.max(0) as usize).any(|ev| ev.u64 == self.wake as u64) {
            let mut buf = [0u8; 8];
            // SAFETY: our own non-blocking eventfd; an 8-byte read resets it.
            unsafe { libc::read(self.wake, buf.as_mut_ptr().cast(), 8) };
        }
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        // SAFETY: we own epfd.
        unsafe { libc::close(self.epfd) };
    }
}

/// Pins the calling thread to one CPU.
fn pin_to(core: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes within it; sched_setaffinity(0) targets
    // the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!(core, "cannot pin polling thread: {}", std::io::Error::last_os_error());
        }
    }
}

pub use crate::clock::{ticks, ticks_per_us};
