//! The request bytes iproute2 6.1 sends, built with netlink-packet-route's
//! emitter. Every builder names the iproute2 function whose message it
//! reproduces; `seq` is the only field that differs between runs.

use netlink_packet_core::{
    DefaultNla, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::link::{
    LinkAttribute, LinkExtentMask, LinkHeader, LinkMessage, LinkVfInfo, VfInfo as NlVf, VfInfoLinkState,
    VfInfoMac, VfInfoRate, VfInfoRssQueryEn, VfInfoSpoofCheck, VfInfoTrust, VfInfoVlan, VfLinkState, VfVlan,
    VfVlanInfo, VlanProtocol,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::args::check_rates;
use crate::error::ParseError;
use crate::types::{LinkState, VfSet, VlanProto};

/// `RTM_NEWLINK`.
pub const RTM_NEWLINK: u16 = 16;
/// `RTM_GETLINK`.
pub const RTM_GETLINK: u16 = 18;
/// `IFLA_ALT_IFNAME`, used instead of `IFLA_IFNAME` for names that are not
/// valid interface names (16 bytes or longer, or with `/` or spaces).
const IFLA_ALT_IFNAME: u16 = 53;
/// `IFNAMSIZ`.
const IFNAMSIZ: usize = 16;

/// The `RTM_NEWLINK` iproute2 sends for `ip link set DEV vf N ...`
/// (`iplink_modify`): `NLM_F_REQUEST|NLM_F_ACK`, an `AF_UNSPEC` ifinfomsg for
/// `ifindex`, and `IFLA_VFINFO_LIST { IFLA_VF_INFO { ... } }`.
///
/// The attributes inside `IFLA_VF_INFO` come in the order of
/// [`VfSet::to_args`] (iproute2 emits them in command-line order, always with
/// `IFLA_VF_RATE` last). 802.1Q VLANs use `IFLA_VF_VLAN`, 802.1ad ones
/// `IFLA_VF_VLAN_LIST`. When only one rate is set, the other comes from
/// `cur_rates` (`(min, max)` as read by [`rate_dump_request`]), else 0; check
/// the result with [`resolve_rates`] first.
pub fn set_request(ifindex: i32, set: &VfSet, cur_rates: Option<(u32, u32)>, seq: u32) -> Vec<u8> {
    let info = LinkVfInfo(vf_attributes(set, fill_rates(set, cur_rates)));
    let mut msg = link_message(AddressFamily::Unspec, ifindex);
    msg.attributes.push(LinkAttribute::VfInfoList(vec![info]));
    serialize(RouteNetlinkMessage::NewLink(msg), NLM_F_REQUEST | NLM_F_ACK, seq)
}

/// The `(min, max)` rates [`set_request`] will send, or `None` when the
/// clause sets no rate; refuses a min above a non-zero max as iproute2 does.
pub fn resolve_rates(set: &VfSet, cur_rates: Option<(u32, u32)>) -> Result<Option<(u32, u32)>, ParseError> {
    let rates = fill_rates(set, cur_rates);
    if let Some((min, max)) = rates {
        check_rates(min, max)?;
    }
    Ok(rates)
}

fn fill_rates(set: &VfSet, cur: Option<(u32, u32)>) -> Option<(u32, u32)> {
    if set.max_tx_rate.is_none() && set.min_tx_rate.is_none() {
        return None;
    }
    let (cur_min, cur_max) = cur.unwrap_or((0, 0));
    Some((set.min_tx_rate.unwrap_or(cur_min), set.max_tx_rate.unwrap_or(cur_max)))
}

/// The `IFLA_VF_*` attributes of one `IFLA_VF_INFO`, in emission order.
fn vf_attributes(set: &VfSet, rates: Option<(u32, u32)>) -> Vec<NlVf> {
    let vf = set.vf;
    let mut a = Vec::new();
    if let Some(mac) = set.mac {
        a.push(NlVf::Mac(VfInfoMac::new(vf, &mac)));
    }
    if let Some(v) = set.vlan {
        let (vid, qos) = (u32::from(v.vid), u32::from(v.qos));
        a.push(match v.proto {
            VlanProto::Dot1Q => NlVf::Vlan(VfInfoVlan::new(vf, vid, qos)),
            VlanProto::Dot1AD => {
                NlVf::VlanList(vec![VfVlan::Info(VfVlanInfo::new(vf, vid, qos, VlanProtocol::Ieee8021Ad))])
            }
        });
    }
    if let Some(on) = set.spoofchk {
        a.push(NlVf::SpoofCheck(VfInfoSpoofCheck::new(vf, on)));
    }
    if let Some(on) = set.trust {
        a.push(NlVf::Trust(VfInfoTrust::new(vf, on)));
    }
    if let Some(s) = set.state {
        a.push(NlVf::LinkState(VfInfoLinkState::new(vf, link_state(s))));
    }
    if let Some(on) = set.query_rss {
        a.push(NlVf::RssQueryEn(VfInfoRssQueryEn::new(vf, on)));
    }
    if let Some((min, max)) = rates {
        a.push(NlVf::Rate(VfInfoRate::new(vf, min, max)));
    }
    a
}

fn link_state(s: LinkState) -> VfLinkState {
    match s {
        LinkState::Auto => VfLinkState::Auto,
        LinkState::Enable => VfLinkState::Enable,
        LinkState::Disable => VfLinkState::Disable,
    }
}

/// The `RTM_GETLINK` iproute2 sends to turn a name into an ifindex
/// (lib/ll_map.c `ll_link_get`, on its own socket): no ACK flag, ifindex 0,
/// `IFLA_EXT_MASK = RTEXT_FILTER_VF|RTEXT_FILTER_SKIP_STATS`, then the name.
pub fn name_request(name: &str, seq: u32) -> Vec<u8> {
    let mut msg = link_message(AddressFamily::Unspec, 0);
    msg.attributes.push(LinkAttribute::ExtMask(vec![LinkExtentMask::Vf, LinkExtentMask::SkipStats]));
    msg.attributes.push(name_attribute(name));
    serialize(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST, seq)
}

/// The `RTM_GETLINK` iproute2 sends before a `mac` to learn the device's
/// address length (ip/iplink.c `nl_get_ll_addr_len`): no attributes.
pub fn addr_len_request(ifindex: i32, seq: u32) -> Vec<u8> {
    let msg = link_message(AddressFamily::Unspec, ifindex);
    serialize(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST, seq)
}

/// The dump iproute2 sends to read the current rates when only one of
/// `max_tx_rate`/`min_tx_rate` is given (ip/ipaddress.c `ipaddr_get_vf_rate`
/// → `rtnl_linkdump_req`): `NLM_F_DUMP` over all links, `AF_UNSPEC`,
/// `IFLA_EXT_MASK = RTEXT_FILTER_VF`.
pub fn rate_dump_request(seq: u32) -> Vec<u8> {
    let mut msg = link_message(AddressFamily::Unspec, 0);
    msg.attributes.push(LinkAttribute::ExtMask(vec![LinkExtentMask::Vf]));
    serialize(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST | NLM_F_DUMP, seq)
}

/// The `RTM_GETLINK` of `ip link show DEV` (ip/iplink.c `iplink_get`): by
/// name, `AF_PACKET`, `IFLA_EXT_MASK = RTEXT_FILTER_VF` (VF counters
/// included; `ip` prints them only with `-s`).
pub fn show_request(name: &str, seq: u32) -> Vec<u8> {
    let mut msg = link_message(AddressFamily::Packet, 0);
    msg.attributes.push(name_attribute(name));
    msg.attributes.push(LinkAttribute::ExtMask(vec![LinkExtentMask::Vf]));
    serialize(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST, seq)
}

/// The `RTM_GETLINK` for one ifindex with `IFLA_EXT_MASK = RTEXT_FILTER_VF`
/// (the VF list with counters), as iproute2's `ipaddr_link_get` sends it for
/// `ip -s addr show dev DEV`. The kernel answers it as it answers
/// [`show_request`].
pub fn get_vf_request(ifindex: i32, seq: u32) -> Vec<u8> {
    let mut msg = link_message(AddressFamily::Unspec, ifindex);
    msg.attributes.push(LinkAttribute::ExtMask(vec![LinkExtentMask::Vf]));
    serialize(RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST, seq)
}

/// `IFLA_IFNAME`, or `IFLA_ALT_IFNAME` for a name `check_ifname` refuses.
fn name_attribute(name: &str) -> LinkAttribute {
    let valid = !name.is_empty()
        && name.len() < IFNAMSIZ
        && !name.bytes().any(|b| b == b'/' || b.is_ascii_whitespace());
    if valid {
        LinkAttribute::IfName(name.to_string())
    } else {
        let mut v = name.as_bytes().to_vec();
        v.push(0);
        LinkAttribute::Other(DefaultNla::new(IFLA_ALT_IFNAME, v))
    }
}

fn link_message(family: AddressFamily, ifindex: i32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header = LinkHeader { interface_family: family, index: ifindex as u32, ..LinkHeader::default() };
    msg
}

fn serialize(inner: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::parse_vf_args;

    // Captured with `strace -e write=all ip -n NS link set vfa vf ...`
    // (iproute2 6.1, vfa is ifindex 3). Each message keeps its own seq.
    const NAME_VFA: &str = "300000001200010098e3146b000000000000000000000000000000000000000008001d0009000000\
                            0800030076666100";
    const ADDR_LEN: &str = "200000001200010098e3146b0000000000000000030000000000000000000000";
    const RATE_DUMP: &str =
        "280000001200010398e3146b000000000000000000000000000000000000000008001d0001000000";
    const MAC_VLAN_SPOOF: &str =
        "6c0000001000050099e3146b00000000000000000300000000000000000000004c00160048000100\
        2800010000000000001122334455000000000000000000000000000000000000000000000000000010000200\
        000000000a000000030000000c0004000000000001000000";
    const MAX_ONLY: &str =
        "380000001000050099e3146b0000000000000000030000000000000000000000180016001400010010000600\
        000000000000000064000000";
    const QINQ: &str =
        "400000001000050098e3146b0000000000000000030000000000000000000000200016001c00010018000c00\
        14000100000000000a0000000300000088a80000";
    const ALL: &str =
        "a80000001000050099e3146b000000000000000003000000000000000000000088001600840001002800010007000000\
        001122334455000000000000000000000000000000000000000000000000000018000c0014000100070000000a000000\
        0300000088a800000c00040007000000000000000c00090007000000010000000c00050007000000020000000c000700\
        070000000100000010000600070000000a00000064000000";
    const STATE: &str =
        "340000001000050098e3146b000000000000000003000000000000000000000014001600100001000c00050001000000\
        01000000";
    const BOTH_RATES: &str =
        "380000001000050098e3146b0000000000000000030000000000000000000000180016001400010010000600\
        020000001e0000002c010000";

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn seq_of(b: &[u8]) -> u32 {
        u32::from_le_bytes(b[8..12].try_into().unwrap())
    }

    fn assert_set(words: &str, cur: Option<(u32, u32)>, captured: &str) {
        let want = hex(captured);
        let set = parse_vf_args(&words.split_whitespace().collect::<Vec<_>>()).unwrap();
        assert_eq!(set_request(3, &set, cur, seq_of(&want)), want, "{words}");
    }

    #[test]
    fn test_set_request_matches_iproute2_capture() {
        assert_set("0 mac 00:11:22:33:44:55 vlan 10 qos 3 spoofchk on", None, MAC_VLAN_SPOOF);
        assert_set("0 max_tx_rate 100", None, MAX_ONLY);
        assert_set("0 vlan 10 qos 3 proto 802.1ad", None, QINQ);
        assert_set("1 state enable", None, STATE);
        assert_set("2 max_tx_rate 300 min_tx_rate 30", None, BOTH_RATES);
        assert_set(
            "7 mac 00:11:22:33:44:55 vlan 10 qos 3 proto 802.1ad spoofchk off trust on \
             state disable query_rss on max_tx_rate 100 min_tx_rate 10",
            None,
            ALL,
        );
    }

    #[test]
    fn test_lookup_requests_match_iproute2_capture() {
        let name = hex(NAME_VFA);
        assert_eq!(name_request("vfa", seq_of(&name)), name);
        let addr = hex(ADDR_LEN);
        assert_eq!(addr_len_request(3, seq_of(&addr)), addr);
        let dump = hex(RATE_DUMP);
        assert_eq!(rate_dump_request(seq_of(&dump)), dump);
    }

    #[test]
    fn test_show_requests_are_by_name_and_by_index() {
        // `ip link show vfa`, and `ip -s addr show dev vfa`.
        let show = hex("30000000120001000000000000000000110000000000000000000000000000000800030076666100\
                        08001d0001000000");
        assert_eq!(show_request("vfa", 0), show);
        let by_index = hex("28000000120001000000000000000000000000000300000000000000000000000800\
                            1d0001000000");
        assert_eq!(get_vf_request(3, 0), by_index);
    }

    #[test]
    fn test_long_names_use_alt_ifname() {
        let b = name_request("a-very-long-name-x", 1);
        // IFLA_ALT_IFNAME (53) after the 8-byte IFLA_EXT_MASK.
        assert_eq!(u16::from_le_bytes([b[42], b[43]]), 53);
        assert_eq!(&b[44..63], b"a-very-long-name-x\0");
    }

    #[test]
    fn test_missing_rate_comes_from_current_rates() {
        let set = VfSet { max_tx_rate: Some(100), ..VfSet::default() };
        assert_eq!(resolve_rates(&set, Some((40, 500))), Ok(Some((40, 100))));
        assert_eq!(resolve_rates(&set, None), Ok(Some((0, 100))));
        let set = VfSet { min_tx_rate: Some(600), ..VfSet::default() };
        assert_eq!(resolve_rates(&set, Some((40, 500))), Err(ParseError::MinAboveMax { min: 600, max: 500 }));
        assert_eq!(resolve_rates(&set, Some((40, 0))), Ok(Some((600, 0))));
        assert_eq!(resolve_rates(&VfSet::default(), Some((1, 2))), Ok(None));
        let b = set_request(3, &set, Some((40, 500)), 0);
        assert_eq!(&b[b.len() - 12..], [0, 0, 0, 0, 88, 2, 0, 0, 244, 1, 0, 0]);
    }
}
