//! Which polling thread polls which source queue, by measured load.
//!
//! Every source queue (a guest's transmit queue, an uplink's receive side) is polled by one
//! thread. A new port's queues go to the threads that poll the fewest queues. Polling threads
//! count the ticks they spend on each queue's bursts (`QueueSlot::busy_ticks`); the control
//! thread samples them every second and keeps the last [`WINDOW`] samples. A rebalance
//! (`ctl rebalance`, or by itself every `rebalance_interval_secs` while the busiest thread is
//! loaded past `rebalance_load_pct` and the new assignment lowers the busiest thread's load by
//! `rebalance_improvement_pct`, as Open vSwitch's `pmd-auto-lb` does) assigns the queues
//! again, busiest first, each to the thread least loaded so far. Queues with no load stay
//! where they are: an idle queue tells nothing about where it belongs.
//!
//! A move loses nothing and reorders nothing: the thread giving a queue up lets go of it
//! between its bursts and says so before the thread taking it is told to poll it; meanwhile
//! the guest's descriptors wait in its ring.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Control;
use crate::control::{PmdQueueReport, QueueMove, RebalanceReport};
use crate::pmd::{ticks_per_us, PmdCmd};
use crate::port::Port;

/// Load samples kept per queue (one a second): the window a rebalance looks at.
pub const WINDOW: usize = 10;
/// How often queue loads are sampled.
pub const SAMPLE: Duration = Duration::from_secs(1);

/// A source queue: port id and queue pair.
pub type QueueKey = (u16, u16);

/// When the switch rebalances by itself.
#[derive(Clone, Copy, Debug)]
pub struct AutoRebalance {
    /// Seconds between checks; 0 = only on request.
    pub interval_secs: u32,
    /// The busiest thread's load (percent of the window) below which nothing moves.
    pub load_pct: u32,
    /// How much lower (percent) the busiest thread's load must get for queues to move.
    pub improvement_pct: u32,
}

/// One queue's owner and measured load.
struct Book {
    owner: usize,
    /// Put on its thread by the user (`ctl queue-pin`): rebalancing leaves it there.
    pinned: bool,
    /// `busy_ticks` at the last sample.
    last: u64,
    /// Ticks per sample, newest last.
    loads: VecDeque<u64>,
}

/// The control thread's books on queue placement.
pub struct Balance {
    books: BTreeMap<QueueKey, Book>,
    /// Wall-clock ticks of each sample, newest last.
    spans: VecDeque<u64>,
    last_sample: Instant,
    next_auto: Instant,
    /// Automatic rebalancing.
    pub auto: AutoRebalance,
    /// Rebalances applied (automatic or asked for) and queues moved by them.
    pub rebalances: u64,
    /// See [`Balance::rebalances`].
    pub moves: u64,
}

/// One queue as the planner sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item {
    /// Which queue.
    pub key: QueueKey,
    /// Its load (ticks over the window).
    pub load: u64,
    /// The thread polling it now.
    pub owner: usize,
    /// Whether it must stay on that thread.
    pub pinned: bool,
}

/// Assigns `items` to `threads` threads: the busiest queue first, each to the thread least
/// loaded so far (on a tie its current thread, then the thread with fewest queues, then the
/// lowest index). Pinned queues and queues without load keep their thread (a pinned queue's
/// load counts for it). Returns each item's thread.
pub fn plan(items: &[Item], threads: usize) -> Vec<usize> {
    let mut out: Vec<usize> = items.iter().map(|i| i.owner.min(threads.saturating_sub(1))).collect();
    if threads < 2 {
        return out;
    }
    let mut load = vec![0u64; threads];
    let mut count = vec![0usize; threads];
    let stays = |i: &Item| i.load == 0 || i.pinned;
    for (k, i) in items.iter().enumerate() {
        if stays(i) {
            count[out[k]] += 1;
            load[out[k]] += i.load;
        }
    }
    let mut order: Vec<usize> = (0..items.len()).filter(|&k| !stays(&items[k])).collect();
    order.sort_by(|&a, &b| items[b].load.cmp(&items[a].load).then(items[a].key.cmp(&items[b].key)));
    for k in order {
        let owner = out[k];
        let best = (0..threads).min_by_key(|&t| (load[t], t != owner, count[t], t)).unwrap_or(owner);
        out[k] = best;
        load[best] += items[k].load;
        count[best] += 1;
    }
    out
}

