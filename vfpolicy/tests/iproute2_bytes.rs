//! Byte-for-byte against iproute2: for each `vf N ...` clause, `ip link set
//! vfa vf ...` and this crate's `Rtnl::set_vf` run in the same fresh netns
//! against the same veth, both under `strace -e write=all`, and every netlink
//! message they send must be equal (`nlmsg_seq` masked). A veth has no VF
//! operations, so the kernel refuses both with EOPNOTSUPP, and our error must
//! carry the line `ip` printed.
//!
//! Our side runs as this test binary re-executed inside `ip netns exec`, with
//! only the `child_vfpolicy_side` test selected; run normally, that test does
//! nothing.

mod common;

use common::{hex_lines, is_newlink_probe, mask_seq, missing, strace, Capture, Netns};
use vfpolicy::{format_vf_lines, parse_vf_args, Rtnl};

/// Every option alone and together, in the canonical order of
/// `VfSet::to_args` (iproute2 emits attributes in command-line order).
const CASES: &[&str] = &[
    "0 mac 02:11:22:33:44:55",
    "0 vlan 10",
    "0 vlan 10 qos 3",
    "0 vlan 10 qos 3 proto 802.1ad",
    "0 vlan 20 proto 802.1Q",
    "0 vlan 0",
    "0 spoofchk on",
    "0 spoofchk off",
    "0 trust on",
    "1 trust off",
    "0 state auto",
    "0 state enable",
    "0 state disable",
    "0 query_rss on",
    "2 query_rss off",
    "0 max_tx_rate 1000 min_tx_rate 100",
    "0 max_tx_rate 500",
    "3 min_tx_rate 50",
    "7 mac 02:11:22:33:44:55 vlan 10 qos 3 proto 802.1ad spoofchk off trust on state disable \
     query_rss on max_tx_rate 100 min_tx_rate 10",
];

const MARK_ERR: &str = "VFPOLICY_ERROR_BEGIN";
const MARK_END: &str = "VFPOLICY_ERROR_END";

/// Runs this binary's `child_vfpolicy_side` in the netns under strace.
fn ours(ns: &Netns, mode: &str, dev: &str, words: &str) -> Capture {
    let exe = std::env::current_exe().unwrap();
    let exe = exe.to_str().unwrap();
    let args = [
        "ip",
        "netns",
        "exec",
        &ns.name,
        exe,
        "--exact",
        "child_vfpolicy_side",
        "--nocapture",
        "--test-threads=1",
    ];
    let env = [("VFPOLICY_CHILD", mode), ("VFPOLICY_DEV", dev), ("VFPOLICY_ARGS", words)];
    strace(&args, &env)
}

/// What the child printed between the markers.
fn child_error(c: &Capture) -> Option<String> {
    let start = c.stdout.find(MARK_ERR)? + MARK_ERR.len() + 1;
    let end = c.stdout.find(MARK_END)?;
    Some(c.stdout.get(start..end)?.trim_end().to_string())
}

fn child_errno(c: &Capture) -> Option<i32> {
    // libtest's "test child_vfpolicy_side ... " may precede it on the line.
    let line = c.stdout.lines().find_map(|l| l.split("VFPOLICY_ERRNO ").nth(1))?;
    line.trim().parse().ok()
}

/// ip's messages without the leading `iplink_have_newlink` probe, which this
/// crate does not send.
fn without_probe(mut msgs: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    assert!(
        msgs.first().is_some_and(|m| is_newlink_probe(m)),
        "ip no longer starts with the RTM_NEWLINK probe:\n{}",
        hex_lines(&msgs)
    );
    msgs.remove(0);
    msgs
}

fn masked(msgs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    msgs.iter().map(|m| mask_seq(m)).collect()
}

