//! Level 1's transmit side: one TX queue per pool in the device's packet buffer, scheduled onto
//! the wire by weighted deficit round robin, each pool shaped by a token bucket, as the 82576's
//! per-pool TX queues with its rate limiters (RTTBCNRC) and Snabb `intel_mp`'s `rate_limit` and
//! `priority` describe. A frame waits in its pool's queue until its bucket conforms; a pool
//! whose queue is full drops (counted), never the others'.
//!
//! Time is passed in (ns), so tests drive it and the caller reads its clock once per service.

use std::collections::VecDeque;

use shaping::{Drr, DrrError, RateLimiter};

/// Why a scheduler could not be built or a rate set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// bad weights
    #[error("DRR weights: {0}")]
    Weights(String),
    /// no such pool
    #[error("pool {0} is past the scheduler's pools")]
    Pool(usize),
    /// bad rate
    #[error("rate: {0}")]
    Rate(String),
}

/// What one pool's TX queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxPoolCounters {
    /// Frames sent to the wire.
    pub sent: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Frames dropped because the pool's queue was full.
    pub dropped: u64,
    /// Times the pool's head waited for its bucket.
    pub shaped: u64,
}

struct Pool {
    fifo: VecDeque<Vec<u8>>,
    bytes: usize,
    limit: RateLimiter,
    counters: TxPoolCounters,
}

/// The device's TX queues and their scheduler.
pub struct TxScheduler {
    pools: Vec<Pool>,
    drr: Drr,
    /// Bytes each pool's queue may hold (its share of the packet buffer).
    cap: usize,
}

impl TxScheduler {
    /// One queue per weight, each holding at most `cap_bytes`; `quantum` bytes of credit per
    /// weight unit and round (at least the largest frame keeps each choice O(1)).
    pub fn new(weights: &[u32], quantum: u32, cap_bytes: usize) -> Result<Self, TxError> {
        let drr = Drr::new(weights, quantum).map_err(|e: DrrError| TxError::Weights(e.to_string()))?;
        let pools = weights
            .iter()
            .map(|_| Pool {
                fifo: VecDeque::new(),
                bytes: 0,
                limit: RateLimiter::unlimited(),
                counters: TxPoolCounters::default(),
            })
            .collect();
        Ok(TxScheduler { pools, drr, cap: cap_bytes })
    }

    /// Shapes pool `pool` to `bits_per_sec` with a `burst_bytes` bucket (None: unlimited).
    pub fn set_rate(&mut self, pool: usize, rate: Option<(u64, u64)>, now: u64) -> Result<(), TxError> {
        let p = self.pools.get_mut(pool).ok_or(TxError::Pool(pool))?;
        p.limit = match rate {
            None => RateLimiter::unlimited(),
            Some((bps, burst)) => {
                RateLimiter::bits(bps, burst).map_err(|e| TxError::Rate(e.to_string()))?.starting_at(now)
            }
        };
        Ok(())
    }

    /// Gives pool `pool` DRR weight `weight` (its share of the wire when every pool is
    /// backlogged, against the others' weights).
    pub fn set_weight(&mut self, pool: usize, weight: u32) -> Result<(), TxError> {
        if pool >= self.pools.len() {
            return Err(TxError::Pool(pool));
        }
        self.drr.set_weight(pool, weight).map_err(|e| TxError::Weights(e.to_string()))
    }

    /// Queues `frame` on pool `pool`; gives it back if the pool's queue is full (counted).
    pub fn enqueue(&mut self, pool: usize, frame: Vec<u8>) -> Result<(), Vec<u8>> {
        let Some(p) = self.pools.get_mut(pool) else { return Err(frame) };
        if p.bytes + frame.len() > self.cap {
            p.counters.dropped += 1;
            return Err(frame);
        }
        p.bytes += frame.len();
        p.fifo.push_back(frame);
        Ok(())
    }

    /// The next frame the wire takes at `now`, and its pool: DRR among the pools whose head
    /// conforms to their bucket. None when every queue is empty or waits for tokens.
    pub fn next(&mut self, now: u64) -> Option<(usize, Vec<u8>)> {
        for p in &mut self.pools {
            p.limit.advance(now);
        }
        let pools = &mut self.pools;
        let i = self.drr.next(|i| {
            let p = &mut pools[i];
            let len = p.fifo.front()?.len() as u32;
            if p.limit.conforms(len) {
                Some(len)
            } else {
                p.counters.shaped += 1;
                None
            }
        })?;
        let p = &mut self.pools[i];
        let f = p.fifo.pop_front()?;
        p.limit.try_consume(f.len() as u32);
        p.bytes -= f.len();
        p.counters.sent += 1;
        p.counters.bytes += f.len() as u64;
        Some((i, f))
    }

    /// Puts a frame the wire did not take back at the head of its pool (the wire was full).
    pub fn requeue(&mut self, pool: usize, frame: Vec<u8>) {
        if let Some(p) = self.pools.get_mut(pool) {
            p.counters.sent -= 1;
            p.counters.bytes -= frame.len() as u64;
            p.bytes += frame.len();
            p.fifo.push_front(frame);
        }
    }

