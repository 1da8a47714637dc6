//! A shaper: packets within the rate go at once, the rest wait in a bounded FIFO and are
//! released as tokens come back; a full FIFO drops the newcomer (drop-tail) and counts it.
//!
//! The FIFO's storage is allocated when the shaper is built and never grows, so offering and
//! releasing never allocate. What an item is belongs to the caller: the switch queues
//! "used-ring entries written but not yet shown to the guest", so a waiting packet has been
//! copied once, into its receiver's own buffer, and is never copied again.

use std::collections::VecDeque;

use crate::bucket::RateLimiter;

/// What became of an offered packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<T> {
    /// Within the rate and nothing waiting ahead of it: send it now.
    Send(T),
    /// Queued; [`Shaper::release`] hands it back when its turn and its tokens come.
    Queued,
    /// Dropped: the queue is full (or the packet is larger than the bucket can ever hold).
    Dropped(T),
}

/// Counters of a shaper.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShaperCounters {
    /// Packets sent at once.
    pub sent_direct: u64,
    /// Packets that had to wait.
    pub queued: u64,
    /// Waiting packets released.
    pub released: u64,
    /// Packets dropped at the tail.
    pub dropped: u64,
    /// Bytes of dropped packets.
    pub dropped_bytes: u64,
    /// Bytes sent (directly or released).
    pub sent_bytes: u64,
}

/// A rate limiter in front of a bounded FIFO of `T`.
#[derive(Debug)]
pub struct Shaper<T> {
    limiter: RateLimiter,
    queue: VecDeque<(T, u32)>,
    limit_pkts: usize,
    limit_bytes: u64,
    queued_bytes: u64,
    /// Counters.
    pub counters: ShaperCounters,
}

impl<T> Shaper<T> {
    /// A shaper that holds at most `limit_pkts` packets and `limit_bytes` bytes waiting.
    pub fn new(limiter: RateLimiter, limit_pkts: usize, limit_bytes: u64) -> Self {
        Self::with_capacity(limiter, limit_pkts, limit_pkts, limit_bytes)
    }

    /// As `new`, with room for `capacity` waiting packets allocated now, so a later `retune`
    /// may raise the packet limit up to it without allocating.
    pub fn with_capacity(limiter: RateLimiter, capacity: usize, limit_pkts: usize, limit_bytes: u64) -> Self {
        let limit_pkts = limit_pkts.min(capacity);
        Shaper {
            limiter,
            queue: VecDeque::with_capacity(capacity),
            limit_pkts,
            limit_bytes,
            queued_bytes: 0,
            counters: ShaperCounters::default(),
        }
    }

    /// The rate limiter.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Changes the rates, keeping earned credit and whatever waits. A smaller packet limit
    /// applies to newcomers; packets already waiting stay (they are in the caller's hands).
    pub fn retune(&mut self, limiter: RateLimiter, limit_pkts: usize, limit_bytes: u64) {
        self.limiter.retune(limiter);
        // Never grow the FIFO's storage here: it may run on the datapath. A larger limit than
        // the storage is capped at it.
        self.limit_pkts = limit_pkts.min(self.queue.capacity());
        self.limit_bytes = limit_bytes;
    }

    /// Refills the buckets (once per burst).
    #[inline]
    pub fn advance(&mut self, now_ns: u64) {
        self.limiter.advance(now_ns);
    }

    /// Offers a packet of `len` bytes.
    #[inline]
    pub fn offer(&mut self, len: u32, item: T) -> Offer<T> {
        if self.queue.is_empty() && self.limiter.try_consume(len) {
            self.counters.sent_direct += 1;
            self.counters.sent_bytes += len as u64;
            return Offer::Send(item);
        }
        if self.queue.len() >= self.limit_pkts
            || self.queued_bytes + len as u64 > self.limit_bytes
            || !self.limiter.can_ever_pass(len)
        {
            self.counters.dropped += 1;
            self.counters.dropped_bytes += len as u64;
            return Offer::Dropped(item);
        }
        self.queue.push_back((item, len));
        self.queued_bytes += len as u64;
        self.counters.queued += 1;
        Offer::Queued
    }

    /// Whether a packet of `len` bytes offered now would be dropped (to decide before doing the
    /// work a queued packet needs, such as copying it).
    #[inline]
    pub fn would_drop(&self, len: u32) -> bool {
        if self.queue.is_empty() && self.limiter.conforms(len) {
            return false;
        }
        self.queue.len() >= self.limit_pkts
            || self.queued_bytes + len as u64 > self.limit_bytes
            || !self.limiter.can_ever_pass(len)
    }

    /// The oldest waiting packet, if the tokens for it are there (taking them).
    #[inline]
    pub fn release(&mut self) -> Option<T> {
        let &(_, len) = self.queue.front()?;
        if !self.limiter.try_consume(len) {
            return None;
        }
        let (item, _) = self.queue.pop_front()?;
        self.queued_bytes -= len as u64;
        self.counters.released += 1;
        self.counters.sent_bytes += len as u64;
        Some(item)
    }

    /// Nanoseconds until the oldest waiting packet may go; `None` when nothing waits.
    pub fn next_release_ns(&self) -> Option<u64> {
        let &(_, len) = self.queue.front()?;
        Some(self.limiter.wait_ns(len).unwrap_or(u64::MAX))
    }

    /// The newest waiting packet, to amend (e.g. attach something that must leave with it).
    pub fn back_mut(&mut self) -> Option<&mut T> {
        self.queue.back_mut().map(|(t, _)| t)
    }

