//! Policers: meter each packet, colour it, and let the caller drop the red ones.
//!
//! Colour-blind meters only (every packet arrives uncoloured, as from a guest):
//! - single rate: a [`RateLimiter`]; conforming packets are green, the rest red;
//! - [`SrTcm`], RFC 2697: one rate (CIR) filling a committed bucket (CBS) whose overflow fills
//!   an excess bucket (EBS);
//! - [`TrTcm`], RFC 4115: a committed (CIR/CBS) and an excess (EIR/EBS) bucket filled
//!   independently; unlike RFC 2698 a green packet takes only committed tokens and a yellow
//!   one only excess tokens.
//!
//! Rates are in bits per second and bucket sizes in bytes; both buckets start full.

use crate::bucket::{earned, BucketError, RateLimiter, Tank};

/// A packet's colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Colour {
    /// Within the committed rate.
    Green,
    /// Above the committed rate, within the excess allowance.
    Yellow,
    /// Exceeds everything: drop it.
    Red,
}

/// What both RFC meters share: a committed (C) and an excess (E) bucket, in bits, both
/// starting full, the time of the last refill, and the colour-blind rule: green if C covers
/// the packet (taking from it alone), else yellow if E does (taking from it alone), else red
/// (taking nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TwoBuckets {
    c: Tank,
    e: Tank,
    last_ns: u64,
}

impl TwoBuckets {
    /// CIR must be non-zero and CBS (bytes) too; EBS 0 means no yellow.
    fn new(cir_bps: u64, cbs: u64, ebs: u64) -> Result<Self, BucketError> {
        if cir_bps == 0 {
            return Err(BucketError::ZeroRate);
        }
        if cbs == 0 {
            return Err(BucketError::ZeroBurst);
        }
        Ok(TwoBuckets { c: Tank::full(cbs * 8), e: Tank::full(ebs * 8), last_ns: 0 })
    }

    /// Nanoseconds since the last refill (moving the refill time), if time moved forward.
    #[inline(always)]
    fn elapsed(&mut self, now_ns: u64) -> Option<u64> {
        let dt = now_ns.checked_sub(self.last_ns).filter(|&d| d > 0)?;
        self.last_ns = now_ns;
        Some(dt)
    }

    #[inline(always)]
    fn colour(&mut self, len: u32) -> Colour {
        let bits = len as u64 * 8;
        if self.c.try_take(bits) {
            Colour::Green
        } else if self.e.try_take(bits) {
            Colour::Yellow
        } else {
            Colour::Red
        }
    }

    fn tokens(&self) -> (u64, u64) {
        (self.c.tokens() / 8, self.e.tokens() / 8)
    }
}

/// Single-rate three-colour marker (RFC 2697), colour-blind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SrTcm {
    cir: u64,
    b: TwoBuckets,
}

impl SrTcm {
    /// CIR in bits/s, CBS and EBS in bytes (CBS must be non-zero; EBS 0 means no yellow).
    pub fn new(cir_bps: u64, cbs: u64, ebs: u64) -> Result<Self, BucketError> {
        Ok(SrTcm { cir: cir_bps, b: TwoBuckets::new(cir_bps, cbs, ebs)? })
    }

    /// Refills: the committed bucket first, its overflow into the excess bucket.
    #[inline]
    pub fn advance(&mut self, now_ns: u64) {
        if let Some(dt) = self.b.elapsed(now_ns) {
            let over = self.b.c.fill(earned(dt, self.cir));
            self.b.e.fill(over);
        }
    }

    /// Colours a packet of `len` bytes and takes its tokens.
    #[inline]
    pub fn colour(&mut self, len: u32) -> Colour {
        self.b.colour(len)
    }

    /// Bytes in the committed and excess buckets.
    pub fn tokens(&self) -> (u64, u64) {
        self.b.tokens()
    }
}

/// Two-rate three-colour marker (RFC 4115), colour-blind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrTcm {
    cir: u64,
    eir: u64,
    b: TwoBuckets,
}

impl TrTcm {
    /// CIR and EIR in bits/s, CBS and EBS in bytes. CIR and CBS must be non-zero; EIR or EBS
    /// 0 means no yellow.
    pub fn new(cir_bps: u64, cbs: u64, eir_bps: u64, ebs: u64) -> Result<Self, BucketError> {
        Ok(TrTcm { cir: cir_bps, eir: eir_bps, b: TwoBuckets::new(cir_bps, cbs, ebs)? })
    }

    /// Refills both buckets, each at its own rate.
    #[inline]
    pub fn advance(&mut self, now_ns: u64) {
        if let Some(dt) = self.b.elapsed(now_ns) {
            self.b.c.fill(earned(dt, self.cir));
            self.b.e.fill(earned(dt, self.eir));
        }
    }

    /// Colours a packet of `len` bytes and takes its tokens.
    #[inline]
    pub fn colour(&mut self, len: u32) -> Colour {
        self.b.colour(len)
    }

    /// Bytes in the committed and excess buckets.
    pub fn tokens(&self) -> (u64, u64) {
        self.b.tokens()
    }
}

/// Packets and bytes by colour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicerCounters {
    /// Green packets.
    pub green: u64,
    /// Yellow packets.
    pub yellow: u64,
    /// Red packets (dropped by the caller).
    pub red: u64,
    /// Bytes of red packets.
    pub red_bytes: u64,
}

/// A policer: one of the meters, with counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policer {
    /// Token bucket(s): conforming green, the rest red.
    Single(RateLimiter),
    /// RFC 2697.
    SrTcm(SrTcm),
    /// RFC 4115.
    TrTcm(TrTcm),
}

