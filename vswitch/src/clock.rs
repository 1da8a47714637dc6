//! The switch's one clock: the CPU's timestamp counter, calibrated once against the monotonic
//! clock, read once per burst.
//!
//! `ticks()` is the raw counter (loop accounting, the watchdog, batching waits); `now_ns()` is
//! nanoseconds for policy (policers, shapers, IOTLB miss time-outs) through [`TscClock`], which
//! implements [`shaping::Clock`] so the same token buckets run on it in the switch and on a
//! [`shaping::ManualClock`] in tests. Where the TSC cannot be trusted for time (no invariant TSC,
//! not x86-64), nanoseconds come from `Instant` instead.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long the one calibration measures (paid once, before traffic: the switch reads the
/// clock at start).
const CALIBRATION: Duration = Duration::from_millis(20);

/// The calibrated clock.
#[derive(Debug)]
pub struct TscClock {
    origin: Instant,
    /// (ticks at calibration start, nanoseconds per tick × 2³²), when the TSC keeps time.
    tsc: Option<(u64, u64)>,
    ticks_per_us: u64,
}

impl TscClock {
    /// Measures the counter's rate against the monotonic clock over `over`.
    pub fn calibrate(over: Duration) -> Self {
        let origin = Instant::now();
        let (t0, c0) = (Instant::now(), ticks());
        std::thread::sleep(over);
        let (dt, dc) = (t0.elapsed().as_nanos().max(1) as u64, ticks().wrapping_sub(c0));
        let ticks_per_us = (dc.saturating_mul(1000) / dt).max(1);
        let invariant = std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| c.contains(" constant_tsc") && c.contains(" nonstop_tsc"))
            .unwrap_or(false);
        let tsc = (cfg!(target_arch = "x86_64") && invariant && dc > 0)
            .then(|| (c0, (((dt as u128) << 32) / dc as u128) as u64));
        TscClock { origin, tsc, ticks_per_us }
    }

    /// Counter ticks per microsecond.
    pub fn ticks_per_us(&self) -> u64 {
        self.ticks_per_us
    }
}

impl shaping::Clock for TscClock {
    #[inline]
    fn now_ns(&self) -> u64 {
        match self.tsc {
            Some((c0, per_tick)) => ((ticks().wrapping_sub(c0) as u128 * per_tick as u128) >> 32) as u64,
            None => self.origin.elapsed().as_nanos() as u64,
        }
    }
}

/// The process's clock (calibrated on first use).
pub fn clock() -> &'static TscClock {
    static CLOCK: OnceLock<TscClock> = OnceLock::new();
    CLOCK.get_or_init(|| TscClock::calibrate(CALIBRATION))
}

/// Nanoseconds on the switch's clock (monotonic, arbitrary origin): about 20 ns cheaper than
/// `clock_gettime` here with an invariant TSC.
#[inline]
pub fn now_ns() -> u64 {
    shaping::Clock::now_ns(clock())
}

/// [`ticks`] per microsecond.
pub fn ticks_per_us() -> u64 {
    clock().ticks_per_us
}

/// TSC ticks (x86-64), nanoseconds elsewhere.
#[inline(always)]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: rdtsc has no preconditions.
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static T0: OnceLock<Instant> = OnceLock::new();
        T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_clock_keeps_time_with_the_monotonic_clock() {
        let (a, t) = (now_ns(), Instant::now());
        std::thread::sleep(Duration::from_millis(50));
        let (d, real) = (now_ns() - a, t.elapsed().as_nanos() as u64);
        assert!(d.abs_diff(real) < real / 50, "switch clock {d} ns vs monotonic {real} ns");
        assert!(ticks_per_us() > 0);
    }
}
