//! Per-port policy: an ingress policer and anti-spoofing on what a guest sends, an egress
//! shaper on what it receives. All of it is decided before any copy.
//!
//! ```text
//!  guest TX ─► describe ─► [anti-spoof] ─► [policer] ─► decide (learn, look up) ─► deliver
//!                              │ drop          │ red: drop                          │
//!                              ▼ by reason     ▼                                    ▼
//!                                               destination's [shaper]: conforming → publish now
//!                                               over the rate → copied into the receiver's own
//!                                               buffer, its used entry held back and published
//!                                               when tokens allow; queue full → dropped uncopied
//! ```
//!
//! The shaper's queue is the receiver's own ring: a waiting packet sits in the buffer it will
//! be read from, with its used-ring entry written but the used index not yet moved past it. So
//! shaping costs no second copy and never stalls the sender (its descriptor is returned at once).
//!
//! Settings change at run time ([`PortPolicy::apply`]); polling threads see them at their next
//! burst. A polling thread takes each lock here once per burst, and only for ports that have a
//! policy (one relaxed load otherwise).

pub mod error;
pub mod spoof;
pub mod units;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use shaping::{Policer, RateLimiter, Shaper, SrTcm, TrTcm};

use crate::sync::Spin;
pub use error::PolicyError;
use spoof::{SpoofConfig, SpoofFilter, SpoofReason};
pub use units::{BitRate, ByteSize, UnitError};

/// Smallest burst accepted: a full-size Ethernet frame (a smaller one could never pass it).
pub const MIN_BURST: u64 = 1518;
/// Most packets an egress shaper may hold back.
pub const MAX_SHAPER_QUEUE: u32 = 4096;
/// Default shaper queue, in packets.
const DEFAULT_SHAPER_QUEUE: u32 = 256;

/// Ingress policer settings (what the guest sends).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicerConfig {
    /// Committed rate in bits/s (`100Mbit`, `1.5G`).
    pub rate: BitRate,
    /// Committed burst in bytes (`64KiB`); default: 10 ms at the rate, at least 2 jumbo frames.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<ByteSize>,
    /// Excess burst: with it the policer is an RFC 2697 srTCM (yellow passes within it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excess_burst: Option<ByteSize>,
    /// Excess rate: with `excess_burst`, an RFC 4115 trTCM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excess_rate: Option<BitRate>,
    /// Packet-rate limit (packets/s), on top of the bit rate (single-rate policer only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pps: Option<u64>,
}

/// Egress shaper settings (what the guest receives).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShaperConfig {
    /// Rate in bits/s.
    pub rate: BitRate,
    /// Burst in bytes; default as for the policer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<ByteSize>,
    /// Packets held back at most before drop-tail (default 256; the guest's posted receive
    /// buffers bound it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<u32>,
    /// Packet-rate limit (packets/s), on top of the bit rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pps: Option<u64>,
}

/// Everything a port's policy says; each part off when absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Ingress policer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<PolicerConfig>,
    /// Egress shaper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<ShaperConfig>,
    /// Anti-spoofing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_spoof: Option<SpoofConfig>,
}

/// Default burst: 10 ms at the rate, at least two jumbo frames.
fn default_burst(rate: BitRate) -> u64 {
    (rate.0 / 800).max(2 * 9220)
}

fn check_burst(what: &'static str, burst: u64) -> Result<u64, PolicyError> {
    if burst < MIN_BURST {
        return Err(PolicyError::BurstTooSmall { what, burst, min: MIN_BURST });
    }
    Ok(burst)
}

fn check_rate(what: &'static str, r: BitRate) -> Result<u64, PolicyError> {
    if r.0 == 0 {
        return Err(PolicyError::ZeroRate { what });
    }
    Ok(r.0)
}

