//! Token buckets with exact integer arithmetic.
//!
//! A bucket holds credit in nano-tokens (tokens × 10⁹), so a refill of `dt` nanoseconds at
//! `rate` tokens per second adds exactly `dt × rate` nano-tokens: no rounding, no drift, however
//! the refills are sliced. Over any interval of `t` seconds a bucket never hands out more than
//! `burst + one_time_burst + rate × t` tokens (a property test checks it).

use std::fmt;

use crate::clock::NANOS_PER_SEC;

const SCALE: u128 = NANOS_PER_SEC as u128;

/// Why a bucket could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketError {
    /// The rate is zero (use no bucket for "unlimited", or drop everything explicitly).
    ZeroRate,
    /// The burst is zero: nothing could ever pass.
    ZeroBurst,
}

impl fmt::Display for BucketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BucketError::ZeroRate => write!(f, "a rate must be greater than zero"),
            BucketError::ZeroBurst => write!(f, "a burst must be greater than zero"),
        }
    }
}

impl std::error::Error for BucketError {}

/// Credit up to a capacity, in nano-tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tank {
    credit: u128,
    cap: u128,
}

impl Tank {
    /// A full tank of `cap` tokens.
    pub(crate) fn full(cap: u64) -> Self {
        Tank { credit: cap as u128 * SCALE, cap: cap as u128 * SCALE }
    }

    /// Adds credit; returns what did not fit.
    pub(crate) fn fill(&mut self, credit: u128) -> u128 {
        let room = self.cap - self.credit;
        let add = credit.min(room);
        self.credit += add;
        credit - add
    }

    /// Whole tokens held.
    pub(crate) fn tokens(&self) -> u64 {
        (self.credit / SCALE) as u64
    }

    /// Takes `n` tokens if there are that many.
    pub(crate) fn try_take(&mut self, n: u64) -> bool {
        let need = n as u128 * SCALE;
        if self.credit >= need {
            self.credit -= need;
            true
        } else {
            false
        }
    }

    /// Capacity in whole tokens.
    pub(crate) fn cap(&self) -> u64 {
        (self.cap / SCALE) as u64
    }

    /// Changes the capacity, keeping the credit (clamped).
    pub(crate) fn resize(&mut self, cap: u64) {
        self.cap = cap as u128 * SCALE;
        self.credit = self.credit.min(self.cap);
    }

    /// Nano-tokens missing for `n` tokens.
    pub(crate) fn shortfall(&self, n: u64) -> u128 {
        (n as u128 * SCALE).saturating_sub(self.credit)
    }
}

/// Credit earned in `dt` nanoseconds at `rate` tokens per second, in nano-tokens.
pub(crate) fn earned(dt: u64, rate: u64) -> u128 {
    (dt as u128).saturating_mul(rate as u128)
}

/// A token bucket: `rate` tokens per second up to `burst`, plus an optional one-time credit that
/// is spent first and never refilled (a guest's boot-time allowance, as in Firecracker).
/// Starts full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    tank: Tank,
    rate: u64,
    one_time: u64,
    last_ns: u64,
}

impl TokenBucket {
    /// `rate` tokens per second, at most `burst` held.
    pub fn new(rate: u64, burst: u64) -> Result<Self, BucketError> {
        if rate == 0 {
            return Err(BucketError::ZeroRate);
        }
        if burst == 0 {
            return Err(BucketError::ZeroBurst);
        }
        Ok(TokenBucket { tank: Tank::full(burst), rate, one_time: 0, last_ns: 0 })
    }

    /// Adds a one-time credit of `n` tokens, spent before the refilled ones.
    pub fn with_one_time_burst(mut self, n: u64) -> Self {
        self.one_time = n;
        self
    }

    /// Starts the refill clock at `now_ns` (a bucket built long after the clock's origin
    /// would otherwise count the time before it as idle; it starts full either way).
    pub fn starting_at(mut self, now_ns: u64) -> Self {
        self.last_ns = now_ns;
        self
    }

    /// Tokens per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Capacity.
    pub fn burst(&self) -> u64 {
        self.tank.cap()
    }

    /// One-time credit left.
    pub fn one_time_left(&self) -> u64 {
        self.one_time
    }