    /// Moves what pool `from` holds to the tail of pool `to`, in order (the pool's owner now
    /// sends from `to`: its queued frames must not be overtaken by its new ones). The queue
    /// may go past its share for a while; nothing is dropped.
    pub fn move_queued(&mut self, from: usize, to: usize) {
        if from == to || from >= self.pools.len() || to >= self.pools.len() {
            return;
        }
        let fifo = std::mem::take(&mut self.pools[from].fifo);
        let bytes = std::mem::take(&mut self.pools[from].bytes);
        let t = &mut self.pools[to];
        t.bytes += bytes;
        t.fifo.extend(fifo);
    }

    /// Nanoseconds from `now` until some waiting head conforms (None: nothing waits).
    pub fn wait_ns(&self) -> Option<u64> {
        self.pools.iter().filter_map(|p| p.fifo.front().and_then(|f| p.limit.wait_ns(f.len() as u32))).min()
    }

    /// Frames queued over all pools.
    pub fn queued(&self) -> usize {
        self.pools.iter().map(|p| p.fifo.len()).sum()
    }

    /// Pool `pool`'s counters.
    pub fn counters(&self, pool: usize) -> TxPoolCounters {
        self.pools.get(pool).map(|p| p.counters).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Vec<u8> {
        vec![0xab; len]
    }

    /// Sends everything sendable at `now`; bytes per pool.
    fn drain(s: &mut TxScheduler, now: u64, per_pool: &mut [u64]) {
        while let Some((p, f)) = s.next(now) {
            per_pool[p] += f.len() as u64;
        }
    }

    #[test]
    fn a_moved_queue_goes_behind_the_new_pools_frames_in_order() {
        let mut s = TxScheduler::new(&[1, 1], 1600, 1 << 20).unwrap();
        s.set_rate(1, Some((8_000, 64)), 0).unwrap();
        for i in 0..3u8 {
            s.enqueue(0, vec![i; 60]).unwrap();
            s.enqueue(1, vec![10 + i; 60]).unwrap();
        }
        s.move_queued(1, 0);
        let order: Vec<u8> = std::iter::from_fn(|| s.next(0)).map(|(p, f)| (p as u8) * 100 + f[0]).collect();
        assert_eq!(order, vec![0, 1, 2, 10, 11, 12], "pool 1's frames after pool 0's, unshaped now");
        assert_eq!(s.queued(), 0);
    }

    #[test]
    fn backlogged_pools_share_the_wire_by_weight_whatever_their_frame_sizes() {
        let mut s = TxScheduler::new(&[1, 3], 1600, 1 << 24).unwrap();
        for _ in 0..3000 {
            s.enqueue(0, frame(64)).unwrap();
            s.enqueue(1, frame(1500)).unwrap();
        }
        // The wire takes 400 frames; count bytes per pool.
        let mut bytes = [0u64; 2];
        for _ in 0..400 {
            let (p, f) = s.next(0).unwrap();
            bytes[p] += f.len() as u64;
        }
        let ratio = bytes[1] as f64 / bytes[0] as f64;
        assert!((2.5..3.5).contains(&ratio), "3:1 by bytes, got {bytes:?}");
    }

    #[test]
    fn a_shaped_pool_waits_for_tokens_and_does_not_hold_up_the_others() {
        let mut s = TxScheduler::new(&[1, 1], 1600, 1 << 20).unwrap();
        // Pool 1 at 8 Mbit/s (1 byte per us) with a 1500-byte bucket.
        s.set_rate(1, Some((8_000_000, 1500)), 0).unwrap();
        for _ in 0..10 {
            s.enqueue(0, frame(1000)).unwrap();
            s.enqueue(1, frame(1000)).unwrap();
        }
        let mut bytes = [0u64; 2];
        drain(&mut s, 0, &mut bytes);
        // Pool 0 goes at once; pool 1 only its bucket's worth.
        assert_eq!(bytes, [10_000, 1000]);
        assert_eq!(s.queued(), 9);
        let w = s.wait_ns().unwrap();
        assert!(w > 0 && w <= 1_000_000, "{w}");
        // At 1 byte/us after the 1500-byte bucket: the rest over the next 9 ms, no sooner.
        for ms in 1..=9u64 {
            drain(&mut s, ms * 1_000_000 - 1000, &mut bytes);
            assert!(
                bytes[1] <= 1500 + 1000 * ms,
                "{} bytes by {ms} ms (bucket 1500, then 1 byte/us)",
                bytes[1]
            );
            drain(&mut s, ms * 1_000_000 + 1000, &mut bytes);
        }
        assert_eq!(bytes[1], 10_000);
        assert!(s.counters(1).shaped > 0);
        assert_eq!(s.wait_ns(), None);
    }

    #[test]
    fn a_full_pool_drops_its_own_frames_only() {
        let mut s = TxScheduler::new(&[1, 1], 1600, 3000).unwrap();
        for _ in 0..5 {
            let _ = s.enqueue(1, frame(1000));
        }
        assert_eq!(s.counters(1).dropped, 2);
        assert!(s.enqueue(0, frame(1000)).is_ok());
        let (p, f) = s.next(0).unwrap();
        s.requeue(p, f);
        assert_eq!(s.queued(), 4);
        assert!(TxScheduler::new(&[], 1600, 1).is_err());
        assert!(s.set_rate(5, None, 0).is_err());
    }
}