/// Each thread's summed load under an assignment.
pub fn thread_loads(items: &[Item], owners: &[usize], threads: usize) -> Vec<u64> {
    let mut load = vec![0u64; threads];
    for (i, &t) in items.iter().zip(owners) {
        if let Some(l) = load.get_mut(t) {
            *l += i.load;
        }
    }
    load
}

impl Balance {
    /// Empty books.
    pub fn new(auto: AutoRebalance) -> Self {
        Balance {
            books: BTreeMap::new(),
            spans: VecDeque::new(),
            last_sample: Instant::now(),
            next_auto: Instant::now() + Duration::from_secs(auto.interval_secs.max(1) as u64),
            auto,
            rebalances: 0,
            moves: 0,
        }
    }

    /// Places a new port's `pairs` source queues: each on its pinned thread (`pinned(pair)`),
    /// or else on the thread polling the fewest queues (lowest index on a tie). Returns each
    /// thread's pairs of the port.
    pub fn place(
        &mut self,
        port: &Port,
        pairs: u16,
        threads: usize,
        pinned: impl Fn(u16) -> Option<usize>,
    ) -> Vec<Vec<u16>> {
        let threads = threads.max(1);
        let mut count = vec![0usize; threads];
        for b in self.books.values() {
            count[b.owner.min(threads - 1)] += 1;
        }
        let mut lists = vec![Vec::new(); threads];
        for pair in 0..pairs {
            let pin = pinned(pair).filter(|&t| t < threads);
            let t = pin.unwrap_or_else(|| (0..threads).min_by_key(|&t| (count[t], t)).unwrap_or(0));
            count[t] += 1;
            lists[t].push(pair);
            let last = port.txq.get(pair as usize).map_or(0, |s| s.busy_ticks.load(Ordering::Relaxed));
            let book = Book { owner: t, pinned: pin.is_some(), last, loads: VecDeque::new() };
            self.books.insert((port.id, pair), book);
        }
        lists
    }

    /// Forgets a removed port's queues.
    pub fn forget(&mut self, port: u16) {
        self.books.retain(|(p, _), _| *p != port);
    }

    /// Whether a sample is due.
    pub fn sample_due(&self) -> bool {
        self.last_sample.elapsed() >= SAMPLE
    }

    /// Time until the next sample or automatic check.
    pub fn next_due(&self) -> Duration {
        SAMPLE.saturating_sub(self.last_sample.elapsed())
    }

    /// Reads every queue's load since the last sample.
    pub fn sample(&mut self, ports: &HashMap<u16, Arc<Port>>) {
        let span = (self.last_sample.elapsed().as_micros() as u64).saturating_mul(ticks_per_us());
        self.last_sample = Instant::now();
        push_capped(&mut self.spans, span);
        for ((id, pair), b) in self.books.iter_mut() {
            let Some(slot) = ports.get(id).and_then(|p| p.txq.get(*pair as usize)) else { continue };
            let now = slot.busy_ticks.load(Ordering::Relaxed);
            push_capped(&mut b.loads, now.wrapping_sub(b.last));
            b.last = now;
        }
    }

    /// The queues with their load over the window and their thread.
    pub fn items(&self) -> Vec<Item> {
        self.books
            .iter()
            .map(|(&key, b)| Item { key, load: b.loads.iter().sum(), owner: b.owner, pinned: b.pinned })
            .collect()
    }

    /// Wall-clock ticks the window covers.
    pub fn window_ticks(&self) -> u64 {
        self.spans.iter().sum()
    }

    /// Percent of the window a load is.
    pub fn pct(&self, load: u64) -> f64 {
        pct_of(load, self.window_ticks())
    }

    /// Whether an automatic check is due (and schedules the next).
    pub fn auto_due(&mut self) -> bool {
        if self.auto.interval_secs == 0 || Instant::now() < self.next_auto {
            return false;
        }
        self.next_auto = Instant::now() + Duration::from_secs(self.auto.interval_secs as u64);
        true
    }

    /// The pairs of `port` that thread `t` polls.
    fn pairs_of(&self, port: u16, t: usize) -> Vec<u16> {
        self.books
            .range((port, 0)..=(port, u16::MAX))
            .filter(|(_, b)| b.owner == t)
            .map(|(k, _)| k.1)
            .collect()
    }