    /// Refills for the time since the last call. Time that goes backwards is ignored.
    #[inline]
    pub fn advance(&mut self, now_ns: u64) {
        if now_ns > self.last_ns {
            self.tank.fill(earned(now_ns - self.last_ns, self.rate));
            self.last_ns = now_ns;
        }
    }

    /// Whole tokens available now (one-time credit included).
    pub fn tokens(&self) -> u64 {
        self.tank.tokens().saturating_add(self.one_time)
    }

    /// Whether `n` tokens are available.
    #[inline]
    pub fn can_take(&self, n: u64) -> bool {
        n <= self.one_time || self.tank.shortfall(n - self.one_time) == 0
    }

    /// Takes `n` tokens if available (one-time credit first); false leaves the bucket as it was.
    #[inline]
    pub fn try_take(&mut self, n: u64) -> bool {
        if n <= self.one_time {
            self.one_time -= n;
            return true;
        }
        if self.tank.try_take(n - self.one_time) {
            self.one_time = 0;
            return true;
        }
        false
    }

    /// Nanoseconds until `n` tokens are available, or `None` if they never will be (more than
    /// the bucket can hold).
    pub fn wait_ns(&self, n: u64) -> Option<u64> {
        let n = n.saturating_sub(self.one_time);
        if n > self.tank.cap() {
            return None;
        }
        let short = self.tank.shortfall(n);
        Some(short.div_ceil(self.rate as u128).min(u64::MAX as u128) as u64)
    }

    /// Whether `n` tokens could ever be available at once.
    pub fn can_ever_take(&self, n: u64) -> bool {
        n <= self.tank.cap().saturating_add(self.one_time)
    }

    /// Changes rate and burst at run time; credit already earned is kept (up to the new burst).
    pub fn set(&mut self, rate: u64, burst: u64) -> Result<(), BucketError> {
        if rate == 0 {
            return Err(BucketError::ZeroRate);
        }
        if burst == 0 {
            return Err(BucketError::ZeroBurst);
        }
        self.rate = rate;
        self.tank.resize(burst);
        Ok(())
    }
}

/// A byte bucket and a packet bucket, consumed together: a packet passes only if both have
/// room, and then takes from both. Bytes are counted in bits so bit rates are exact. With
/// neither bucket it passes everything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimiter {
    bits: Option<TokenBucket>,
    packets: Option<TokenBucket>,
}

impl RateLimiter {
    /// No limit.
    pub fn unlimited() -> Self {
        RateLimiter::default()
    }

    /// A limit of `bits_per_sec`, with bursts of up to `burst_bytes`.
    pub fn bits(bits_per_sec: u64, burst_bytes: u64) -> Result<Self, BucketError> {
        Ok(RateLimiter {
            bits: Some(TokenBucket::new(bits_per_sec, burst_bytes.saturating_mul(8))?),
            packets: None,
        })
    }

    /// Adds (or replaces) a packet limit.
    pub fn with_packets(mut self, per_sec: u64, burst: u64) -> Result<Self, BucketError> {
        self.packets = Some(TokenBucket::new(per_sec, burst)?);
        Ok(self)
    }

    /// Adds one-time credit: `bytes` to the byte bucket, `packets` to the packet bucket.
    pub fn with_one_time_burst(mut self, bytes: u64, packets: u64) -> Self {
        self.bits = self.bits.map(|b| b.with_one_time_burst(bytes.saturating_mul(8)));
        self.packets = self.packets.map(|b| b.with_one_time_burst(packets));
        self
    }

    /// Starts both refill clocks at `now_ns`.
    pub fn starting_at(mut self, now_ns: u64) -> Self {
        self.bits = self.bits.map(|b| b.starting_at(now_ns));
        self.packets = self.packets.map(|b| b.starting_at(now_ns));
        self
    }

    /// The byte bucket (in bits).
    pub fn bit_bucket(&self) -> Option<&TokenBucket> {
        self.bits.as_ref()
    }

    /// The packet bucket.
    pub fn packet_bucket(&self) -> Option<&TokenBucket> {
        self.packets.as_ref()
    }

