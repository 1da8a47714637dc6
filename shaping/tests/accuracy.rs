//! Long simulated runs: under overload a limiter passes its configured rate, within 1%, for
//! several rate / burst / packet-size mixes and refill granularities.

use shaping::{Offer, RateLimiter, Shaper, NANOS_PER_SEC};

/// Deterministic xorshift, so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct Mix {
    name: &'static str,
    bits_per_sec: u64,
    burst_bytes: u64,
    sizes: &'static [u32],
    /// Offered load over the limit.
    overload: u64,
    seconds: u64,
}

const MIXES: &[Mix] = &[
    Mix {
        name: "1 Mbit/s, 16 KiB burst, 64..1518 B",
        bits_per_sec: 1_000_000,
        burst_bytes: 16384,
        sizes: &[64, 128, 512, 1024, 1518],
        overload: 3,
        seconds: 2000,
    },
    Mix {
        name: "100 Mbit/s, 64 KiB burst, IMIX",
        bits_per_sec: 100_000_000,
        burst_bytes: 65536,
        sizes: &[64, 64, 64, 64, 64, 64, 64, 594, 594, 594, 594, 1518],
        overload: 2,
        seconds: 60,
    },
    Mix {
        name: "10 Gbit/s, 1 MiB burst, 9000 B",
        bits_per_sec: 10_000_000_000,
        burst_bytes: 1 << 20,
        sizes: &[9000],
        overload: 4,
        seconds: 10,
    },
    Mix {
        name: "333 kbit/s (odd), 64 KB burst, 60..9000 B",
        bits_per_sec: 333_333,
        burst_bytes: 64_000,
        sizes: &[60, 1000, 9000, 77],
        overload: 10,
        seconds: 10_000,
    },
];

/// Offers packets at `overload` × the rate with jittered gaps; returns bytes that passed.
/// Packets come in clumps of up to 32 (a burst); every mix's bucket holds more than the rate
/// earns between clumps, or credit would overflow while waiting and the rate could not be met
/// (which is what a too-small burst does in real life too).
fn run_policer(m: &Mix, seed: u64) -> u64 {
    let mut l = RateLimiter::bits(m.bits_per_sec, m.burst_bytes).unwrap();
    let mut rng = Rng(seed);
    let mean_size = m.sizes.iter().map(|&s| s as u64).sum::<u64>() / m.sizes.len() as u64;
    let mean_gap = mean_size * 8 * NANOS_PER_SEC / (m.bits_per_sec * m.overload);
    let (mut t, mut passed) = (0u64, 0u64);
    let end = m.seconds * NANOS_PER_SEC;
    while t < end {
        // A "burst" of 1..32 packets at one clock reading, as the datapath does.
        l.advance(t);
        let burst = 1 + rng.next() % 32;
        for _ in 0..burst {
            let len = m.sizes[(rng.next() % m.sizes.len() as u64) as usize];
            if l.try_consume(len) {
                passed += len as u64;
            }
        }
        t += mean_gap * burst / 2 + rng.next() % (mean_gap * burst + 1);
    }
    passed
}

#[test]
fn test_policer_rate_within_one_percent_for_every_mix() {
    for (i, m) in MIXES.iter().enumerate() {
        let passed = run_policer(m, 0x9e37_79b9 + i as u64);
        let achieved = passed as f64 * 8.0 / m.seconds as f64;
        let err = achieved / m.bits_per_sec as f64 - 1.0;
        assert!(err.abs() < 0.01, "{}: achieved {achieved:.0} bit/s, error {:.3}%", m.name, err * 100.0);
    }
}

#[test]
fn test_shaper_rate_within_one_percent_for_every_mix() {
    for (i, m) in MIXES.iter().enumerate() {
        let mut s: Shaper<u32> =
            Shaper::new(RateLimiter::bits(m.bits_per_sec, m.burst_bytes).unwrap(), 256, 1 << 22);
        let mut rng = Rng(0x5bd1_e995 + i as u64);
        let mean_size = m.sizes.iter().map(|&s| s as u64).sum::<u64>() / m.sizes.len() as u64;
        let mean_gap = mean_size * 8 * NANOS_PER_SEC / (m.bits_per_sec * m.overload);
        let (mut t, mut sent) = (0u64, 0u64);
        let end = m.seconds * NANOS_PER_SEC;
        while t < end {
            s.advance(t);
            while let Some(len) = s.release() {
                sent += len as u64;
            }
            let burst = 1 + rng.next() % 32;
            for _ in 0..burst {
                let len = m.sizes[(rng.next() % m.sizes.len() as u64) as usize];
                if let Offer::Send(l) = s.offer(len, len) {
                    sent += l as u64;
                }
            }
            t += mean_gap * burst / 2 + rng.next() % (mean_gap * burst + 1);
        }
        let achieved = sent as f64 * 8.0 / m.seconds as f64;
        let err = achieved / m.bits_per_sec as f64 - 1.0;
        assert!(err.abs() < 0.01, "{}: achieved {achieved:.0} bit/s, error {:.3}%", m.name, err * 100.0);
        assert!(s.counters.dropped > 0, "{}: overload must overflow the queue", m.name);
    }
}

#[test]
fn test_packet_rate_limit_within_one_percent() {
    // 1 Mpps with a 32-packet burst, offered 64 B packets at 2.5 Mpps in bursts.
    let mut l = RateLimiter::unlimited().with_packets(1_000_000, 32).unwrap();
    let (mut t, mut passed) = (0u64, 0u64);
    while t < 20 * NANOS_PER_SEC {
        l.advance(t);
        for _ in 0..32 {
            passed += l.try_consume(64) as u64;
        }
        t += 12_800; // 32 packets per 12.8 µs = 2.5 Mpps
    }
    let err = passed as f64 / 20e6 - 1.0;
    assert!(err.abs() < 0.01, "passed {passed} packets, error {:.3}%", err * 100.0);
}

#[test]
fn test_burst_passes_at_line_rate_then_settles() {
    // 10 Mbit/s with a 100 KB burst: an idle bucket lets 100 KB through at once, then the rate.
    let mut l = RateLimiter::bits(10_000_000, 100_000).unwrap();
    let mut at_once = 0;
    while l.try_consume(1000) {
        at_once += 1000;
    }
    assert_eq!(at_once, 100_000);
    let mut later = 0;
    for ms in 1..=1000u64 {
        l.advance(ms * 1_000_000);
        while l.try_consume(1000) {
            later += 1000;
        }
    }
    assert_eq!(later, 1_250_000, "one second at 10 Mbit/s");
}