impl Policer {
    /// Refills (once per burst).
    #[inline]
    pub fn advance(&mut self, now_ns: u64) {
        match self {
            Policer::Single(l) => l.advance(now_ns),
            Policer::SrTcm(m) => m.advance(now_ns),
            Policer::TrTcm(m) => m.advance(now_ns),
        }
    }

    /// Colours a packet of `len` bytes.
    #[inline]
    pub fn colour(&mut self, len: u32) -> Colour {
        self.colour_n(len, 1)
    }

    /// Colours `packets` packets of `len` bytes in all as one (they pass or go together): a
    /// segmentation request is charged for every segment it becomes. The three-colour markers
    /// count bytes only.
    #[inline]
    pub fn colour_n(&mut self, len: u32, packets: u32) -> Colour {
        match self {
            Policer::Single(l) => {
                if l.try_consume_n(len, packets) {
                    Colour::Green
                } else {
                    Colour::Red
                }
            }
            Policer::SrTcm(m) => m.colour(len),
            Policer::TrTcm(m) => m.colour(len),
        }
    }

    /// Colours a packet and counts it.
    #[inline]
    pub fn police(&mut self, len: u32, counters: &mut PolicerCounters) -> Colour {
        let c = self.colour(len);
        match c {
            Colour::Green => counters.green += 1,
            Colour::Yellow => counters.yellow += 1,
            Colour::Red => {
                counters.red += 1;
                counters.red_bytes += len as u64;
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::NANOS_PER_SEC;

    const MS: u64 = 1_000_000;

    fn colours(p: &mut Policer, sizes: &[u32]) -> Vec<Colour> {
        sizes.iter().map(|&s| p.colour(s)).collect()
    }

    // RFC 2697 section 3: with both buckets full, packets take committed tokens while they
    // last, then excess tokens, then are red; refills go to C until full, then to E.
    #[test]
    fn test_srtcm_colours_follow_rfc2697() {
        use Colour::*;
        // CIR 8000 bit/s = 1000 B/s, CBS 1000 B, EBS 500 B.
        let mut m = SrTcm::new(8000, 1000, 500).unwrap();
        let got: Vec<_> = [600, 400, 300, 300, 1].iter().map(|&s| m.colour(s)).collect();
        assert_eq!(got, vec![Green, Green, Yellow, Red, Yellow]);
        assert_eq!(m.tokens(), (0, 199));
        // 1.2 s at 1000 B/s: 1000 B fill C, the remaining 200 B overflow into E (capped 500).
        m.advance(1200 * MS);
        assert_eq!(m.tokens(), (1000, 399));
        // A packet larger than either bucket is red and takes nothing.
        assert_eq!(m.colour(1001), Red);
        assert_eq!(m.colour(399), Green);
        m.advance(1200 * MS + NANOS_PER_SEC * 10);
        assert_eq!(m.tokens(), (1000, 500), "both capped");
    }

    #[test]
    fn test_srtcm_with_no_excess_bucket_is_two_colour() {
        let mut p = Policer::SrTcm(SrTcm::new(8000, 100, 0).unwrap());
        assert_eq!(colours(&mut p, &[100, 1]), vec![Colour::Green, Colour::Red]);
        p.advance(NANOS_PER_SEC);
        assert_eq!(colours(&mut p, &[100, 1]), vec![Colour::Green, Colour::Red]);
    }

    // RFC 4115 section 3 (colour-blind): green takes only from C, yellow only from E, and the
    // buckets fill independently at CIR and EIR.
    #[test]
    fn test_trtcm_colours_follow_rfc4115() {
        use Colour::*;
        // CIR 1000 B/s CBS 1000 B; EIR 500 B/s EBS 2000 B.
        let mut m = TrTcm::new(8000, 1000, 4000, 2000).unwrap();
        let got: Vec<_> = [1000, 1500, 600, 400, 101].iter().map(|&s| m.colour(s)).collect();
        assert_eq!(got, vec![Green, Yellow, Red, Yellow, Red]);
        assert_eq!(m.tokens(), (0, 100));
        m.advance(NANOS_PER_SEC);
        assert_eq!(m.tokens(), (1000, 600), "each bucket at its own rate");
        // RFC 2698 would also take the green packet's tokens from the peak bucket; 4115 not.
        assert_eq!(m.colour(1000), Green);
        assert_eq!(m.tokens(), (0, 600));
    }

    #[test]
    fn test_single_rate_policer_counts_colours() {
        let mut p = Policer::Single(RateLimiter::bits(8000, 1000).unwrap());
        let mut c = PolicerCounters::default();
        for _ in 0..15 {
            p.police(100, &mut c);
        }
        assert_eq!((c.green, c.yellow, c.red, c.red_bytes), (10, 0, 5, 500));
    }

    #[test]
    fn test_policer_long_run_passes_the_committed_rate() {
        // 10 Mbit/s, 64 KiB burst, offered 4x: over 100 simulated seconds green bytes are the
        // rate times the time plus the first burst.
        let mut p = Policer::SrTcm(SrTcm::new(10_000_000, 65536, 0).unwrap());
        let mut c = PolicerCounters::default();
        let (mut t, mut green_bytes) = (0u64, 0u64);
        while t < 100 * NANOS_PER_SEC {
            p.advance(t);
            if p.police(1500, &mut c) == Colour::Green {
                green_bytes += 1500;
            }
            t += 300_000; // 1500 B every 300 µs = 40 Mbit/s
        }
        let want = 10_000_000 / 8 * 100 + 65536;
        let err = (green_bytes as f64 - want as f64).abs() / want as f64;
        assert!(err < 0.001, "green {green_bytes} vs {want}");
    }
}
