//! The policy vocabulary: what one `vf N ...` clause asks for ([`VfSet`]) and
//! what a PF reports about one VF ([`VfInfo`]).

use serde::{Deserialize, Serialize};

/// One `vf N [mac ..] [vlan ..] ...` clause: every field left `None` is not
/// sent, so the kernel keeps the VF's current value for it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VfSet {
    /// VF index, 0 to `sriov_numvfs - 1`.
    pub vf: u32,
    /// `mac LLADDR`: the VF's MAC address (`IFLA_VF_MAC`).
    pub mac: Option<[u8; 6]>,
    /// `vlan VID [qos Q] [proto P]`: the VF's port VLAN (`IFLA_VF_VLAN`, or
    /// `IFLA_VF_VLAN_LIST` for 802.1ad).
    pub vlan: Option<VlanSet>,
    /// `spoofchk on|off` (`IFLA_VF_SPOOFCHK`).
    pub spoofchk: Option<bool>,
    /// `trust on|off` (`IFLA_VF_TRUST`).
    pub trust: Option<bool>,
    /// `state auto|enable|disable` (`IFLA_VF_LINK_STATE`).
    pub state: Option<LinkState>,
    /// `max_tx_rate MBPS`, 0 = unlimited (`IFLA_VF_RATE`).
    pub max_tx_rate: Option<u32>,
    /// `min_tx_rate MBPS`, 0 = no guarantee (`IFLA_VF_RATE`).
    pub min_tx_rate: Option<u32>,
    /// `query_rss on|off` (`IFLA_VF_RSS_QUERY_EN`).
    pub query_rss: Option<bool>,
}

/// `vlan VID [qos Q] [proto 802.1Q|802.1ad]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VlanSet {
    /// VLAN id 0..=4095; 0 removes the port VLAN.
    pub vid: u16,
    /// 802.1p priority 0..=7.
    pub qos: u8,
    /// Tag protocol.
    pub proto: VlanProto,
}

/// VLAN tag protocol (TPID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VlanProto {
    /// 802.1Q, TPID 0x8100 (the default).
    #[default]
    Dot1Q,
    /// 802.1ad (QinQ service tag), TPID 0x88a8.
    Dot1AD,
}

impl VlanProto {
    /// The TPID, host order.
    pub fn ethertype(self) -> u16 {
        match self {
            VlanProto::Dot1Q => 0x8100,
            VlanProto::Dot1AD => 0x88a8,
        }
    }

    /// The name iproute2 prints and accepts (`802.1Q`, `802.1ad`).
    pub fn name(self) -> &'static str {
        match self {
            VlanProto::Dot1Q => "802.1Q",
            VlanProto::Dot1AD => "802.1ad",
        }
    }
}

/// `state auto|enable|disable`: the VF's link as its driver sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    /// Follow the PF's link (`IFLA_VF_LINK_STATE_AUTO`, 0).
    #[default]
    Auto,
    /// Always up (`IFLA_VF_LINK_STATE_ENABLE`, 1).
    Enable,
    /// Always down (`IFLA_VF_LINK_STATE_DISABLE`, 2).
    Disable,
}

impl LinkState {
    /// The kernel's value in `struct ifla_vf_link_state`.
    pub fn to_kernel(self) -> u32 {
        match self {
            LinkState::Auto => 0,
            LinkState::Enable => 1,
            LinkState::Disable => 2,
        }
    }

    /// The word iproute2 uses.
    pub fn name(self) -> &'static str {
        match self {
            LinkState::Auto => "auto",
            LinkState::Enable => "enable",
            LinkState::Disable => "disable",
        }
    }
}

/// One VF as the PF reports it (one `IFLA_VF_INFO` of an RTM_NEWLINK answer).
/// `None` in a flag means the driver did not report it (the kernel sends -1).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VfInfo {
    /// VF index.
    pub vf: u32,
    /// MAC address; all zeros when none is set.
    pub mac: [u8; 6],
    /// Port VLAN id, 0 = none.
    pub vlan: u16,
    /// Port VLAN priority.
    pub qos: u8,
    /// Port VLAN protocol.
    pub vlan_proto: VlanProto,
    /// Spoof checking.
    pub spoofchk: Option<bool>,
    /// Trusted VF.
    pub trust: Option<bool>,
    /// Link state; `None` when the attribute is absent.
    pub link_state: Option<LinkState>,
    /// Guaranteed rate, Mbit/s.
    pub min_tx_rate: u32,
    /// Rate limit, Mbit/s, 0 = unlimited.
    pub max_tx_rate: u32,
    /// RSS query permission.
    pub query_rss: Option<bool>,
    /// Counters, when the answer carried `IFLA_VF_STATS`.
    pub stats: Option<VfStats>,
}

/// Per-VF counters (`IFLA_VF_STATS`), named from the VF's point of view as the
/// kernel does: `rx` is what the VF received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VfStats {
    /// Packets received by the VF.
    pub rx_packets: u64,
    /// Packets sent by the VF.
    pub tx_packets: u64,
    /// Bytes received by the VF.
    pub rx_bytes: u64,
    /// Bytes sent by the VF.
    pub tx_bytes: u64,
    /// Broadcast packets received.
    pub broadcast: u64,
    /// Multicast packets received.
    pub multicast: u64,
    /// Received packets dropped.
    pub rx_dropped: u64,
    /// Sent packets dropped.
    pub tx_dropped: u64,
}

impl VfSet {
    /// The words of an equivalent `ip link set DEV vf ...` clause, in the
    /// order [`crate::set_request`] emits the attributes, so that iproute2
    /// given these words sends the same bytes.
    pub fn to_args(&self) -> Vec<String> {
        let mut w = vec![self.vf.to_string()];
        let mut push = |k: &str, v: String| {
            w.push(k.to_string());
            w.push(v);
        };
        if let Some(m) = self.mac {
            push("mac", crate::show::mac_text(&m));
        }
        if let Some(v) = self.vlan {
            push("vlan", v.vid.to_string());
            if v.qos != 0 {
                push("qos", v.qos.to_string());
            }
            if v.proto != VlanProto::Dot1Q {
                push("proto", v.proto.name().to_string());
            }
        }
        let on_off = |b: bool| if b { "on" } else { "off" }.to_string();
        if let Some(b) = self.spoofchk {
            push("spoofchk", on_off(b));
        }
        if let Some(b) = self.trust {
            push("trust", on_off(b));
        }
        if let Some(s) = self.state {
            push("state", s.name().to_string());
        }
        if let Some(b) = self.query_rss {
            push("query_rss", on_off(b));
        }
        if let Some(r) = self.max_tx_rate {
            push("max_tx_rate", r.to_string());
        }
        if let Some(r) = self.min_tx_rate {
            push("min_tx_rate", r.to_string());
        }
        w
    }

    /// Whether only one of `max_tx_rate`/`min_tx_rate` is given, so that the
    /// other must first be read from the kernel (iproute2's
    /// `ipaddr_get_vf_rate`).
    pub fn needs_current_rates(&self) -> bool {
        self.max_tx_rate.is_some() != self.min_tx_rate.is_some()
    }
}
