//! What a benchmark measures: topology, frame sizes, offered rate, peers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A benchmark parameter that cannot be used: unparsable, out of range, or a port count the
/// topology does not take.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum SpecError {
    /// frame size {0:?} is not a number or "imix"
    #[error("frame size {0:?} is not a number or \"imix\"")]
    FrameSizeSyntax(String),
    /// frame size {0} is outside 64..=9018 (nominal size including the 4-byte FCS)
    #[error(
        "frame size {0} is outside {min}..={max} (nominal size including the 4-byte FCS)",
        min = FrameSize::MIN,
        max = FrameSize::MAX
    )]
    FrameSizeRange(u16),
    /// topology {topology} takes {allowed} ports, not {ports}
    #[error("topology {topology} takes {allowed} ports, not {ports}")]
    Ports {
        /// The topology.
        topology: Topology,
        /// The port counts it takes, in words.
        allowed: &'static str,
        /// The port count asked for.
        ports: usize,
    },
    /// unknown topology {0:?}; choose one of p2p, p2p-uni, mesh, flood, vlan
    #[error("unknown topology {0:?}; choose one of {names}", names = topology_names())]
    UnknownTopology(String),
    /// unknown peer {0:?}; choose from ours, ours+policy, ours+viommu, ours+log, dpdk, ovs
    #[error("unknown peer {0:?}; choose from ours, ours+policy, ours+viommu, ours+log, dpdk, ovs")]
    UnknownPeer(String),
    /// rate {0:?} is not one of: max, N%, Nmpps, Nkpps, Npps
    #[error("rate {0:?} is not one of: max, N%, Nmpps, Nkpps, Npps")]
    RateSyntax(String),
    /// rate {0:?}: a percentage must be in (0, 100]
    #[error("rate {0:?}: a percentage must be in (0, 100]")]
    RatePercent(String),
    /// rate {0:?} must be positive
    #[error("rate {0:?} must be positive")]
    RateNotPositive(String),
}

/// The names of every topology, for [`SpecError::UnknownTopology`].
fn topology_names() -> String {
    let names: Vec<String> = Topology::ALL.iter().map(|t| t.to_string()).collect();
    names.join(", ")
}

/// Frame sizes are nominal Ethernet sizes *including* the 4-byte FCS, as in RFC 2544 and
/// DPDK's `--txpkts` in flowgen mode: `64` puts 60-byte frames on the rings.
pub const FCS_LEN: usize = 4;

/// IMIX: the "simple IMIX" 7:4:1 mix of 64, 570 and 1518-byte frames (nominal sizes).
pub const IMIX: [(u16, u32); 3] = [(64, 7), (570, 4), (1518, 1)];

/// One frame size of a benchmark: a fixed nominal size or the IMIX mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum FrameSize {
    /// Nominal size in bytes including FCS, 64..=9018.
    Fixed(u16),
    /// The [`IMIX`] mix.
    Imix,
}

impl FrameSize {
    /// Smallest and largest nominal fixed sizes accepted.
    pub const MIN: u16 = 64;
    /// Jumbo frames up to 9000 bytes of payload plus Ethernet header and FCS.
    pub const MAX: u16 = 9018;

    /// Mean nominal size (FCS included) of the frames this size produces.
    pub fn mean_nominal(self) -> f64 {
        match self {
            FrameSize::Fixed(n) => f64::from(n),
            FrameSize::Imix => {
                let (sum, n) = IMIX.iter().fold((0u64, 0u64), |(s, c), &(sz, w)| {
                    (s + u64::from(sz) * u64::from(w), c + u64::from(w))
                });
                sum as f64 / n as f64
            }
        }
    }

    /// Frame lengths on the ring (FCS excluded), one per slot of the repeating pattern.
    pub fn pattern(self) -> Vec<usize> {
        match self {
            FrameSize::Fixed(n) => vec![usize::from(n) - FCS_LEN],
            FrameSize::Imix => {
                // Interleaved rather than in runs, so bursts mix sizes as real traffic does.
                let mut left: Vec<(usize, u32)> =
                    IMIX.iter().map(|&(s, w)| (usize::from(s) - FCS_LEN, w)).collect();
                let mut out = Vec::new();
                while left.iter().any(|&(_, w)| w > 0) {
                    for (s, w) in left.iter_mut() {
                        if *w > 0 {
                            out.push(*s);
                            *w -= 1;
                        }
                    }
                }
                out
            }
        }
    }

    /// Largest frame length on the ring (FCS excluded).
    pub fn max_frame(self) -> usize {
        self.pattern().into_iter().max().unwrap_or(60)
    }
}

impl fmt::Display for FrameSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameSize::Fixed(n) => write!(f, "{n}"),
            FrameSize::Imix => f.write_str("imix"),
        }
    }
}

