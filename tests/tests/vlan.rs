//! 802.1Q through real vhost-user connections: access ports (untagged members of one VLAN),
//! trunks (tagged members of listed VLANs), and a port with no VLAN setting (trunk of all).
//!
//! Topology of every test: a10 (vlan=10), a20 (vlan=20), tr (trunk=10:20), b10 (vlan=10),
//! all (no VLAN option).

use std::time::Duration;

use e2e_tests::{
    assert_one_copy_each, connect_default, drain, find, mac, mac_str, recv_n, send, start_switch, wait_stats,
    Scratch, BCAST,
};
use vswitch::control::Stats;
use vswitch::Switch;
use vswitch_bench::frame::{build_frame, verify_frame};
use vswitch_bench::frontend::Frontend;

const T: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(50);
const NAMES: [&str; 5] = ["a10", "a20", "tr", "b10", "all"];
const A10: usize = 0;
const A20: usize = 1;
const TR: usize = 2;
const B10: usize = 3;
const ALL: usize = 4;

struct Net {
    _dir: Scratch,
    sw: Switch,
    fe: Vec<Frontend>,
}

fn net(name: &str) -> Net {
    let dir = Scratch::new(name);
    let sw = start_switch(&dir, &["a10,vlan=10", "a20,vlan=20", "tr,trunk=10:20", "b10,vlan=10", "all"]);
    let fe = NAMES.iter().map(|n| connect_default(&dir, n)).collect();
    Net { _dir: dir, sw, fe }
}

/// Packets delivered to each port, in NAMES order.
fn tx_packets(s: &Stats) -> Vec<u64> {
    NAMES.iter().map(|p| find(s, p).tx.packets).collect()
}

fn m(port: usize) -> [u8; 6] {
    mac(0x10 + port as u8)
}

/// `build_frame` with a tag whose TCI is `tci` (priority bits included).
fn tagged(dst: [u8; 6], src: [u8; 6], tci: u16, seq: u64) -> Vec<u8> {
    let mut f = build_frame(dst, src, Some(tci & 0xfff), 100, seq);
    f[14..16].copy_from_slice(&tci.to_be_bytes());
    f
}

fn untagged(dst: [u8; 6], src: [u8; 6], seq: u64) -> Vec<u8> {
    build_frame(dst, src, None, 100, seq)
}

impl Net {
    /// Sends `f` from port `from`, then checks that exactly the listed ports got exactly the
    /// listed frame and that every other port got nothing.
    fn check(&mut self, from: usize, f: &[u8], expect: &[(usize, Vec<u8>)]) {
        send(&mut self.fe[from], 0, f);
        for (p, want) in expect {
            let got = recv_n(&mut self.fe[*p], 1, T);
            assert_eq!(got.len(), 1, "{} should get the frame from {}", NAMES[*p], NAMES[from]);
            assert!(
                got[0] == *want,
                "{} got from {}:\n{:02x?}\nexpected:\n{:02x?}",
                NAMES[*p],
                NAMES[from],
                &got[0][..18],
                &want[..18]
            );
        }
        for (fe, name) in self.fe.iter_mut().zip(NAMES) {
            let extra = drain(fe, QUIET);
            assert!(extra.is_empty(), "{} got {} unexpected frames from {}", name, extra.len(), NAMES[from]);
        }
    }
}

#[test]
fn test_access_broadcast_stays_in_its_vlan_untagged_on_access_tagged_on_trunks() {
    let mut n = net("vlan-access");
    // VLAN 10 broadcast from an access port.
    let f = untagged(BCAST, m(A10), 1);
    let t10 = build_frame(BCAST, m(A10), Some(10), 100, 1);
    assert_eq!(verify_frame(&t10), Some(1));
    n.check(A10, &f, &[(B10, f.clone()), (TR, t10.clone()), (ALL, t10)]);
    // VLAN 20 broadcast from the other access port: never reaches VLAN 10.
    let f = untagged(BCAST, m(A20), 2);
    let t20 = build_frame(BCAST, m(A20), Some(20), 100, 2);
    n.check(A20, &f, &[(TR, t20.clone()), (ALL, t20)]);
    // Unicast within VLAN 10 to a learned MAC: only that port, untagged.
    let f = untagged(m(A10), m(B10), 3);
    n.check(B10, &f, &[(A10, f.clone())]);
    let s = wait_stats(&n.sw, T, |s| tx_packets(s) == [1, 0, 2, 1, 2]);
    assert_eq!(tx_packets(&s), [1, 0, 2, 1, 2]);
    // Pushing a tag: 4 more bytes delivered, the frame itself copied once.
    let tr = find(&s, "tr");
    assert_eq!((tr.tx.bytes, tr.tx.bytes_copied), (2 * 146, 2 * 142));
    assert_one_copy_each(&s);
}