    /// Everything waiting, oldest first, without tokens (the shaper is going away, or its
    /// queue is being handed elsewhere). Not counted as released.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.queued_bytes = 0;
        self.queue.drain(..).map(|(t, _)| t)
    }

    /// Packets waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Bytes waiting.
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::NANOS_PER_SEC;

    fn shaper(limit: usize) -> Shaper<u32> {
        // 8000 bit/s = 1000 B/s, burst 1000 B.
        Shaper::new(RateLimiter::bits(8000, 1000).unwrap(), limit, 1 << 20)
    }

    #[test]
    fn test_conforming_packets_go_at_once() {
        let mut s = shaper(4);
        assert_eq!(s.offer(500, 1), Offer::Send(1));
        assert_eq!(s.offer(500, 2), Offer::Send(2));
        assert_eq!(s.offer(500, 3), Offer::Queued);
        assert_eq!(s.counters.sent_direct, 2);
    }

    #[test]
    fn test_queue_is_bounded_and_drops_at_the_tail() {
        let mut s = shaper(3);
        assert_eq!(s.offer(1000, 0), Offer::Send(0));
        for i in 1..=3 {
            assert_eq!(s.offer(100, i), Offer::Queued);
        }
        assert_eq!(s.offer(100, 4), Offer::Dropped(4));
        assert!(s.would_drop(100));
        assert_eq!((s.len(), s.counters.dropped, s.counters.dropped_bytes), (3, 1, 100));
    }

    #[test]
    fn test_byte_limit_bounds_the_queue_too() {
        let mut s = Shaper::new(RateLimiter::bits(8000, 1000).unwrap(), 100, 250);
        assert_eq!(s.offer(1000, 0), Offer::Send(0));
        assert_eq!(s.offer(200, 1), Offer::Queued);
        assert_eq!(s.offer(100, 2), Offer::Dropped(2), "200 + 100 > 250 bytes");
        assert_eq!(s.offer(50, 3), Offer::Queued);
        assert_eq!(s.queued_bytes(), 250);
    }

    #[test]
    fn test_nothing_overtakes_a_waiting_packet() {
        let mut s = shaper(8);
        assert_eq!(s.offer(900, 0), Offer::Send(0));
        assert_eq!(s.offer(500, 1), Offer::Queued);
        // 100 B of tokens remain: a small packet would conform, but must wait its turn.
        assert_eq!(s.offer(50, 2), Offer::Queued);
        assert_eq!(s.release(), None);
        s.advance(NANOS_PER_SEC * 4 / 10); // +400 B = 500
        assert_eq!(s.release(), Some(1));
        assert_eq!(s.release(), None, "0 B left for the 50 B packet");
        assert_eq!(s.next_release_ns(), Some(NANOS_PER_SEC / 20));
        s.advance(NANOS_PER_SEC * 45 / 100);
        assert_eq!(s.release(), Some(2));
        assert_eq!(s.next_release_ns(), None);
    }

    #[test]
    fn test_oversize_packet_is_dropped_not_stuck() {
        let mut s = shaper(8);
        assert_eq!(s.offer(1000, 0), Offer::Send(0));
        assert_eq!(s.offer(1001, 1), Offer::Dropped(1), "it could never conform");
    }

    #[test]
    fn test_release_rate_matches_the_limit_under_overload() {
        // 1 Mbit/s, offered 1500 B every 1 ms (12 Mbit/s) for 60 simulated seconds; release
        // polled every 100 µs.
        let mut s: Shaper<()> = Shaper::new(RateLimiter::bits(1_000_000, 3000).unwrap(), 64, 1 << 20);
        let (mut t, mut sent) = (0u64, 0u64);
        while t < 60 * NANOS_PER_SEC {
            s.advance(t);
            while s.release().is_some() {
                sent += 1500;
            }
            if t % 1_000_000 == 0 {
                if let Offer::Send(()) = s.offer(1500, ()) {
                    sent += 1500;
                }
            }
            t += 100_000;
        }
        let want = 1_000_000 / 8 * 60 + 3000;
        let err = (sent as f64 - want as f64).abs() / want as f64;
        assert!(err < 0.01, "sent {sent} want {want}");
        assert!(s.counters.dropped > 0);
        assert!(s.len() <= 64);
    }

    #[test]
    fn test_drain_hands_back_everything_in_order() {
        let mut s = shaper(8);
        s.offer(1000, 0);
        s.offer(10, 1);
        s.offer(10, 2);
        assert_eq!(s.drain().collect::<Vec<_>>(), vec![1, 2]);
        assert!(s.is_empty());
        assert_eq!(s.queued_bytes(), 0);
    }

    #[test]
    fn test_retune_never_grows_the_storage() {
        let mut s = shaper(2);
        let cap = s.queue.capacity();
        s.retune(RateLimiter::bits(16000, 1000).unwrap(), 10_000, 1 << 20);
        assert_eq!(s.queue.capacity(), cap);
        assert!(s.limit_pkts <= cap);
    }
}

#[cfg(test)]
mod retune_tests {
    use super::*;

    #[test]
    fn test_lowered_limit_bounds_newcomers() {
        let mut s: Shaper<u32> =
            Shaper::with_capacity(RateLimiter::bits(30_000_000, 37_500).unwrap(), 4096, 256, u64::MAX);
        s.retune(RateLimiter::bits(100_000, 18_440).unwrap(), 100, u64::MAX);
        let queued = (0..300).filter(|&i| s.offer(1000, i) == Offer::Queued).count();
        assert_eq!(s.len(), 100);
        assert_eq!(queued, 100);
    }
}
