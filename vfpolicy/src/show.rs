//! The VF lines of `ip link show DEV`, as iproute2 6.1's `print_vfinfo`
//! (ip/ipaddress.c) prints them for an Ethernet PF, and its JSON form.

use std::fmt::Write;

use serde_json::{json, Map, Value};

use crate::types::{VfInfo, VfStats, VlanProto};

/// The VF lines `ip link show DEV` prints (`ip -s link show DEV` when
/// `with_stats`), one `    vf N ...` line per VF, each ending in `\n`.
///
/// `ip -d` prints the same VF lines as plain `ip`. The kernel sends
/// `IFLA_VF_BROADCAST`, `IFLA_VF_TX_RATE` (= max_tx_rate) and the dropped
/// counters for every VF, so they are printed as iproute2 prints them then;
/// human-readable (`-h`) counters are not reproduced.
pub fn format_vf_lines(infos: &[VfInfo], with_stats: bool) -> String {
    let mut out = String::new();
    for vf in infos {
        out.push_str(&vf_line(vf));
        out.push('\n');
        if let (true, Some(s)) = (with_stats, &vf.stats) {
            out.push_str(&stats_lines(s));
        }
    }
    out
}

fn vf_line(vf: &VfInfo) -> String {
    let mut l = format!("    vf {}     link/ether {} brd ff:ff:ff:ff:ff:ff", vf.vf, mac_text(&vf.mac));
    // `write!` into a String cannot fail.
    if vf.vlan != 0 {
        let _ = write!(l, ", vlan {}", vf.vlan);
    }
    if vf.qos != 0 {
        let _ = write!(l, ", qos {}", vf.qos);
    }
    if vf.vlan_proto != VlanProto::Dot1Q {
        let _ = write!(l, ", vlan protocol {}", vf.vlan_proto.name());
    }
    if vf.max_tx_rate != 0 {
        let _ = write!(l, ", tx rate {} (Mbps)", vf.max_tx_rate);
        let _ = write!(l, ", max_tx_rate {}Mbps", vf.max_tx_rate);
    }
    if vf.min_tx_rate != 0 {
        let _ = write!(l, ", min_tx_rate {}Mbps", vf.min_tx_rate);
    }
    if let Some(on) = vf.spoofchk {
        l.push_str(if on { ", spoof checking on" } else { ", spoof checking off" });
    }
    if let Some(s) = vf.link_state {
        let _ = write!(l, ", link-state {}", s.name());
    }
    if let Some(on) = vf.trust {
        l.push_str(if on { ", trust on" } else { ", trust off" });
    }
    if let Some(on) = vf.query_rss {
        l.push_str(if on { ", query_rss on" } else { ", query_rss off" });
    }
    l
}

/// `print_vf_stats64` without `-h`: headers, then `%Nu ` columns.
fn stats_lines(s: &VfStats) -> String {
    format!(
        "    RX: bytes  packets  mcast   bcast   dropped \n    {:>10} {:>8} {:>7} {:>7} {:>8} \n\
         \x20   TX: bytes  packets   dropped \n    {:>10} {:>8} {:>8} \n",
        s.rx_bytes,
        s.rx_packets,
        s.multicast,
        s.broadcast,
        s.rx_dropped,
        s.tx_bytes,
        s.tx_packets,
        s.tx_dropped
    )
}

/// The `vfinfo_list` array of `ip -j link show DEV` (`ip -j -s` when
/// `with_stats`), with iproute2's keys.
pub fn vf_json(infos: &[VfInfo], with_stats: bool) -> Value {
    Value::Array(infos.iter().map(|vf| one_vf_json(vf, with_stats)).collect())
}

