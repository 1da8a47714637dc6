//! The configuration of the uplinks that are more than a device name: NIC models (`nic:`)
//! and tunnels (`vxlan:`, `geneve:`).

use serde::{Deserialize, Serialize};

use super::yes;
use crate::policy::BitRate;

/// A tunnel port (`vxlan:REMOTE_IP[,vni=N][,local=IP][,dstport=N][,remote=IP]..[,csum=on|off]`,
/// the same with `geneve:`): one VNI, its frames the port's (the port's `vlan=` maps it to a
/// VLAN of the switch).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// vxlan or geneve.
    pub kind: crate::uplink::tunnel::TunnelKind,
    /// The remote VTEPs: broadcast and unknown unicast go to each; a learned MAC's frames to
    /// its remote.
    pub remotes: Vec<std::net::IpAddr>,
    /// The VNI (0..16777215).
    #[serde(default)]
    pub vni: u32,
    /// The local address to receive on (default: every address of the remotes' family).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<std::net::IpAddr>,
    /// The UDP port (default 4789 for VXLAN, 6081 for Geneve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dstport: Option<u16>,
    /// The outer UDP checksum (IPv4; IPv6 always has one).
    #[serde(default = "yes")]
    pub csum: bool,
}

impl TunnelConfig {
    /// The UDP port in use.
    pub fn port(&self) -> u16 {
        self.dstport.unwrap_or(self.kind.default_port())
    }
}

/// A NIC model on an uplink port (`nic:IFNAME[,level=0|1|2|3][,pools=N][,filters=N]`). Level 2
/// is Level 1 plus direct queue pairs: `ctl accel plug PORT` gives a guest's rings to the
/// device. Level 3 is an SR-IOV PF with `pools - 1` VFs (`vfs=N`), each given to a guest port
/// by `vswitch vf DEV attach N PORT` with the policy `vswitch vf DEV N ...` sets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// The tier: 0 (one queue to the host, offload engines), 1 (pools bound to guests'
    /// receive rings, a MAC/VLAN classifier to choose them), 2 (and direct queue pairs) or 3
    /// (SR-IOV VFs with policy and an embedded switch).
    #[serde(default = "level_one")]
    pub level: u8,
    /// Pools, the host's default pool included (the 82576 has 8, the 82599 64): at most
    /// `pools - 1` guests are served by the device, the rest by the software path.
    #[serde(default = "eight")]
    pub pools: u8,
    /// Exact-MAC filter entries (the 82576 has 24, the 82599 128): guests' MACs beyond them
    /// are served by the software path.
    #[serde(default = "twenty_four")]
    pub filters: u16,
    /// Large receive offload: TCP segments from the wire coalesced by the kernel's GRO rules
    /// before they reach the host or a guest (only with `offloads=off` on the wire: with
    /// offloads on, the kernel hands over frames it already coalesced).
    #[serde(default = "yes")]
    pub lro: bool,
    /// Interrupt moderation of the guests the device serves: `adaptive` (igb's three load
    /// classes, 14-250 us between interrupts), `off`, or a fixed interval in microseconds.
    /// Held interrupts are raised when the interval is up or the device goes idle.
    #[serde(default = "adaptive")]
    pub itr: String,
    /// Each guest pool's transmit rate (`100M`, `1G`): the device shapes what a guest sends to
    /// the wire. None: the wire's rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_rate: Option<BitRate>,
    /// An in-process wire instead of a TAP device (`nic:wire:NAME`): its other end is another
    /// switch's NIC model in this process (back to back) or a traffic generator. It carries
    /// plain frames, so the device segments (TSO) and checksums what it sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire: Option<String>,
}

fn adaptive() -> String {
    "adaptive".into()
}

impl NicConfig {
    /// What the model is built with.
    pub fn params(&self) -> Result<crate::uplink::nic::NicParams, String> {
        let level = if self.level == 0 { nic_models::Level::L0 } else { nic_models::Level::L1 };
        let sizes = nic_models::TableSizes { pools: self.pools, rar: self.filters, vlvf: 32 };
        let pool_rate = self.pool_rate.map(|r| r.0);
        Ok(crate::uplink::nic::NicParams { level, sizes, lro: self.lro, itr: self.itr_profile()?, pool_rate })
    }

    /// The moderation profile `itr` names.
    pub fn itr_profile(&self) -> Result<nic_models::Profile, String> {
        match self.itr.as_str() {
            "adaptive" => Ok(nic_models::Profile::Adaptive),
            "off" | "0" => Ok(nic_models::Profile::Off),
            us => match us.parse::<u64>() {
                Ok(n) if n <= 10_000 => Ok(nic_models::Profile::Fixed(n * 1000)),
                _ => Err(format!("itr={us} is not adaptive, off or microseconds (at most 10000)")),
            },
        }
    }
}

impl Default for NicConfig {
    fn default() -> Self {
        NicConfig { level: 1, pools: 8, filters: 24, lro: true, itr: adaptive(), pool_rate: None, wire: None }
    }
}

fn level_one() -> u8 {
    1
}

fn eight() -> u8 {
    8
}

fn twenty_four() -> u16 {
    24
}