impl FromStr for FrameSize {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        if s.eq_ignore_ascii_case("imix") {
            return Ok(FrameSize::Imix);
        }
        let n: u16 = s.parse().map_err(|_| SpecError::FrameSizeSyntax(s.to_string()))?;
        if !(FrameSize::MIN..=FrameSize::MAX).contains(&n) {
            return Err(SpecError::FrameSizeRange(n));
        }
        Ok(FrameSize::Fixed(n))
    }
}

impl From<FrameSize> for String {
    fn from(s: FrameSize) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for FrameSize {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Self, SpecError> {
        s.parse()
    }
}

/// How ports are connected and who sends to whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// Port A → switch → port B and back (both directions at once).
    P2p,
    /// Port A → switch → port B only.
    P2pUni,
    /// N ports, each sending to every other port.
    Mesh,
    /// Port 0 broadcasts; ports 1..N each receive every frame.
    Flood,
    /// 4 ports on two access VLANs (10: ports 0,1; 20: ports 2,3); each port sends to its VLAN
    /// peer and also to the MAC of a port in the other VLAN, which must never arrive.
    Vlan,
}

impl Topology {
    /// Every topology, for help texts.
    pub const ALL: [Topology; 5] =
        [Topology::P2p, Topology::P2pUni, Topology::Mesh, Topology::Flood, Topology::Vlan];

    /// Port count for this topology when the user did not ask for one.
    pub fn default_ports(self) -> usize {
        match self {
            Topology::P2p | Topology::P2pUni => 2,
            Topology::Mesh | Topology::Flood => 4,
            Topology::Vlan => 4,
        }
    }

    /// Checks a port count; returns a message saying what is allowed.
    pub fn check_ports(self, n: usize) -> Result<(), SpecError> {
        let ok = match self {
            Topology::P2p | Topology::P2pUni => n == 2,
            Topology::Mesh | Topology::Flood => (2..=64).contains(&n),
            Topology::Vlan => n == 4,
        };
        if ok {
            Ok(())
        } else {
            Err(SpecError::Ports {
                topology: self,
                allowed: match self {
                    Topology::P2p | Topology::P2pUni => "exactly 2",
                    Topology::Mesh | Topology::Flood => "2 to 64",
                    Topology::Vlan => "exactly 4",
                },
                ports: n,
            })
        }
    }

    /// Access VLAN of port `i` (None = untagged / no VLAN configuration on the peer).
    pub fn access_vlan(self, i: usize) -> Option<u16> {
        match self {
            Topology::Vlan => Some(if i < 2 { 10 } else { 20 }),
            _ => None,
        }
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Topology::P2p => "p2p",
            Topology::P2pUni => "p2p-uni",
            Topology::Mesh => "mesh",
            Topology::Flood => "flood",
            Topology::Vlan => "vlan",
        })
    }
}

impl FromStr for Topology {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        Topology::ALL
            .into_iter()
            .find(|t| t.to_string() == s)
            .ok_or_else(|| SpecError::UnknownTopology(s.to_string()))
    }
}

/// The switch under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerKind {
    /// This project's `vswitch`.
    Ours,
    /// This project's `vswitch` with every policy on each port: policer, shaper (both at rates
    /// far above what the run reaches, so they cost their work but drop nothing) and
    /// anti-spoofing that allows exactly the generator's addresses. Run beside `ours` it gives
    /// the cost of policy.
    OursPolicy,
    /// This project's `vswitch` with every generator port behind a vIOMMU played by the
    /// generator: IOVA descriptors and rings, the IOTLB filled beforehand with one 4 KiB
    /// mapping per page of the generator's memory (thousands of entries, DPDK's historical
    /// cliff). Run beside `ours` it gives the cost of IOTLB translation.
    OursViommu,
    /// This project's `vswitch` with every generator port migrating: dirty logging on
    /// (VHOST_F_LOG_ALL), the log read and cleared every 100 ms as QEMU's pre-copy reads it.
    /// Run beside `ours` it gives the cost of logging.
    OursLog,
    /// `dpdk-testpmd` with `net_vhost` ports in io forwarding mode.
    Dpdk,
    /// `ovs-vswitchd` (DPDK build) with `dpdkvhostuser` ports on a netdev bridge.
    Ovs,
}

impl PeerKind {
    /// Whether this is the project's own `vswitch` (with or without policy).
    pub fn is_ours(self) -> bool {
        matches!(self, PeerKind::Ours | PeerKind::OursPolicy | PeerKind::OursViommu | PeerKind::OursLog)
    }
}

impl fmt::Display for PeerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerKind::Ours => "ours",
            PeerKind::OursPolicy => "ours+policy",
            PeerKind::OursViommu => "ours+viommu",
            PeerKind::OursLog => "ours+log",
            PeerKind::Dpdk => "dpdk",
            PeerKind::Ovs => "ovs",
        })
    }
}