fn one_vf_json(vf: &VfInfo, with_stats: bool) -> Value {
    let mut o = Map::new();
    o.insert("vf".into(), json!(vf.vf));
    o.insert("link_type".into(), json!("ether"));
    o.insert("address".into(), json!(mac_text(&vf.mac)));
    o.insert("broadcast".into(), json!("ff:ff:ff:ff:ff:ff"));
    let mut vlan = Map::new();
    if vf.vlan != 0 {
        vlan.insert("vlan".into(), json!(vf.vlan));
    }
    if vf.qos != 0 {
        vlan.insert("qos".into(), json!(vf.qos));
    }
    if vf.vlan_proto != VlanProto::Dot1Q {
        vlan.insert("protocol".into(), json!(vf.vlan_proto.name()));
    }
    o.insert("vlan_list".into(), json!([vlan]));
    if vf.max_tx_rate != 0 {
        o.insert("tx_rate".into(), json!(vf.max_tx_rate));
    }
    o.insert("rate".into(), json!({"max_tx": vf.max_tx_rate, "min_tx": vf.min_tx_rate}));
    let flags = [("spoofchk", vf.spoofchk), ("trust", vf.trust), ("query_rss_en", vf.query_rss)];
    for (key, v) in flags {
        if let Some(on) = v {
            o.insert(key.into(), json!(on));
        }
    }
    if let Some(s) = vf.link_state {
        o.insert("link_state".into(), json!(s.name()));
    }
    if let (true, Some(s)) = (with_stats, &vf.stats) {
        o.insert(
            "stats".into(),
            json!({
                "rx": {"bytes": s.rx_bytes, "packets": s.rx_packets, "multicast": s.multicast,
                       "broadcast": s.broadcast, "dropped": s.rx_dropped},
                "tx": {"tx_bytes": s.tx_bytes, "tx_packets": s.tx_packets,
                       "dropped": s.tx_dropped},
            }),
        );
    }
    Value::Object(o)
}

/// `aa:bb:cc:dd:ee:ff`, as `ll_addr_n2a` prints a MAC.
pub fn mac_text(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::LinkState;

    fn vf0() -> VfInfo {
        VfInfo {
            vf: 0,
            mac: [0, 0x11, 0x22, 0x33, 0x44, 0x55],
            vlan: 10,
            qos: 3,
            vlan_proto: VlanProto::Dot1Q,
            spoofchk: Some(true),
            trust: Some(false),
            link_state: Some(LinkState::Auto),
            min_tx_rate: 0,
            max_tx_rate: 0,
            query_rss: Some(false),
            stats: None,
        }
    }

    #[test]
    fn test_line_as_print_vfinfo_prints_it() {
        assert_eq!(
            format_vf_lines(&[vf0()], false),
            "    vf 0     link/ether 00:11:22:33:44:55 brd ff:ff:ff:ff:ff:ff, vlan 10, qos 3, \
             spoof checking on, link-state auto, trust off, query_rss off\n"
        );
    }

    #[test]
    fn test_unreported_flags_and_zero_values_are_left_out() {
        let vf = VfInfo { vf: 12, link_state: Some(LinkState::Disable), ..VfInfo::default() };
        assert_eq!(
            format_vf_lines(&[vf], true),
            "    vf 12     link/ether 00:00:00:00:00:00 brd ff:ff:ff:ff:ff:ff, link-state disable\n"
        );
    }

    #[test]
    fn test_rates_and_qinq() {
        let vf = VfInfo { vlan_proto: VlanProto::Dot1AD, max_tx_rate: 1000, min_tx_rate: 100, ..vf0() };
        assert!(format_vf_lines(&[vf], false).contains(
            ", vlan 10, qos 3, vlan protocol 802.1ad, tx rate 1000 (Mbps), max_tx_rate 1000Mbps, \
             min_tx_rate 100Mbps, spoof checking on"
        ));
    }

    #[test]
    fn test_stats_block_as_ip_s_prints_it() {
        let vf = VfInfo {
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
            ..vf0()
        };
        let text = format_vf_lines(&[vf], true);
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(
            lines,
            [
                "    RX: bytes  packets  mcast   bcast   dropped ",
                "             3        1       6       5        7 ",
                "    TX: bytes  packets   dropped ",
                "             4        2        8 ",
            ]
        );
    }

    #[test]
    fn test_json_uses_iproute2_keys() {
        let v = vf_json(&[vf0()], false);
        assert_eq!(
            v,
            json!([{
                "vf": 0, "link_type": "ether", "address": "00:11:22:33:44:55",
                "broadcast": "ff:ff:ff:ff:ff:ff", "vlan_list": [{"vlan": 10, "qos": 3}],
                "rate": {"max_tx": 0, "min_tx": 0}, "spoofchk": true, "link_state": "auto",
                "trust": false, "query_rss_en": false
            }])
        );
    }
}
