//! The kernel's side: the RTM_NEWLINK a PF's driver answers `ip link show`
//! with, built with netlink-packet-route in the attribute order of the
//! kernel's `rtnl_fill_vfinfo`. A modelled NIC can answer with it, and tests
//! use it as input for [`crate::parse_vf_list`] and for iproute2 itself.

use netlink_packet_core::{DefaultNla, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::{
    LinkAttribute, LinkHeader, LinkLayerType, LinkMessage, LinkVfInfo, VfInfo as NlVf, VfInfoBroadcast,
    VfInfoLinkState, VfInfoMac, VfInfoRate, VfInfoTxRate, VfInfoVlan, VfLinkState, VfStats as NlStats,
    VfVlan, VfVlanInfo, VlanProtocol,
};
use netlink_packet_route::RouteNetlinkMessage;

use crate::types::{LinkState, VfInfo, VfStats, VlanProto};

const IFLA_VF_SPOOFCHK: u16 = 4;
const IFLA_VF_RSS_QUERY_EN: u16 = 7;
const IFLA_VF_TRUST: u16 = 9;

/// An RTM_NEWLINK for the Ethernet PF `name` (`ifindex`, MAC `pf_mac`) with
/// `IFLA_NUM_VF = infos.len()` and one `IFLA_VF_INFO` per entry, as the
/// kernel sends it for a `RTEXT_FILTER_VF` request.
pub fn vf_link_answer(ifindex: i32, name: &str, pf_mac: [u8; 6], infos: &[VfInfo], seq: u32) -> Vec<u8> {
    let mut msg = LinkMessage::default();
    msg.header =
        LinkHeader { index: ifindex as u32, link_layer_type: LinkLayerType::Ether, ..LinkHeader::default() };
    msg.attributes = vec![
        LinkAttribute::IfName(name.to_string()),
        LinkAttribute::Address(pf_mac.to_vec()),
        LinkAttribute::Broadcast(vec![0xff; 6]),
        LinkAttribute::NumVf(infos.len() as u32),
        LinkAttribute::VfInfoList(infos.iter().map(vf_info).collect()),
    ];
    let mut header = NetlinkHeader::default();
    header.sequence_number = seq;
    let inner = RouteNetlinkMessage::NewLink(msg);
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
    nl.finalize();
    let mut buf = vec![0; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

fn vf_info(v: &VfInfo) -> LinkVfInfo {
    let vf = v.vf;
    let (vlan, qos) = (u32::from(v.vlan), u32::from(v.qos));
    let proto = match v.vlan_proto {
        VlanProto::Dot1Q => VlanProtocol::Ieee8021Q,
        VlanProto::Dot1AD => VlanProtocol::Ieee8021Ad,
    };
    let mut a = vec![
        NlVf::Mac(VfInfoMac::new(vf, &v.mac)),
        NlVf::Broadcast(VfInfoBroadcast::new(&[0xff; 6])),
        NlVf::Vlan(VfInfoVlan::new(vf, vlan, qos)),
        NlVf::Rate(VfInfoRate::new(vf, v.min_tx_rate, v.max_tx_rate)),
        NlVf::TxRate(VfInfoTxRate::new(vf, v.max_tx_rate)),
        setting(IFLA_VF_SPOOFCHK, vf, v.spoofchk),
    ];
    if let Some(s) = v.link_state {
        a.push(NlVf::LinkState(VfInfoLinkState::new(vf, link_state(s))));
    }
    a.push(setting(IFLA_VF_RSS_QUERY_EN, vf, v.query_rss));
    a.push(setting(IFLA_VF_TRUST, vf, v.trust));
    a.push(NlVf::VlanList(vec![VfVlan::Info(VfVlanInfo::new(vf, vlan, qos, proto))]));
    if let Some(s) = &v.stats {
        a.push(NlVf::Stats(stats(s)));
    }
    LinkVfInfo(a)
}

/// `{vf, setting}` with the kernel's -1 for "not reported", which
/// netlink-packet-route's boolean types cannot carry.
fn setting(kind: u16, vf: u32, on: Option<bool>) -> NlVf {
    let value = on.map_or(u32::MAX, u32::from);
    let mut bytes = vf.to_ne_bytes().to_vec();
    bytes.extend_from_slice(&value.to_ne_bytes());
    NlVf::Other(DefaultNla::new(kind, bytes))
}

fn link_state(s: LinkState) -> VfLinkState {
    match s {
        LinkState::Auto => VfLinkState::Auto,
        LinkState::Enable => VfLinkState::Enable,
        LinkState::Disable => VfLinkState::Disable,
    }
}

fn stats(s: &VfStats) -> Vec<NlStats> {
    vec![
        NlStats::RxPackets(s.rx_packets),
        NlStats::TxPackets(s.tx_packets),
        NlStats::RxBytes(s.rx_bytes),
        NlStats::TxBytes(s.tx_bytes),
        NlStats::Broadcast(s.broadcast),
        NlStats::Multicast(s.multicast),
        NlStats::RxDropped(s.rx_dropped),
        NlStats::TxDropped(s.tx_dropped),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_vf_list;
    use netlink_packet_core::NetlinkMessage;

    fn sample() -> Vec<VfInfo> {
        vec![
            VfInfo {
                vf: 0,
                mac: [0, 0x11, 0x22, 0x33, 0x44, 0x55],
                vlan: 10,
                qos: 3,
                vlan_proto: VlanProto::Dot1AD,
                spoofchk: Some(true),
                trust: None,
                link_state: Some(LinkState::Auto),
                min_tx_rate: 10,
                max_tx_rate: 100,
                query_rss: Some(false),
                stats: Some(VfStats {
                    rx_packets: 1,
                    tx_packets: 2,
                    rx_bytes: 3,
                    tx_bytes: 4,
                    broadcast: 5,
                    multicast: 6,
                    rx_dropped: 7,
                    tx_dropped: 8,
                }),
            },
            VfInfo {
                vf: 1,
                spoofchk: None,
                trust: Some(true),
                link_state: Some(LinkState::Disable),
                query_rss: None,
                ..VfInfo::default()
            },
        ]
    }

    #[test]
    fn test_parse_vf_list_round_trips_the_emitted_answer() {
        let infos = sample();
        let bytes = vf_link_answer(5, "pf0", [2, 0, 0, 0, 0, 9], &infos, 7);
        assert_eq!(parse_vf_list(&bytes), Ok((Some(2), infos)));
    }

    #[test]
    fn test_netlink_packet_route_reads_the_same_values() {
        let infos = sample();
        let bytes = vf_link_answer(5, "pf0", [2, 0, 0, 0, 0, 9], &infos, 7);
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes).unwrap();
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) = msg.payload else {
            panic!("not a NewLink: {msg:?}");
        };
        let list = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::VfInfoList(l) => Some(l.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(list.len(), 2);
        let vf0 = &list[0].0;
        assert!(vf0.contains(&NlVf::Mac(VfInfoMac::new(0, &infos[0].mac))));
        assert!(vf0.contains(&NlVf::Rate(VfInfoRate::new(0, 10, 100))));
        assert!(vf0.contains(&NlVf::VlanList(vec![VfVlan::Info(VfVlanInfo::new(
            0,
            10,
            3,
            VlanProtocol::Ieee8021Ad
        ))])));
        assert!(vf0.contains(&NlVf::Stats(stats(infos[0].stats.as_ref().unwrap()))));
    }

    #[test]
    fn test_a_link_without_vfs_has_none() {
        let bytes = vf_link_answer(5, "veth0", [2, 0, 0, 0, 0, 9], &[], 7);
        assert_eq!(parse_vf_list(&bytes), Ok((Some(0), vec![])));
        let mut no_list = bytes.clone();
        no_list.truncate(no_list.len() - 4 - 8); // drop NUM_VF and the empty list
        let len = no_list.len() as u32;
        no_list[..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(parse_vf_list(&no_list), Ok((None, vec![])));
    }
}
