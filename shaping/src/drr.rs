//! Deficit round robin (Shreedhar & Varghese) across the transmit queues of one port.
//!
//! Each queue earns `weight × quantum` bytes of credit per round and sends head packets while
//! its credit covers them; an empty queue loses its credit. Over a backlogged period each queue
//! gets bytes in proportion to its weight, whatever its packet sizes, in O(1) per packet.
//! The scheduler does not own the queues: the caller says how long each head packet is.

/// Why a scheduler could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrrError {
    /// No queues.
    NoQueues,
    /// A weight (or the quantum) is zero, which would starve that queue forever.
    ZeroWeight,
}

impl std::fmt::Display for DrrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DrrError::NoQueues => write!(f, "a scheduler needs at least one queue"),
            DrrError::ZeroWeight => write!(f, "weights and the quantum must be at least 1"),
        }
    }
}

impl std::error::Error for DrrError {}

/// A DRR scheduler over a fixed number of queues.
#[derive(Clone, Debug)]
pub struct Drr {
    /// Bytes per weight unit and round.
    base: u64,
    quantum: Box<[u64]>,
    deficit: Box<[u64]>,
    cur: usize,
    /// Whether `cur` has had its quantum for the turn it is in.
    in_turn: bool,
}

impl Drr {
    /// One queue per weight; a queue earns `weight × quantum` bytes per round. A quantum of at
    /// least the largest packet keeps each decision O(1).
    pub fn new(weights: &[u32], quantum: u32) -> Result<Self, DrrError> {
        if weights.is_empty() {
            return Err(DrrError::NoQueues);
        }
        if quantum == 0 || weights.contains(&0) {
            return Err(DrrError::ZeroWeight);
        }
        Ok(Drr {
            base: quantum as u64,
            quantum: weights.iter().map(|&w| w as u64 * quantum as u64).collect(),
            deficit: vec![0; weights.len()].into_boxed_slice(),
            cur: 0,
            in_turn: false,
        })
    }

    /// Gives queue `q` a new weight, from its next turn on (its credit so far is kept).
    pub fn set_weight(&mut self, q: usize, weight: u32) -> Result<(), DrrError> {
        if weight == 0 {
            return Err(DrrError::ZeroWeight);
        }
        if let Some(x) = self.quantum.get_mut(q) {
            *x = weight as u64 * self.base;
        }
        Ok(())
    }

    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.quantum.len()
    }

    /// Picks the queue whose head packet goes next, given each queue's head length (`None`
    /// when empty), and charges it. `None` when every queue is empty. The caller then sends
    /// that queue's head.
    pub fn next(&mut self, mut head_len: impl FnMut(usize) -> Option<u32>) -> Option<usize> {
        let n = self.quantum.len();
        let mut empty_run = 0;
        loop {
            match head_len(self.cur) {
                None => {
                    self.deficit[self.cur] = 0;
                    empty_run += 1;
                    if empty_run >= n {
                        self.in_turn = false;
                        return None;
                    }
                }
                Some(len) => {
                    empty_run = 0;
                    if !self.in_turn {
                        self.deficit[self.cur] += self.quantum[self.cur];
                        self.in_turn = true;
                    }
                    if self.deficit[self.cur] >= len as u64 {
                        self.deficit[self.cur] -= len as u64;
                        return Some(self.cur);
                    }
                }
            }
            // This queue's turn is over.
            self.in_turn = false;
            self.cur = (self.cur + 1) % n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    #[test]
    fn a_changed_weight_changes_the_share() {
        let mut d = Drr::new(&[1, 1], 1000).unwrap();
        assert_eq!(d.set_weight(0, 0), Err(DrrError::ZeroWeight));
        d.set_weight(0, 3).unwrap();
        let mut bytes = [0u64; 2];
        for _ in 0..4000 {
            let q = d.next(|_| Some(500)).unwrap();
            bytes[q] += 500;
        }
        let ratio = bytes[0] as f64 / bytes[1] as f64;
        assert!((ratio - 3.0).abs() < 0.01, "{bytes:?}");
    }

    /// Backlogged queues with the given packet sizes; returns bytes served per queue.
    fn serve(weights: &[u32], sizes: &[&[u32]], packets: usize) -> Vec<u64> {
        let mut d = Drr::new(weights, 1500).unwrap();
        let mut qs: Vec<VecDeque<u32>> =
            sizes.iter().map(|s| s.iter().copied().cycle().take(100_000).collect()).collect();
        let mut bytes = vec![0u64; weights.len()];
        for _ in 0..packets {
            let q = d.next(|i| qs[i].front().copied()).expect("backlogged");
            bytes[q] += qs[q].pop_front().unwrap() as u64;
        }
        bytes
    }

    #[test]
    fn test_backlogged_queues_share_by_weight_whatever_their_sizes() {
        let b = serve(&[1, 2, 3], &[&[64], &[1500], &[200, 9000, 700]], 60_000);
        let total: u64 = b.iter().sum();
        for (i, w) in [1.0, 2.0, 3.0].iter().enumerate() {
            let share = b[i] as f64 / total as f64;
            assert!((share - w / 6.0).abs() < 0.01, "queue {i}: share {share:.4} want {:.4}", w / 6.0);
        }
    }

    /// Runs two queues to empty; `after_first` is called once after the first send (to add
    /// packets mid-run). Returns the order of the queues that sent.
    fn run_two(
        mut qs: [VecDeque<u32>; 2],
        quantum: u32,
        after_first: impl FnOnce(&mut [VecDeque<u32>; 2]),
    ) -> Vec<usize> {
        let mut d = Drr::new(&[1, 1], quantum).unwrap();
        let mut order = Vec::new();
        let mut hook = Some(after_first);
        while let Some(q) = d.next(|i| qs[i].front().copied()) {
            order.push(q);
            qs[q].pop_front();
            if let Some(h) = hook.take() {
                h(&mut qs);
            }
        }
        assert_eq!(d.next(|_| None), None);
        order
    }

    #[test]
    fn test_empty_queues_lose_their_credit_and_yield() {
        // Queue 0: 100 credit, sends 60 (40 left, too little for the next); queue 1 (filled
        // after the first send) sends; queue 0 again with 140, and so on.
        let order = run_two([[60, 60, 60].into(), VecDeque::new()], 100, |qs| qs[1].push_back(60));
        assert_eq!(order, vec![0, 1, 0, 0]);
    }

    #[test]
    fn test_big_packet_waits_rounds_for_its_credit() {
        let order = run_two([[250].into(), [100, 100, 100, 100].into()], 100, |_| {});
        assert_eq!(order, vec![1, 1, 0, 1, 1]);
    }

    #[test]
    fn test_zero_weight_is_refused() {
        assert_eq!(Drr::new(&[1, 0], 100).unwrap_err(), DrrError::ZeroWeight);
        assert_eq!(Drr::new(&[], 100).unwrap_err(), DrrError::NoQueues);
    }
}