    /// Each thread's queues with their load, for `ctl stats`.
    pub fn report(&self, t: usize, names: &HashMap<u16, String>) -> Vec<PmdQueueReport> {
        self.books
            .iter()
            .filter(|(_, b)| b.owner == t)
            .map(|((id, pair), b)| PmdQueueReport {
                port: names.get(id).cloned().unwrap_or_default(),
                queue_pair: *pair,
                load_pct: self.pct(b.loads.iter().sum()),
                pinned: b.pinned,
            })
            .collect()
    }
}

fn pct_of(load: u64, window: u64) -> f64 {
    if window == 0 {
        0.0
    } else {
        load as f64 * 100.0 / window as f64
    }
}

fn push_capped(q: &mut VecDeque<u64>, v: u64) {
    if q.len() == WINDOW {
        q.pop_front();
    }
    q.push_back(v);
}

impl Control {
    /// Samples queue loads when due, and rebalances by itself when that is on and worth it.
    pub(super) fn balance_tick(&mut self) {
        if !self.balance.sample_due() {
            return;
        }
        let ports: HashMap<u16, Arc<Port>> =
            self.ports.iter().map(|(id, st)| (*id, st.port.clone())).collect();
        self.balance.sample(&ports);
        if self.pmds.len() < 2 || !self.balance.auto_due() {
            return;
        }
        let items = self.balance.items();
        let busiest =
            thread_loads(&items, &items.iter().map(|i| i.owner).collect::<Vec<_>>(), self.pmds.len())
                .into_iter()
                .max()
                .unwrap_or(0);
        if self.balance.pct(busiest) < self.balance.auto.load_pct as f64 {
            return;
        }
        let r = self.rebalance(self.balance.auto.improvement_pct as f64);
        if r.applied {
            tracing::info!(
                moved = r.moves.len(),
                before = ?r.before_pct,
                after = ?r.after_pct,
                "rebalanced polling threads' queues by measured load"
            );
        }
    }

    /// Plans an assignment by the window's loads and applies it if it lowers the busiest
    /// thread's load by at least `min_improvement_pct` percent (0: by anything at all).
    pub(super) fn rebalance(&mut self, min_improvement_pct: f64) -> RebalanceReport {
        let threads = self.pmds.len();
        let items = self.balance.items();
        let old: Vec<usize> = items.iter().map(|i| i.owner).collect();
        let new = plan(&items, threads);
        let (before, after) = (thread_loads(&items, &old, threads), thread_loads(&items, &new, threads));
        let (bmax, amax) =
            (before.iter().copied().max().unwrap_or(0), after.iter().copied().max().unwrap_or(0));
        let improvement = if bmax == 0 { 0.0 } else { (bmax - amax.min(bmax)) as f64 * 100.0 / bmax as f64 };
        let window = self.balance.window_ticks();
        let pcts = move |v: &[u64]| v.iter().map(|&l| pct_of(l, window)).collect::<Vec<f64>>();
        let mut report = RebalanceReport {
            applied: false,
            why: String::new(),
            before_pct: pcts(&before),
            after_pct: pcts(&before),
            improvement_pct: improvement,
            moves: Vec::new(),
        };
        if threads < 2 {
            report.why =
                "one polling thread: nothing to balance (give the switch more with --pmd-cores)".into();
            return report;
        }
        if amax >= bmax || improvement < min_improvement_pct {
            report.why = format!(
                "no better assignment by the last {} s of load (busiest thread {:.1} % now, {:.1} % at best)",
                self.balance.spans.len(),
                self.balance.pct(bmax),
                self.balance.pct(amax)
            );
            return report;
        }
        let moves: Vec<(Item, usize)> =
            items.iter().zip(&new).filter(|(i, &t)| i.owner != t).map(|(i, &t)| (*i, t)).collect();
        let failed = self.move_queues(&moves);
        for (i, to) in &moves {
            let name = self.ports.get(&i.key.0).map(|st| st.cfg.name.clone()).unwrap_or_default();
            if failed.contains(&i.owner) {
                continue;
            }
            report.moves.push(QueueMove {
                port: name,
                queue_pair: i.key.1,
                from: i.owner,
                to: *to,
                load_pct: self.balance.pct(i.load),
            });
        }
        let now: Vec<usize> = self.balance.items().iter().map(|i| i.owner).collect();
        report.after_pct = pcts(&thread_loads(&items, &now, threads));
        report.applied = !report.moves.is_empty();
        if !failed.is_empty() {
            report.why = format!(
                "polling thread(s) {failed:?} did not let go of their queues within the bound (see the watchdog); those stay"
            );
        }
        self.balance.rebalances += report.applied as u64;
        self.balance.moves += report.moves.len() as u64;
        report
    }