#[test]
fn set_vf_sends_iproute2s_bytes_and_gets_its_error() {
    if let Some(why) = missing(&["ip", "strace", "timeout"], true) {
        eprintln!("skipped: {why}");
        return;
    }
    let ns = Netns::new("set");
    for case in CASES {
        let words: Vec<&str> = case.split_whitespace().collect();
        let set = parse_vf_args(&words).unwrap();
        assert_eq!(parse_vf_args(&set.to_args()).unwrap(), set, "{case}");

        let mut ip_args = vec!["ip", "-n", &ns.name, "link", "set", "vfa", "vf"];
        ip_args.extend_from_slice(&words);
        let ip = strace(&ip_args, &[]);
        let ip_msgs = without_probe(ip.messages);
        let us = ours(&ns, "set", "vfa", case);
        // At least the name lookup and the RTM_NEWLINK.
        assert!(ip_msgs.len() >= 2, "{case}: ip sent {}", hex_lines(&ip_msgs));

        assert_eq!(
            masked(&us.messages),
            masked(&ip_msgs),
            "{case}: bytes differ\nours:\n{}\nip:\n{}\nchild stdout:\n{}",
            hex_lines(&us.messages),
            hex_lines(&ip_msgs),
            us.stdout
        );
        let ip_line = ip.stderr.trim();
        assert_eq!(ip_line, "RTNETLINK answers: Operation not supported", "{case}");
        assert_eq!(child_errno(&us), Some(libc::EOPNOTSUPP), "{case}: {}", us.stdout);
        let err = child_error(&us).unwrap_or_default();
        assert_eq!(err.lines().next(), Some(ip_line), "{case}: {err}");
    }
}

#[test]
fn set_vf_on_a_missing_device_fails_like_ip() {
    if let Some(why) = missing(&["ip", "strace", "timeout"], true) {
        eprintln!("skipped: {why}");
        return;
    }
    let ns = Netns::new("nodev");
    let ip = strace(&["ip", "-n", &ns.name, "link", "set", "nosuch", "vf", "0", "trust", "on"], &[]);
    let ip_msgs = without_probe(ip.messages);
    let us = ours(&ns, "set", "nosuch", "0 trust on");
    assert_eq!(masked(&us.messages), masked(&ip_msgs), "{}", hex_lines(&us.messages));
    let ip_line = ip.stderr.trim();
    assert_eq!(ip_line, "Cannot find device \"nosuch\"");
    assert!(child_error(&us).unwrap_or_default().starts_with(ip_line), "{}", us.stdout);
}

#[test]
fn show_asks_what_ip_link_show_asks() {
    if let Some(why) = missing(&["ip", "strace", "timeout"], true) {
        eprintln!("skipped: {why}");
        return;
    }
    let ns = Netns::new("show");
    let ip = strace(&["ip", "-n", &ns.name, "link", "show", "vfa"], &[]);
    let mut ip_msgs = without_probe(ip.messages);
    // ip then looks up the veth peer's name to print "vfa@vfb"; we print no
    // link line, so we do not.
    let peer = ip_msgs.pop().expect("ip sent nothing");
    assert_eq!(peer[4..6], vfpolicy::RTM_GETLINK.to_ne_bytes(), "peer lookup");
    let us = ours(&ns, "show", "vfa", "");
    assert_eq!(
        masked(&us.messages),
        masked(&ip_msgs),
        "ours:\n{}\nip:\n{}",
        hex_lines(&us.messages),
        hex_lines(&ip_msgs)
    );
    // A veth is on no bus: no IFLA_NUM_VF, no VF list, no VF lines in ip's output.
    assert!(us.stdout.contains("VFPOLICY_OK None []"), "{}", us.stdout);
    assert!(!ip.stdout.contains("    vf "), "{}", ip.stdout);
}

/// Our side of the comparisons above; does nothing unless they started it.
#[test]
fn child_vfpolicy_side() {
    let Ok(mode) = std::env::var("VFPOLICY_CHILD") else {
        return;
    };
    let dev = std::env::var("VFPOLICY_DEV").unwrap();
    let words = std::env::var("VFPOLICY_ARGS").unwrap();
    let mut rtnl = Rtnl::open().unwrap();
    let result = if mode == "set" {
        let set = parse_vf_args(&words.split_whitespace().collect::<Vec<_>>()).unwrap();
        rtnl.set_vf(&dev, &set).map(|()| String::new())
    } else {
        rtnl.vfs(&dev).map(|(n, vfs)| format!("{n:?} {vfs:?} {}", format_vf_lines(&vfs, true)))
    };
    match result {
        Ok(s) => println!("VFPOLICY_OK {s}"),
        Err(e) => {
            println!("VFPOLICY_ERRNO {}", e.errno().unwrap_or(0));
            println!("{MARK_ERR}\n{e}\n{MARK_END}");
        }
    }
}