#[test]
fn test_trunk_frames_reach_their_vlan_and_lose_the_tag_on_access_ports() {
    let mut n = net("vlan-trunk");
    // Tagged VLAN 20 with priority 5 from the trunk: a20 gets it untagged (payload intact);
    // the all-VLAN port gets it with the tag (priority included) as it came.
    let f = tagged(BCAST, m(TR), 0xa014, 1);
    n.check(TR, &f, &[(A20, untagged(BCAST, m(TR), 1)), (ALL, f.clone())]);
    // Tagged VLAN 10: both VLAN 10 access ports, untagged.
    let f = tagged(BCAST, m(TR), 10, 2);
    let u = untagged(BCAST, m(TR), 2);
    n.check(TR, &f, &[(A10, u.clone()), (B10, u), (ALL, f.clone())]);
    // Reply from an access port to the trunk's MAC (learned in VLAN 10): only the trunk, tagged.
    let f = untagged(m(TR), m(B10), 3);
    n.check(B10, &f, &[(TR, build_frame(m(TR), m(B10), Some(10), 100, 3))]);
    // The all-VLAN port sends tagged VLAN 10: both access ports untagged, the trunk tagged.
    let f = tagged(BCAST, m(ALL), 10, 4);
    let u = untagged(BCAST, m(ALL), 4);
    n.check(ALL, &f, &[(A10, u.clone()), (B10, u), (TR, f.clone())]);
    let s = wait_stats(&n.sw, T, |s| tx_packets(s) == [2, 1, 2, 2, 2]);
    assert_eq!(tx_packets(&s), [2, 1, 2, 2, 2]);
    let a20 = find(&s, "a20");
    assert_eq!((a20.tx.bytes, a20.tx.bytes_copied), (142, 142), "popping: 4 bytes fewer, all copied");
    assert_one_copy_each(&s);
}

#[test]
fn test_frames_outside_a_ports_vlans_are_dropped_and_counted_as_filtered() {
    let mut n = net("vlan-filter");
    // Trunk: VLAN 30 is not listed; untagged is VLAN 0, not listed either.
    n.check(TR, &tagged(BCAST, m(TR), 30, 1), &[]);
    n.check(TR, &untagged(BCAST, m(TR), 2), &[]);
    // Access port: tagged frames are refused, whatever the VLAN (even its own).
    n.check(A10, &tagged(BCAST, m(A10), 10, 3), &[]);
    n.check(A10, &tagged(BCAST, m(A10), 20, 4), &[]);
    // All-VLAN port: VLAN 30 and untagged (VLAN 0) are accepted but have no other member.
    n.check(ALL, &tagged(BCAST, m(ALL), 30, 5), &[]);
    n.check(ALL, &untagged(BCAST, m(ALL), 6), &[]);
    let filtered = |s: &Stats| NAMES.iter().map(|p| find(s, p).rx.drop_filtered).collect::<Vec<u64>>();
    let s = wait_stats(&n.sw, T, |s| find(s, "all").rx.drop_no_route == 2 && filtered(s) == [2, 0, 2, 0, 0]);
    let filtered = filtered(&s);
    assert_eq!(filtered, vec![2, 0, 2, 0, 0]);
    assert_eq!(find(&s, "all").rx.drop_no_route, 2, "accepted but no other member");
    assert!(s.ports.iter().all(|p| p.tx.packets == 0), "nothing delivered anywhere");
    // Filtered frames taught the switch nothing; accepted ones did, in their VLAN.
    let fdb: Vec<(u16, String)> = n.sw.fdb().unwrap().into_iter().map(|e| (e.vlan, e.mac)).collect();
    assert_eq!(fdb, vec![(0, mac_str(m(ALL))), (30, mac_str(m(ALL)))]);
    // Their buffers were all returned.
    assert_eq!(n.fe[TR].tx_completed(0), 2);
    assert_eq!(n.fe[A10].tx_completed(0), 2);
}

#[test]
fn test_learning_is_per_vlan() {
    let mut n = net("vlan-learn");
    let x = mac(0x99);
    // MAC X appears in VLAN 10 on a10 and in VLAN 20 on the trunk.
    n.check(
        A10,
        &untagged(BCAST, x, 1),
        &[
            (B10, untagged(BCAST, x, 1)),
            (TR, build_frame(BCAST, x, Some(10), 100, 1)),
            (ALL, build_frame(BCAST, x, Some(10), 100, 1)),
        ],
    );
    n.check(TR, &tagged(BCAST, x, 20, 2), &[(A20, untagged(BCAST, x, 2)), (ALL, tagged(BCAST, x, 20, 2))]);
    let fdb = n.sw.fdb().unwrap();
    let ports = n.sw.ports().unwrap();
    let name = |id: u16| ports.iter().find(|p| p.id == id).unwrap().name.clone();
    let mut got: Vec<(u16, String, String)> =
        fdb.iter().map(|e| (e.vlan, e.mac.clone(), name(e.port))).collect();
    got.sort();
    assert_eq!(got, vec![(10, mac_str(x), "a10".into()), (20, mac_str(x), "tr".into())]);
    // Unicast to X: in VLAN 20 it goes to the trunk, in VLAN 10 to a10.
    n.check(A20, &untagged(x, m(A20), 3), &[(TR, build_frame(x, m(A20), Some(20), 100, 3))]);
    n.check(B10, &untagged(x, m(B10), 4), &[(A10, untagged(x, m(B10), 4))]);
}

#[test]
fn test_priority_tagged_frame_from_access_port_is_retagged_not_double_tagged() {
    let mut n = net("vlan-prio");
    // 802.1p: VID 0 with priority 3 on an access port belongs to the access VLAN.
    let f = tagged(BCAST, m(A10), 0x6000, 1);
    let u = untagged(BCAST, m(A10), 1);
    // On a trunk it must carry one tag: the access VLAN, the priority kept.
    n.check(
        A10,
        &f,
        &[(B10, u), (TR, tagged(BCAST, m(A10), 0x600a, 1)), (ALL, tagged(BCAST, m(A10), 0x600a, 1))],
    );
}