impl PolicerConfig {
    /// Builds the policer these settings describe.
    pub fn build(&self, now_ns: u64) -> Result<Policer, PolicyError> {
        let rate = check_rate("ingress", self.rate)?;
        let cbs = check_burst("ingress", self.burst.map_or(default_burst(self.rate), |b| b.0))?;
        let e = |source| PolicyError::Bucket { what: "ingress policer", source };
        let mut p = match (self.excess_burst, self.excess_rate) {
            (None, None) => {
                let mut l = RateLimiter::bits(rate, cbs).map_err(e)?;
                if let Some(pps) = self.pps {
                    l = l.with_packets(pps, (pps / 100).max(32)).map_err(e)?;
                }
                Policer::Single(l.starting_at(now_ns))
            }
            _ if self.pps.is_some() => return Err(PolicyError::PpsNeedsSingleRate),
            (Some(ebs), None) => Policer::SrTcm(SrTcm::new(rate, cbs, ebs.0).map_err(e)?),
            (ebs, Some(eir)) => {
                let ebs = ebs.map_or(default_burst(eir), |b| b.0);
                Policer::TrTcm(TrTcm::new(rate, cbs, eir.0, ebs).map_err(e)?)
            }
        };
        p.advance(now_ns);
        Ok(p)
    }
}

impl ShaperConfig {
    /// The rate limiter and queue bound these settings describe.
    pub fn limiter(&self, now_ns: u64) -> Result<(RateLimiter, usize), PolicyError> {
        let rate = check_rate("egress", self.rate)?;
        let burst = check_burst("egress", self.burst.map_or(default_burst(self.rate), |b| b.0))?;
        let e = |source| PolicyError::Bucket { what: "egress shaper", source };
        let mut l = RateLimiter::bits(rate, burst).map_err(e)?;
        if let Some(pps) = self.pps {
            l = l.with_packets(pps, (pps / 100).max(32)).map_err(e)?;
        }
        let q = self.queue.unwrap_or(DEFAULT_SHAPER_QUEUE);
        if !(1..=MAX_SHAPER_QUEUE).contains(&q) {
            return Err(PolicyError::QueueRange { queue: q, max: MAX_SHAPER_QUEUE });
        }
        Ok((l.starting_at(now_ns), q as usize))
    }
}

impl PolicyConfig {
    /// Checks every part (what `apply` would refuse).
    pub fn validate(&self, port_mac: [u8; 6]) -> Result<(), PolicyError> {
        if let Some(i) = &self.ingress {
            i.build(0)?;
        }
        if let Some(e) = &self.egress {
            e.limiter(0)?;
        }
        if let Some(s) = &self.anti_spoof {
            SpoofFilter::new(s, port_mac)?;
        }
        Ok(())
    }
}

pub use crate::clock::now_ns;

/// What a port's sending side checks.
#[derive(Default)]
pub struct Ingress {
    /// The policer.
    pub policer: Option<Policer>,
    /// The address filter.
    pub spoof: Option<SpoofFilter>,
}

/// Packets the egress shaper holds back: used entries written in a receive queue (identified by
/// its epoch) but not yet published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// The receive queue's epoch (see `VirtQueue::epoch`).
    pub epoch: u64,
    /// Used entries to publish when this packet is released.
    pub entries: u16,
}

/// Counters of a port's policy, by reason. Written under the lock of the part they count.
#[derive(Debug, Default)]
pub struct PolicyStats {
    /// Dropped red by the ingress policer.
    pub policed: AtomicU64,
    /// Passed yellow by the ingress policer.
    pub policed_yellow: AtomicU64,
    /// Dropped: source MAC.
    pub spoof_mac: AtomicU64,
    /// Dropped: IP source.
    pub spoof_ip: AtomicU64,
    /// Dropped: ARP sender.
    pub spoof_arp: AtomicU64,
    /// Dropped: neighbour discovery.
    pub spoof_nd: AtomicU64,
    /// Dropped: ethertype not allowed with IP checking.
    pub spoof_ethertype: AtomicU64,
    /// Packets the egress shaper held back (ever).
    pub shaped_held: AtomicU64,
    /// Packets the egress shaper dropped (queue full), uncopied.
    pub shaped_dropped: AtomicU64,
}

