//! Level 3's PF and VFs, driven with the words `ip link set PF vf N ...` takes: the policy
//! each word sets, what the device refuses (whole requests, with a real PF driver's errno), and
//! the enforcement QEMU's igb does not model (spoof checking, link state, VLAN filters).

use nic_models::sriov::{self, veb, Egress, Ingress, Pf, VfDrop, EINVAL, EPERM};
use vfpolicy::{parse_vf_args, LinkState, VlanProto};

const A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
const B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb];

fn set(pf: &mut Pf, words: &str) -> Result<(), sriov::VfError> {
    let args: Vec<String> = words.split_whitespace().map(String::from).collect();
    pf.set(&parse_vf_args(&args).expect("iproute2 accepts these words"))
}

fn frame(dst: [u8; 6], src: [u8; 6], tag: Option<(u16, u16)>) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some((tpid, tci)) = tag {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(64, 0x5a);
    f
}

#[test]
fn every_word_sets_what_ip_link_show_reads_back() {
    let mut pf = Pf::new(4, 10_000).unwrap();
    let fresh = &pf.info()[2];
    assert_eq!(
        (fresh.spoofchk, fresh.trust, fresh.link_state, fresh.mac),
        (Some(true), Some(false), Some(LinkState::Auto), [0; 6]),
        "a new VF: spoof checking on, untrusted, no address"
    );
    set(
        &mut pf,
        "2 mac 02:00:00:00:00:0a vlan 100 qos 3 proto 802.1ad spoofchk off trust on state disable \
         max_tx_rate 300 min_tx_rate 100 query_rss on",
    )
    .unwrap();
    let v = &pf.info()[2];
    assert_eq!((v.vf, v.mac, v.vlan, v.qos, v.vlan_proto), (2, A, 100, 3, VlanProto::Dot1AD));
    assert_eq!(
        (v.spoofchk, v.trust, v.link_state, v.query_rss),
        (Some(false), Some(true), Some(LinkState::Disable), Some(true))
    );
    assert_eq!((v.min_tx_rate, v.max_tx_rate), (100, 300));
    // What is not mentioned is kept; one rate alone keeps the other (iproute2 reads it first).
    set(&mut pf, "2 max_tx_rate 500").unwrap();
    let v = &pf.info()[2];
    assert_eq!((v.min_tx_rate, v.max_tx_rate, v.vlan, v.mac), (100, 500, 100, A));
    set(&mut pf, "2 vlan 0").unwrap();
    assert_eq!((pf.info()[2].vlan, pf.info()[2].qos), (0, 0));
    // The other VFs are untouched.
    assert_eq!(pf.info()[1].mac, [0; 6]);
}

#[test]
fn refused_requests_change_nothing_and_say_why() {
    let mut pf = Pf::new(2, 1_000).unwrap();
    let e = set(&mut pf, "2 mac 02:00:00:00:00:0a").unwrap_err();
    assert_eq!(e.errno, EINVAL);
    assert!(e.why.contains("VF 2 does not exist") && e.why.contains("2 VFs"), "{e}");
    let e = set(&mut pf, "0 mac 01:00:5e:00:00:01").unwrap_err();
    assert!(e.why.contains("multicast"), "{e}");
    // A good part and a bad part: neither is applied.
    let e = set(&mut pf, "0 mac 02:00:00:00:00:0a max_tx_rate 2000").unwrap_err();
    assert!(e.why.contains("above the link speed (1000 Mbit/s)"), "{e}");
    assert_eq!(pf.info()[0].mac, [0; 6], "the address of a refused request was applied");
    set(&mut pf, "0 max_tx_rate 100").unwrap();
    let e = set(&mut pf, "0 min_tx_rate 200").unwrap_err();
    assert!(e.why.contains("min_tx_rate 200 is above max_tx_rate 100"), "{e}");
    set(&mut pf, "0 min_tx_rate 100").unwrap();
    let e = set(&mut pf, "1 min_tx_rate 950").unwrap_err();
    assert!(e.why.contains("add up to 1050"), "{e}");
    assert!(Pf::new(0, 1000).is_err() && Pf::new(64, 1000).is_err());
}