    /// Whether this limits anything.
    pub fn is_limited(&self) -> bool {
        self.bits.is_some() || self.packets.is_some()
    }

    /// Refills both buckets.
    #[inline]
    pub fn advance(&mut self, now_ns: u64) {
        if let Some(b) = &mut self.bits {
            b.advance(now_ns);
        }
        if let Some(b) = &mut self.packets {
            b.advance(now_ns);
        }
    }

    /// Whether a packet of `len` bytes conforms now.
    #[inline]
    pub fn conforms(&self, len: u32) -> bool {
        self.bits.as_ref().is_none_or(|b| b.can_take(len as u64 * 8))
            && self.packets.as_ref().is_none_or(|b| b.can_take(1))
    }

    /// Takes a packet of `len` bytes if it conforms; false leaves both buckets as they were.
    #[inline]
    pub fn try_consume(&mut self, len: u32) -> bool {
        self.try_consume_n(len, 1)
    }

    /// Takes `packets` packets of `len` bytes in all (a frame the receiver sees as several,
    /// e.g. a TCP segmentation request) if they conform; false leaves both buckets as they
    /// were.
    #[inline]
    pub fn try_consume_n(&mut self, len: u32, packets: u32) -> bool {
        let (bits, pkts) = (len as u64 * 8, packets as u64);
        match (&mut self.bits, &mut self.packets) {
            // The usual cases: one bucket, one pass.
            (Some(b), None) => return b.try_take(bits),
            (None, Some(p)) => return p.try_take(pkts),
            (None, None) => return true,
            (Some(b), Some(p)) => {
                if !(b.can_take(bits) && p.can_take(pkts)) {
                    return false;
                }
            }
        }
        if let Some(b) = &mut self.bits {
            b.try_take(bits);
        }
        if let Some(b) = &mut self.packets {
            b.try_take(pkts);
        }
        true
    }

    /// Nanoseconds until a packet of `len` bytes conforms; `None` if it never can.
    pub fn wait_ns(&self, len: u32) -> Option<u64> {
        let a = match &self.bits {
            Some(b) => b.wait_ns(len as u64 * 8)?,
            None => 0,
        };
        let p = match &self.packets {
            Some(b) => b.wait_ns(1)?,
            None => 0,
        };
        Some(a.max(p))
    }

    /// Whether a packet of `len` bytes could ever conform.
    pub fn can_ever_pass(&self, len: u32) -> bool {
        self.bits.as_ref().is_none_or(|b| b.can_ever_take(len as u64 * 8))
    }