impl PolicyStats {
    /// The counter for a spoofing reason.
    pub fn spoof(&self, r: SpoofReason) -> &AtomicU64 {
        match r {
            SpoofReason::Mac => &self.spoof_mac,
            SpoofReason::Ip => &self.spoof_ip,
            SpoofReason::Arp => &self.spoof_arp,
            SpoofReason::Nd => &self.spoof_nd,
            SpoofReason::Ethertype => &self.spoof_ethertype,
        }
    }

    /// Plain numbers.
    pub fn snapshot(&self) -> PolicyCounters {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PolicyCounters {
            policed: r(&self.policed),
            policed_yellow: r(&self.policed_yellow),
            spoof_mac: r(&self.spoof_mac),
            spoof_ip: r(&self.spoof_ip),
            spoof_arp: r(&self.spoof_arp),
            spoof_nd: r(&self.spoof_nd),
            spoof_ethertype: r(&self.spoof_ethertype),
            shaped_held: r(&self.shaped_held),
            shaped_dropped: r(&self.shaped_dropped),
        }
    }
}

/// A snapshot of [`PolicyStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCounters {
    /// See [`PolicyStats::policed`].
    pub policed: u64,
    /// See [`PolicyStats::policed_yellow`].
    pub policed_yellow: u64,
    /// See [`PolicyStats::spoof_mac`].
    pub spoof_mac: u64,
    /// See [`PolicyStats::spoof_ip`].
    pub spoof_ip: u64,
    /// See [`PolicyStats::spoof_arp`].
    pub spoof_arp: u64,
    /// See [`PolicyStats::spoof_nd`].
    pub spoof_nd: u64,
    /// See [`PolicyStats::spoof_ethertype`].
    pub spoof_ethertype: u64,
    /// See [`PolicyStats::shaped_held`].
    pub shaped_held: u64,
    /// See [`PolicyStats::shaped_dropped`].
    pub shaped_dropped: u64,
}

/// A port's policy as the polling threads use it.
#[derive(Default)]
pub struct PortPolicy {
    ingress_on: AtomicBool,
    spoof_on: AtomicBool,
    egress_on: AtomicBool,
    /// Policer and address filter (taken by the thread polling a transmit queue of the port).
    pub ingress: Spin<Ingress>,
    /// Shaper (taken, after a receive queue's lock, by whoever delivers to the port).
    pub egress: Spin<Option<Shaper<Held>>>,
    /// Packets the shaper holds now (a hint, so idle threads know to come back).
    pub held: AtomicU32,
    /// Counters by reason.
    pub stats: PolicyStats,
    config: Mutex<PolicyConfig>,
}

impl PortPolicy {
    /// Whether anything checks what the guest sends (one relaxed load).
    #[inline(always)]
    pub fn ingress_on(&self) -> bool {
        self.ingress_on.load(Ordering::Relaxed)
    }

    /// Whether the guest's source addresses are checked.
    #[inline(always)]
    pub fn spoof_on(&self) -> bool {
        self.spoof_on.load(Ordering::Relaxed)
    }

    /// Whether what the guest receives is shaped.
    #[inline(always)]
    pub fn egress_on(&self) -> bool {
        self.egress_on.load(Ordering::Relaxed)
    }