#[test]
fn spoof_checking_drops_other_sources_and_self_tagged_frames() {
    let mut pf = Pf::new(2, 10_000).unwrap();
    set(&mut pf, "0 mac 02:00:00:00:00:0a").unwrap();
    assert_eq!(pf.egress(0, &frame(B, A, None)), Egress::Pass(None));
    assert_eq!(pf.egress(0, &frame(A, B, None)), Egress::Drop(VfDrop::SpoofedMac));
    set(&mut pf, "0 spoofchk off").unwrap();
    assert_eq!(pf.egress(0, &frame(A, B, None)), Egress::Pass(None));
    // Behind a port VLAN the device tags; a guest's own tag is a spoofed VLAN.
    set(&mut pf, "0 spoofchk on vlan 100 qos 5").unwrap();
    let tci = (5u16 << 13 | 100).to_be_bytes();
    assert_eq!(pf.egress(0, &frame(B, A, None)), Egress::Pass(Some([0x81, 0, tci[0], tci[1]])));
    assert_eq!(pf.egress(0, &frame(B, A, Some((0x8100, 200)))), Egress::Drop(VfDrop::SpoofedVlan));
    // Without a port VLAN an untrusted VF is a member of no VLAN: its tags are spoofed too
    // (priority tags pass); a trusted one may tag.
    set(&mut pf, "0 vlan 0").unwrap();
    assert_eq!(pf.egress(0, &frame(B, A, Some((0x8100, 200)))), Egress::Drop(VfDrop::SpoofedVlan));
    assert_eq!(pf.egress(0, &frame(B, A, Some((0x8100, 5 << 13)))), Egress::Pass(None));
    set(&mut pf, "0 trust on").unwrap();
    assert_eq!(pf.egress(0, &frame(B, A, Some((0x8100, 200)))), Egress::Pass(None));
    set(&mut pf, "0 vlan 100 proto 802.1ad trust off").unwrap();
    assert_eq!(pf.egress(0, &frame(B, A, None)), Egress::Pass(Some([0x88, 0xa8, 0, 100])));
    assert_eq!(pf.egress(0, &frame(B, A, None)[..13]), Egress::Drop(VfDrop::Runt));
}

#[test]
fn link_state_disable_stops_both_ways_and_auto_follows_the_pf() {
    let mut pf = Pf::new(1, 10_000).unwrap();
    set(&mut pf, "0 mac 02:00:00:00:00:0a state disable").unwrap();
    assert_eq!(pf.egress(0, &frame(B, A, None)), Egress::Drop(VfDrop::LinkDown));
    assert_eq!(pf.ingress(0, &frame(A, B, None)), Ingress::Drop(VfDrop::LinkDown));
    set(&mut pf, "0 state auto").unwrap();
    assert_eq!(pf.ingress(0, &frame(A, B, None)), Ingress::Deliver { strip: false });
    pf.link_up = false;
    assert_eq!(pf.egress(0, &frame(B, A, None)), Egress::Drop(VfDrop::LinkDown));
    set(&mut pf, "0 state enable").unwrap();
    assert_eq!(pf.egress(0, &frame(B, A, None)), Egress::Pass(None));
}

#[test]
fn receive_filter_takes_its_address_its_vlan_and_broadcast_unless_trusted() {
    let mut pf = Pf::new(1, 10_000).unwrap();
    set(&mut pf, "0 mac 02:00:00:00:00:0a vlan 7").unwrap();
    assert_eq!(pf.ingress(0, &frame(A, B, Some((0x8100, 7)))), Ingress::Deliver { strip: true });
    assert_eq!(pf.ingress(0, &frame(A, B, Some((0x8100, 8)))), Ingress::Drop(VfDrop::VlanFilter));
    assert_eq!(pf.ingress(0, &frame(A, B, None)), Ingress::Drop(VfDrop::VlanFilter));
    assert_eq!(pf.ingress(0, &frame(A, B, Some((0x88a8, 7)))), Ingress::Drop(VfDrop::VlanFilter));
    assert_eq!(pf.ingress(0, &frame([0xff; 6], B, Some((0x8100, 7)))), Ingress::Deliver { strip: true });
    let mcast = [0x01, 0, 0x5e, 0, 0, 1];
    assert_eq!(pf.ingress(0, &frame(mcast, B, Some((0x8100, 7)))), Ingress::Drop(VfDrop::AddressFilter));
    assert_eq!(pf.ingress(0, &frame(B, A, Some((0x8100, 7)))), Ingress::Drop(VfDrop::AddressFilter));
    set(&mut pf, "0 trust on").unwrap();
    assert_eq!(pf.ingress(0, &frame(mcast, B, Some((0x8100, 7)))), Ingress::Deliver { strip: true });
    assert_eq!(pf.ingress(0, &frame(B, A, Some((0x8100, 7)))), Ingress::Deliver { strip: true });
    // Without a port VLAN: untagged (and priority-tagged) only, unless trusted.
    set(&mut pf, "0 vlan 0 trust off").unwrap();
    assert_eq!(pf.ingress(0, &frame(A, B, None)), Ingress::Deliver { strip: false });
    assert_eq!(pf.ingress(0, &frame(A, B, Some((0x8100, 3 << 13)))), Ingress::Deliver { strip: false });
    assert_eq!(pf.ingress(0, &frame(A, B, Some((0x8100, 9)))), Ingress::Drop(VfDrop::VlanFilter));
    set(&mut pf, "0 trust on").unwrap();
    assert_eq!(pf.ingress(0, &frame(A, B, Some((0x8100, 9)))), Ingress::Deliver { strip: false });
}