    /// Puts a queue on a thread and keeps it there (`pmd` None: lets rebalancing move it
    /// again). Returns the thread that polls it now.
    pub(super) fn pin_queue(&mut self, name: &str, pair: u16, pmd: Option<usize>) -> Result<usize, String> {
        let id = self.port_named(name).map_err(|e| e.to_string())?.port.id;
        let threads = self.pmds.len();
        let Some(b) = self.balance.books.get_mut(&(id, pair)) else {
            return Err(format!("port {name} has no queue pair {pair}"));
        };
        let Some(t) = pmd else {
            b.pinned = false;
            return Ok(b.owner);
        };
        if t >= threads {
            return Err(format!(
                "there is no polling thread {t}: the switch runs {threads} (pmd0..pmd{}; --pmd-cores adds more)",
                threads - 1
            ));
        }
        b.pinned = true;
        let item = Item { key: (id, pair), load: 0, owner: b.owner, pinned: true };
        if item.owner == t {
            return Ok(t);
        }
        let failed = self.move_queues(&[(item, t)]);
        match failed.is_empty() {
            true => {
                self.balance.moves += 1;
                Ok(t)
            }
            false => Err(format!(
                "polling thread {} did not let go of {name}/{pair} within the bound (see the watchdog's report); it stays there",
                item.owner
            )),
        }
    }

    /// Moves queues between threads: the giving threads let go first (acknowledged), then the
    /// taking threads poll. Returns threads that did not acknowledge; their queues stay theirs.
    fn move_queues(&mut self, moves: &[(Item, usize)]) -> Vec<usize> {
        let mut touched: BTreeSet<(usize, u16)> = BTreeSet::new();
        for (i, to) in moves {
            touched.insert((i.owner, i.key.0));
            touched.insert((*to, i.key.0));
        }
        let port_of = |id: u16| self.ports.get(&id).map(|st| st.port.clone());
        // 1. Each giving thread keeps only what stays with it.
        let mut failed = Vec::new();
        for &(t, id) in &touched {
            let Some(port) = port_of(id) else { continue };
            let gives = moves.iter().any(|(i, _)| i.owner == t && i.key.0 == id);
            // A thread that did not answer is not waited for again (its list is restored below).
            if !gives || failed.contains(&t) {
                continue;
            }
            let keep: Vec<u16> = self
                .balance
                .pairs_of(id, t)
                .into_iter()
                .filter(|pair| !moves.iter().any(|(i, _)| i.key == (id, *pair)))
                .collect();
            if !self.pmds[t].call(|done| PmdCmd::AddPort { port, poll_pairs: keep, done }) {
                failed.push(t);
            }
        }
        // A thread that did not answer in time gets its whole list back (its commands are
        // applied in order), and its queues stay where they are.
        for &t in &failed {
            for &(tt, id) in &touched {
                if tt == t {
                    if let Some(port) = port_of(id) {
                        let pairs = self.balance.pairs_of(id, t);
                        self.pmds[t].send(PmdCmd::AddPort { port, poll_pairs: pairs, done: dead_ack() });
                    }
                }
            }
        }
        for (i, to) in moves {
            if !failed.contains(&i.owner) {
                if let Some(b) = self.balance.books.get_mut(&i.key) {
                    b.owner = *to;
                }
            }
        }
        // 2. Each taking thread polls its new list (one that does not answer in time gets the
        // rest of its lists without being waited for: its commands are applied in order).
        let mut slow: Vec<usize> = Vec::new();
        for &(t, id) in &touched {
            let takes = moves.iter().any(|(i, to)| *to == t && i.key.0 == id && !failed.contains(&i.owner));
            if !takes {
                continue;
            }
            let Some(port) = port_of(id) else { continue };
            let pairs = self.balance.pairs_of(id, t);
            if slow.contains(&t) {
                self.pmds[t].send(PmdCmd::AddPort { port, poll_pairs: pairs, done: dead_ack() });
            } else if !self.pmds[t].call(|done| PmdCmd::AddPort { port, poll_pairs: pairs, done }) {
                slow.push(t);
                tracing::warn!(
                    pmd = t,
                    port = id,
                    "a polling thread took over queues without acknowledging in time; they are queued for it"
                );
            }
        }
        failed
    }
}

