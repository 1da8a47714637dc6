//! A cheap cycle clock for timestamps and rate control.
//!
//! On x86_64 this is the TSC (`rdtsc`, ~10 ns), calibrated against the monotonic clock; the
//! machine must have an invariant TSC (`constant_tsc` and `nonstop_tsc` in /proc/cpuinfo),
//! which [`Clock::calibrate`] checks. Elsewhere it falls back to `Instant` in nanoseconds.
//! Ticks are also the unit of "cycles per frame" in results, as DPDK and OVS count them.

use std::time::{Duration, Instant};

/// A calibrated tick counter.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    hz: f64,
    #[cfg(not(target_arch = "x86_64"))]
    origin: Instant,
}

/// Why the TSC cannot serve as the harness's clock.
#[derive(thiserror::Error, Debug)]
pub enum ClockError {
    /// this CPU has no invariant TSC (constant_tsc and nonstop_tsc); latency and rate figures
    /// would be wrong
    #[error(
        "this CPU has no invariant TSC (constant_tsc and nonstop_tsc); \
         latency and rate figures would be wrong"
    )]
    NotInvariant,
    /// TSC calibration gave {hz} Hz; the TSC does not count
    #[error("TSC calibration gave {hz} Hz; the TSC does not count")]
    NotCounting {
        /// The rate measured.
        hz: f64,
    },
}

impl Clock {
    /// Measures the tick rate over `over` (50 ms gives ~0.1 % accuracy).
    ///
    /// Returns an error when the TSC is not invariant, since timestamps taken on different
    /// CPUs would then not compare.
    pub fn calibrate(over: Duration) -> Result<Clock, ClockError> {
        #[cfg(target_arch = "x86_64")]
        {
            if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
                let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
                let has = |f: &str| flags.split_whitespace().any(|x| x == f);
                if !has("constant_tsc") || !has("nonstop_tsc") {
                    return Err(ClockError::NotInvariant);
                }
            }
            let t0 = Instant::now();
            let c0 = raw();
            while t0.elapsed() < over {
                std::hint::spin_loop();
            }
            let c1 = raw();
            let secs = t0.elapsed().as_secs_f64();
            let hz = (c1.wrapping_sub(c0)) as f64 / secs;
            if hz.is_nan() || hz <= 1e6 {
                return Err(ClockError::NotCounting { hz });
            }
            Ok(Clock { hz })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = over;
            Ok(Clock { hz: 1e9, origin: Instant::now() })
        }
    }

    /// Current tick count.
    #[inline(always)]
    pub fn now(&self) -> u64 {
        #[cfg(target_arch = "x86_64")]
        {
            raw()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self.origin.elapsed().as_nanos() as u64
        }
    }

    /// Ticks per second.
    pub fn hz(&self) -> f64 {
        self.hz
    }

    /// Ticks in `d`.
    pub fn ticks(&self, d: Duration) -> u64 {
        (d.as_secs_f64() * self.hz) as u64
    }

    /// Ticks to nanoseconds.
    pub fn to_ns(&self, ticks: u64) -> u64 {
        (ticks as f64 * 1e9 / self.hz) as u64
    }

    /// Ticks to seconds.
    pub fn to_secs(&self, ticks: u64) -> f64 {
        ticks as f64 / self.hz
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn raw() -> u64 {
    // SAFETY: rdtsc has no memory effects; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_follow_wall_time() {
        let c = Clock::calibrate(Duration::from_millis(20)).expect("calibrate");
        let t0 = c.now();
        let w0 = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        let ns = c.to_ns(c.now() - t0);
        let wall = w0.elapsed().as_nanos() as u64;
        // Generous bounds: the machine may be busy; a wrong rate would be off by far more.
        assert!(ns > wall * 8 / 10 && ns < wall * 12 / 10, "clock {ns} ns vs wall {wall} ns");
        assert_eq!(c.ticks(Duration::from_secs(1)), c.hz() as u64);
    }
}