    /// The settings in force.
    pub fn config(&self) -> PolicyConfig {
        self.config.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Installs the ingress side of `cfg` (policer, anti-spoofing). Validates everything first,
    /// so a refused change leaves the old settings whole.
    pub(crate) fn apply_ingress(&self, cfg: &PolicyConfig, port_mac: [u8; 6]) -> Result<(), PolicyError> {
        let now = now_ns();
        let policer = cfg.ingress.as_ref().map(|i| i.build(now)).transpose()?;
        let spoof = cfg.anti_spoof.as_ref().map(|s| SpoofFilter::new(s, port_mac)).transpose()?;
        let on = policer.is_some() || spoof.is_some();
        let mut g = self.ingress.lock();
        // Keep a running policer's state when only its parameters change in place? A new policer
        // starts with full buckets, as a freshly configured one on a hardware NIC does.
        self.spoof_on.store(spoof.is_some(), Ordering::Relaxed);
        g.policer = policer;
        g.spoof = spoof;
        self.ingress_on.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Installs the egress side: a new shaper, or new rates for the running one (its held
    /// packets and earned credit kept). Removing the shaper must release what it holds first:
    /// see `Port::set_policy`.
    pub(crate) fn apply_egress(&self, cfg: Option<&ShaperConfig>) -> Result<(), PolicyError> {
        let new = cfg.map(|e| e.limiter(now_ns())).transpose()?;
        let mut g = self.egress.lock();
        match (g.as_mut(), new) {
            (Some(s), Some((l, q))) => s.retune(l, q, u64::MAX),
            (None, Some((l, q))) => {
                *g = Some(Shaper::with_capacity(l, MAX_SHAPER_QUEUE as usize, q, u64::MAX))
            }
            (_, None) => *g = None,
        }
        self.egress_on.store(g.is_some(), Ordering::Relaxed);
        Ok(())
    }

    /// Records the settings in force.
    pub(crate) fn set_config(&self, cfg: PolicyConfig) {
        if let Ok(mut c) = self.config.lock() {
            *c = cfg;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_policer_kinds_from_settings() {
        let mut c = PolicerConfig {
            rate: BitRate(10_000_000),
            burst: None,
            excess_burst: None,
            excess_rate: None,
            pps: None,
        };
        assert!(matches!(c.build(0).unwrap(), Policer::Single(_)));
        c.excess_burst = Some(ByteSize(10_000));
        assert!(matches!(c.build(0).unwrap(), Policer::SrTcm(_)));
        c.excess_rate = Some(BitRate(5_000_000));
        assert!(matches!(c.build(0).unwrap(), Policer::TrTcm(_)));
        c.pps = Some(1000);
        assert!(c.build(0).unwrap_err().to_string().contains("single-rate"));
    }

    #[test]
    fn test_bad_settings_are_refused_with_reasons() {
        let c =
            PolicerConfig { rate: BitRate(0), burst: None, excess_burst: None, excess_rate: None, pps: None };
        assert!(c.build(0).unwrap_err().to_string().contains("above 0"));
        let c = ShaperConfig { rate: BitRate(1_000_000), burst: Some(ByteSize(100)), queue: None, pps: None };
        assert!(c.limiter(0).unwrap_err().to_string().contains("below 1518"));
        let c = ShaperConfig { rate: BitRate(1_000_000), burst: None, queue: Some(0), pps: None };
        assert!(c.limiter(0).unwrap_err().to_string().contains("outside 1..4096"));
    }

    #[test]
    fn test_default_burst_is_ten_ms_or_two_jumbo_frames() {
        assert_eq!(default_burst(BitRate(1_000_000)), 18_440);
        assert_eq!(default_burst(BitRate(10_000_000_000)), 12_500_000);
    }

    #[test]
    fn test_toml_policy() {
        let p: PolicyConfig = toml::from_str(
            r#"
            ingress = { rate = "100Mbit", burst = "64KiB" }
            egress = { rate = "50M", queue = 128 }
            anti_spoof = { ips = ["10.0.0.1", "fd00::/64"] }
            "#,
        )
        .unwrap();
        assert_eq!(p.ingress.as_ref().unwrap().rate, BitRate(100_000_000));
        assert_eq!(p.egress.as_ref().unwrap().queue, Some(128));
        p.validate([0x52, 0x54, 0, 0, 0, 1]).unwrap();
    }
}