/// An acknowledgement channel nobody waits on.
fn dead_ack() -> crossbeam_channel::Sender<()> {
    crossbeam_channel::bounded(1).0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn it(port: u16, load: u64, owner: usize) -> Item {
        Item { key: (port, 0), load, owner, pinned: false }
    }

    #[test]
    fn pinned_queues_stay_and_count_for_their_thread() {
        // Thread 0 has a pinned queue of 100: the two others go to thread 1 or share the rest.
        let items = [Item { pinned: true, ..it(0, 100, 0) }, it(1, 60, 0), it(2, 50, 0)];
        let owners = plan(&items, 2);
        assert_eq!(owners, vec![0, 1, 1]);
    }

    #[test]
    fn two_busy_queues_on_one_thread_are_split() {
        let items = [it(0, 100, 0), it(1, 0, 1), it(2, 90, 0), it(3, 0, 1)];
        let owners = plan(&items, 2);
        assert_ne!(owners[0], owners[2], "the two busy queues end on different threads: {owners:?}");
        // Idle queues stay where they were.
        assert_eq!((owners[1], owners[3]), (1, 1));
        let loads = thread_loads(&items, &owners, 2);
        assert_eq!(loads.iter().max(), Some(&100));
    }

    #[test]
    fn a_balanced_assignment_is_left_alone() {
        // Equal loads already one per thread: ties keep the current thread.
        let items = [it(0, 50, 1), it(1, 50, 0), it(2, 10, 0), it(3, 10, 1)];
        assert_eq!(plan(&items, 2), vec![1, 0, 0, 1]);
    }

    #[test]
    fn busiest_first_lowers_the_maximum() {
        // Current: thread 0 has 60+50+40, thread 1 has 30 (max 150).
        let items = [it(0, 60, 0), it(1, 50, 0), it(2, 40, 0), it(3, 30, 1)];
        let owners = plan(&items, 2);
        let loads = thread_loads(&items, &owners, 2);
        assert_eq!(*loads.iter().max().unwrap(), 90, "60+30 | 50+40: {owners:?}");
        // Three threads: 60 | 50 | 40+30.
        let loads = thread_loads(&items, &plan(&items, 3), 3);
        assert_eq!(*loads.iter().max().unwrap(), 70);
    }

    #[test]
    fn one_thread_or_none_moves_nothing() {
        let items = [it(0, 60, 0), it(1, 50, 0)];
        assert_eq!(plan(&items, 1), vec![0, 0]);
        assert_eq!(plan(&[], 4), Vec::<usize>::new());
    }

    #[test]
    fn new_queues_go_to_the_threads_with_fewest() {
        let mut b = Balance::new(AutoRebalance { interval_secs: 0, load_pct: 0, improvement_pct: 0 });
        let p = |id, pairs| Port::new(id, format!("p{id}"), crate::l2::VlanMode::Trunk(None), [0; 6], pairs);
        let free = |_| None;
        assert_eq!(b.place(&p(0, 1), 1, 2, free), vec![vec![0], vec![]]);
        assert_eq!(b.place(&p(1, 1), 1, 2, free), vec![vec![], vec![0]]);
        assert_eq!(b.place(&p(2, 3), 3, 2, free), vec![vec![0, 2], vec![1]]);
        b.forget(2);
        b.forget(0);
        // Thread 0 has nothing left, thread 1 port 1's queue.
        assert_eq!(b.place(&p(3, 1), 1, 2, free), vec![vec![0], vec![]]);
        // Pinned by the port's configuration: where it says, and marked so.
        assert_eq!(b.place(&p(4, 2), 2, 2, |_| Some(1)), vec![vec![], vec![0, 1]]);
        assert!(b.items().iter().filter(|i| i.key.0 == 4).all(|i| i.pinned && i.owner == 1));
    }
}