#[test]
fn only_a_trusted_vf_replaces_the_administrators_address() {
    let mut pf = Pf::new(2, 10_000).unwrap();
    // No address set: the VF takes the one its driver asks for.
    pf.request_mac(1, B).unwrap();
    assert_eq!(pf.vf(1).unwrap().mac(), B);
    assert_eq!(pf.info()[1].mac, [0; 6], "ip link shows the administrator's address only");
    set(&mut pf, "0 mac 02:00:00:00:00:0a").unwrap();
    let e = pf.request_mac(0, B).unwrap_err();
    assert_eq!(e.errno, EPERM);
    assert!(e.why.contains("not trusted") && e.why.contains("trust on"), "{e}");
    assert_eq!(pf.egress(0, &frame(A, B, None)), Egress::Drop(VfDrop::SpoofedMac));
    set(&mut pf, "0 trust on").unwrap();
    pf.request_mac(0, B).unwrap();
    assert_eq!((pf.vf(0).unwrap().mac(), pf.info()[0].mac), (B, B));
    assert_eq!(pf.egress(0, &frame(A, B, None)), Egress::Pass(None));
}

#[test]
fn the_embedded_switch_carries_unicast_between_attached_vfs_of_one_vlan() {
    let mut pf = Pf::new(3, 10_000).unwrap();
    set(&mut pf, "0 mac 02:00:00:00:00:0a").unwrap();
    set(&mut pf, "1 mac 02:00:00:00:00:0b").unwrap();
    pf.vf_mut(0).unwrap().attached = Some(10);
    assert!(pf.veb_table().is_empty() || pf.veb_table().iter().all(|e| e.vf == 0));
    pf.vf_mut(1).unwrap().attached = Some(11);
    let t = pf.veb_table();
    assert_eq!(t.len(), 2);
    let to_b = veb(&t, 0, &frame(B, A, None)).expect("VF 0 to VF 1");
    assert_eq!((to_b.vf, to_b.port), (1, 11));
    assert_eq!(veb(&t, 1, &frame(B, A, None)), None, "a VF's frame to itself stays out of the VEB");
    assert_eq!(veb(&t, 0, &frame([0xff; 6], A, None)), None, "broadcast leaves the VEB");
    assert_eq!(veb(&t, 0, &frame([2, 0, 0, 0, 0, 0xc], A, None)), None);
    // Port VLANs separate VFs: VF 0 tags 5, VF 1 has none.
    set(&mut pf, "0 vlan 5").unwrap();
    let t = pf.veb_table();
    let tagged = frame(B, A, Some((0x8100, 5)));
    assert_eq!(veb(&t, 0, &tagged), None);
    set(&mut pf, "1 vlan 5").unwrap();
    assert_eq!(veb(&pf.veb_table(), 0, &tagged).map(|e| e.vf), Some(1));
}

#[test]
fn statistics_count_as_the_kernel_does() {
    let mut s = vfpolicy::VfStats::default();
    sriov::count(&mut s, true, &frame(B, A, None));
    sriov::count(&mut s, false, &frame([0xff; 6], B, None));
    sriov::count(&mut s, false, &frame([1, 0, 0x5e, 0, 0, 1], B, None));
    assert_eq!((s.tx_packets, s.tx_bytes, s.rx_packets, s.rx_bytes), (1, 64, 2, 128));
    assert_eq!((s.broadcast, s.multicast), (1, 1));
}