    /// Takes over another limiter's rates and bursts, keeping the credit this one has earned
    /// (a run-time change should not hand out a fresh burst, nor take away earned credit).
    pub fn retune(&mut self, to: RateLimiter) {
        fn merge(old: Option<TokenBucket>, new: Option<TokenBucket>) -> Option<TokenBucket> {
            match (old, new) {
                (Some(mut o), Some(n)) => {
                    // Cannot fail: `n` was built with a valid rate and burst.
                    let _ = o.set(n.rate(), n.burst());
                    Some(o)
                }
                (_, n) => n,
            }
        }
        self.bits = merge(self.bits, to.bits);
        self.packets = merge(self.packets, to.packets);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn test_bucket_starts_full_and_refills_at_rate() {
        let mut b = TokenBucket::new(1000, 100).unwrap();
        assert_eq!(b.tokens(), 100);
        assert!(b.try_take(100));
        assert!(!b.try_take(1));
        b.advance(10 * MS); // 10 ms at 1000/s = 10 tokens
        assert_eq!(b.tokens(), 10);
        b.advance(10 * NANOS_PER_SEC);
        assert_eq!(b.tokens(), 100, "capped at the burst");
    }

    #[test]
    fn test_fractional_refills_add_up_exactly() {
        // 3 tokens/s refilled every 1 ns for a second: each step earns 3 nano-tokens.
        let mut b = TokenBucket::new(3, 10).unwrap();
        assert!(b.try_take(10));
        let mut t = 0;
        for _ in 0..1_000_000 {
            t += 1000;
            b.advance(t);
        }
        assert_eq!(b.tokens(), 3);
    }

    #[test]
    fn test_failed_take_changes_nothing() {
        let mut b = TokenBucket::new(10, 5).unwrap().with_one_time_burst(3);
        let before = b;
        assert!(!b.try_take(9));
        assert_eq!(b, before);
        assert!(b.try_take(8), "one-time credit and the bucket together");
        assert_eq!(b.tokens(), 0);
        assert_eq!(b.one_time_left(), 0);
    }

    #[test]
    fn test_one_time_burst_is_spent_first_and_never_refilled() {
        let mut b = TokenBucket::new(1000, 10).unwrap().with_one_time_burst(50);
        assert_eq!(b.tokens(), 60);
        assert!(b.try_take(50));
        assert_eq!(b.one_time_left(), 0);
        assert_eq!(b.tokens(), 10);
        b.advance(NANOS_PER_SEC);
        assert_eq!(b.tokens(), 10);
    }

    #[test]
    fn test_wait_ns_is_the_exact_time_to_conform() {
        let mut b = TokenBucket::new(1000, 100).unwrap();
        assert!(b.try_take(100));
        assert_eq!(b.wait_ns(0), Some(0));
        let w = b.wait_ns(7).unwrap();
        assert_eq!(w, 7 * MS);
        b.advance(w - 1);
        assert!(!b.can_take(7));
        b.advance(w);
        assert!(b.can_take(7));
        assert_eq!(b.wait_ns(101), None, "more than the bucket holds never conforms");
    }

    #[test]
    fn test_time_going_backwards_earns_nothing() {
        let mut b = TokenBucket::new(1000, 100).unwrap().starting_at(50 * MS);
        assert!(b.try_take(100));
        b.advance(10 * MS);
        assert_eq!(b.tokens(), 0);
        b.advance(51 * MS);
        assert_eq!(b.tokens(), 1);
    }

    #[test]
    fn test_zero_rate_or_burst_is_refused_with_a_reason() {
        assert_eq!(TokenBucket::new(0, 1).unwrap_err(), BucketError::ZeroRate);
        assert_eq!(TokenBucket::new(1, 0).unwrap_err(), BucketError::ZeroBurst);
        assert!(BucketError::ZeroBurst.to_string().contains("burst"));
    }

    #[test]
    fn test_set_keeps_credit_up_to_the_new_burst() {
        let mut b = TokenBucket::new(1000, 100).unwrap();
        b.set(2000, 40).unwrap();
        assert_eq!(b.tokens(), 40);
        assert!(b.try_take(40));
        b.advance(10 * MS);
        assert_eq!(b.tokens(), 20, "new rate applies");
    }

    #[test]
    fn test_limiter_needs_both_buckets() {
        // 8000 bit/s = 1000 B/s, burst 1500 B; 2 packets/s, burst 2.
        let mut l = RateLimiter::bits(8000, 1500).unwrap().with_packets(2, 2).unwrap();
        assert!(l.try_consume(100));
        assert!(l.try_consume(100));
        assert!(!l.try_consume(100), "packet bucket empty though bytes remain");
        l.advance(NANOS_PER_SEC / 2);
        assert!(l.try_consume(1000), "one packet earned");
        assert!(!l.try_consume(1), "bytes remain but the packet bucket is empty again");
        // 1300 B left + 500 B earned, capped at 1500, minus 1000.
        assert_eq!(l.bit_bucket().unwrap().tokens(), 500 * 8);
    }

    #[test]
    fn test_unlimited_passes_everything() {
        let mut l = RateLimiter::unlimited();
        assert!(!l.is_limited());
        for _ in 0..1000 {
            assert!(l.try_consume(9000));
        }
        assert_eq!(l.wait_ns(9000), Some(0));
    }

    #[test]
    fn test_retune_keeps_earned_credit() {
        let mut l = RateLimiter::bits(8_000_000, 10_000).unwrap();
        assert!(l.try_consume(6000));
        l.retune(RateLimiter::bits(16_000_000, 20_000).unwrap());
        assert_eq!(l.bit_bucket().unwrap().tokens(), 4000 * 8, "no fresh burst");
        assert_eq!(l.bit_bucket().unwrap().rate(), 16_000_000);
        l.retune(RateLimiter::unlimited());
        assert!(!l.is_limited());
    }
}