impl FromStr for PeerKind {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "ours" => Ok(PeerKind::Ours),
            "ours+policy" => Ok(PeerKind::OursPolicy),
            "ours+viommu" => Ok(PeerKind::OursViommu),
            "ours+log" => Ok(PeerKind::OursLog),
            "dpdk" => Ok(PeerKind::Dpdk),
            "ovs" => Ok(PeerKind::Ovs),
            _ => Err(SpecError::UnknownPeer(s.to_string())),
        }
    }
}

/// Offered load.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rate {
    /// As fast as the rings accept frames.
    Max,
    /// A fraction (0..=1) of the maximum rate measured first for the same peer and size.
    Fraction(f64),
    /// Frames per second, summed over all sending ports.
    Pps(f64),
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rate::Max => f.write_str("max"),
            Rate::Fraction(x) => write!(f, "{}%", x * 100.0),
            Rate::Pps(p) => write!(f, "{}pps", p),
        }
    }
}

impl FromStr for Rate {
    type Err = SpecError;
    /// `max`, `50%`, `2.5mpps`, `300kpps`, `1000pps` or a bare number of frames per second.
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let t = s.trim().to_ascii_lowercase();
        let bad = || SpecError::RateSyntax(s.to_string());
        if t == "max" {
            return Ok(Rate::Max);
        }
        if let Some(p) = t.strip_suffix('%') {
            let x: f64 = p.parse().map_err(|_| bad())?;
            if !(x > 0.0 && x <= 100.0) {
                return Err(SpecError::RatePercent(s.to_string()));
            }
            return Ok(Rate::Fraction(x / 100.0));
        }
        let (num, mult) = if let Some(n) = t.strip_suffix("mpps") {
            (n, 1e6)
        } else if let Some(n) = t.strip_suffix("kpps") {
            (n, 1e3)
        } else if let Some(n) = t.strip_suffix("pps") {
            (n, 1.0)
        } else {
            (t.as_str(), 1.0)
        };
        let x: f64 = num.trim().parse().map_err(|_| bad())?;
        if !(x > 0.0 && x.is_finite()) {
            return Err(SpecError::RateNotPositive(s.to_string()));
        }
        Ok(Rate::Pps(x * mult))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!("64".parse::<FrameSize>(), Ok(FrameSize::Fixed(64)));
        assert_eq!("IMIX".parse::<FrameSize>(), Ok(FrameSize::Imix));
        assert!("63".parse::<FrameSize>().is_err());
        assert!("9019".parse::<FrameSize>().is_err());
        assert!("big".parse::<FrameSize>().is_err());
        assert_eq!(FrameSize::Fixed(1518).to_string(), "1518");
        let j = serde_json::to_string(&FrameSize::Imix).unwrap();
        assert_eq!(j, "\"imix\"");
        assert_eq!(serde_json::from_str::<FrameSize>("\"512\"").unwrap(), FrameSize::Fixed(512));
    }

    #[test]
    fn imix_pattern_is_7_4_1_without_fcs() {
        let p = FrameSize::Imix.pattern();
        assert_eq!(p.len(), 12);
        assert_eq!(p.iter().filter(|&&s| s == 60).count(), 7);
        assert_eq!(p.iter().filter(|&&s| s == 566).count(), 4);
        assert_eq!(p.iter().filter(|&&s| s == 1514).count(), 1);
        assert_eq!(&p[..3], &[60, 566, 1514], "interleaved");
        let mean = FrameSize::Imix.mean_nominal();
        assert!((mean - (7.0 * 64.0 + 4.0 * 570.0 + 1518.0) / 12.0).abs() < 1e-9);
        assert_eq!(FrameSize::Fixed(64).pattern(), vec![60]);
    }

    #[test]
    fn rates_parse() {
        assert_eq!("max".parse::<Rate>(), Ok(Rate::Max));
        assert_eq!("50%".parse::<Rate>(), Ok(Rate::Fraction(0.5)));
        assert_eq!("2.5mpps".parse::<Rate>(), Ok(Rate::Pps(2.5e6)));
        assert_eq!("300kpps".parse::<Rate>(), Ok(Rate::Pps(3e5)));
        assert_eq!("1000".parse::<Rate>(), Ok(Rate::Pps(1000.0)));
        assert!("0%".parse::<Rate>().is_err());
        assert!("150%".parse::<Rate>().is_err());
        assert!("-3pps".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
    }

    #[test]
    fn topologies() {
        for t in Topology::ALL {
            assert_eq!(t.to_string().parse::<Topology>(), Ok(t));
            assert!(t.check_ports(t.default_ports()).is_ok());
        }
        assert!(Topology::P2p.check_ports(3).is_err());
        assert_eq!(Topology::Vlan.access_vlan(3), Some(20));
        assert_eq!(Topology::Mesh.access_vlan(0), None);
    }
}
