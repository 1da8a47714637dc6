//! `format_vf_lines` against iproute2 6.1 itself: the kernel's answer for a
//! PF with given VFs is built with `vf_link_answer` (netlink-packet-route's
//! emitter), written to a file, and printed by `ip -d [-s] monitor file`,
//! which runs the same `print_linkinfo`/`print_vfinfo` as `ip link show`.
//! Needs `ip`, not root.

mod common;

use common::{missing, run};
use vfpolicy::{format_vf_lines, parse_vf_list, vf_link_answer, LinkState, VfInfo, VfStats, VlanProto};

fn vfs() -> Vec<VfInfo> {
    let base = VfInfo {
        vf: 0,
        mac: [0, 0x11, 0x22, 0x33, 0x44, 0x55],
        spoofchk: Some(true),
        trust: Some(false),
        link_state: Some(LinkState::Auto),
        query_rss: Some(false),
        ..VfInfo::default()
    };
    vec![
        VfInfo { vlan: 10, qos: 3, ..base.clone() },
        VfInfo {
            vf: 1,
            vlan: 4095,
            qos: 7,
            vlan_proto: VlanProto::Dot1AD,
            max_tx_rate: 1000,
            min_tx_rate: 100,
            link_state: Some(LinkState::Enable),
            ..base.clone()
        },
        VfInfo {
            vf: 2,
            mac: [0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54],
            spoofchk: None,
            trust: None,
            query_rss: None,
            link_state: Some(LinkState::Disable),
            min_tx_rate: 5,
            ..base.clone()
        },
        VfInfo {
            vf: 63,
            spoofchk: Some(false),
            trust: Some(true),
            query_rss: Some(true),
            max_tx_rate: u32::MAX,
            link_state: None,
            stats: Some(VfStats {
                rx_packets: 1,
                tx_packets: 22,
                rx_bytes: 333_333_333_333,
                tx_bytes: 4444,
                broadcast: 55,
                multicast: 666_666,
                rx_dropped: 7,
                tx_dropped: u64::MAX,
            }),
            ..base.clone()
        },
        VfInfo { vf: 64, stats: Some(VfStats::default()), ..base },
    ]
}

/// The VF lines of `ip [flags] monitor file FILE` for the PF answer.
fn ip_vf_lines(flags: &[&str], answer: &[u8], tag: &str) -> String {
    let file = std::env::temp_dir().join(format!("vfpolicy-{}-{tag}.nl", std::process::id()));
    std::fs::write(&file, answer).unwrap();
    let mut args = vec!["ip"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["monitor", "file", file.to_str().unwrap()]);
    let out = run(&args, &[]);
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{}", common::text(&out.stderr));
    let mut s = String::new();
    for line in common::text(&out.stdout).lines().skip_while(|l| !l.starts_with("    vf ")) {
        s.push_str(line);
        s.push('\n');
    }
    s
}

#[test]
fn vf_lines_match_ip_link_show() {
    if let Some(why) = missing(&["ip", "timeout"], false) {
        eprintln!("skipped: {why}");
        return;
    }
    let infos = vfs();
    let answer = vf_link_answer(5, "pf0", [2, 0, 0, 0, 0, 9], &infos, 0);
    let ip = ip_vf_lines(&["-d"], &answer, "d");
    assert_eq!(ip.lines().count(), infos.len(), "{ip}");
    assert_eq!(ip, format_vf_lines(&infos, false));
    assert_eq!(ip_vf_lines(&["-d", "-s"], &answer, "ds"), format_vf_lines(&infos, true));
}

#[test]
fn vf_lines_of_the_parsed_answer_match_ip() {
    if let Some(why) = missing(&["ip", "timeout"], false) {
        eprintln!("skipped: {why}");
        return;
    }
    let answer = vf_link_answer(5, "pf0", [2, 0, 0, 0, 0, 9], &vfs(), 0);
    let (num, parsed) = parse_vf_list(&answer).unwrap();
    assert_eq!(num, Some(5));
    assert_eq!(ip_vf_lines(&["-d", "-s"], &answer, "parsed"), format_vf_lines(&parsed, true));
}
