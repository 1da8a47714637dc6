use super::*;

fn frame(dst: [u8; 6], vlan: Option<u16>, payload: usize) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    if let Some(v) = vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(f.len() + payload, 0);
    f
}

const GUEST_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const GUEST_B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];

/// Level 1 as the switch programs it: pool 0 is the software path (default pool, broadcast),
/// one pool per accelerated guest, programmed with the guest's MAC.
fn level1() -> Classifier {
    let mut c = Classifier::new(TableSizes::I82576).unwrap();
    let on = PoolOptions { enabled: true, accept_untagged: true, ..Default::default() };
    c.set_pool(0, PoolOptions { accept_broadcast: true, accept_hashed: true, ..on }).unwrap();
    c.set_pool(1, on).unwrap();
    c.set_pool(2, on).unwrap();
    c.add_mac(GUEST_A, 1).unwrap();
    c.add_mac(GUEST_B, 2).unwrap();
    c
}

#[test]
fn guests_unicast_goes_to_their_pool_and_the_rest_to_the_software_path() {
    let c = level1();
    assert_eq!(c.classify(&frame(GUEST_A, None, 46)), Verdict::Pools(1 << 1));
    assert_eq!(c.classify(&frame(GUEST_B, None, 46)), Verdict::Pools(1 << 2));
    // Unknown unicast: the default pool.
    assert_eq!(c.classify(&frame([0x52, 0, 0, 0, 0, 0x77], None, 46)), Verdict::Pools(1));
    // Broadcast: pools with BAM, only the software path here.
    assert_eq!(c.classify(&frame([0xff; 6], None, 46)), Verdict::Pools(1));
    // Multicast without a hash hit goes nowhere (the software path asks for it by hash).
    let mc = [0x01, 0x00, 0x5e, 0, 0, 1];
    assert_eq!(c.classify(&frame(mc, None, 46)), Verdict::NoPool);
}

#[test]
fn a_full_address_table_refuses_and_the_guest_stays_on_the_software_path() {
    let mut c = Classifier::new(TableSizes { pools: 2, rar: 2, vlvf: 1 }).unwrap();
    let on = PoolOptions { enabled: true, ..Default::default() };
    c.set_pool(0, on).unwrap();
    c.set_pool(1, on).unwrap();
    c.add_mac([2, 0, 0, 0, 0, 1], 1).unwrap();
    c.add_mac([2, 0, 0, 0, 0, 2], 1).unwrap();
    let e = c.add_mac([2, 0, 0, 0, 0, 3], 1).unwrap_err();
    assert!(matches!(e, TableError::Full { size: 2, .. }), "{e}");
    assert!(e.to_string().contains("software path"));
    assert_eq!(c.classify(&frame([2, 0, 0, 0, 0, 3], None, 46)), Verdict::Pools(1));
    // The same MAC again only adds a pool to its entry.
    assert_eq!(c.add_mac([2, 0, 0, 0, 0, 2], 0).unwrap(), 1);
    assert_eq!(c.classify(&frame([2, 0, 0, 0, 0, 2], None, 46)), Verdict::Pools(0b11));
    c.remove_mac([2, 0, 0, 0, 0, 2], 1);
    c.remove_mac([2, 0, 0, 0, 0, 2], 0);
    assert_eq!(c.add_mac([2, 0, 0, 0, 0, 3], 1).unwrap(), 1);
}

#[test]
fn vlans_select_pools_through_vlvf_and_the_vfta_drops_unknown_tags() {
    let mut c = level1();
    c.set_vlan_filter(true);
    c.add_vlan(10, 1).unwrap();
    // Tagged 10 to A: VLVF lets pool 1 have it.
    assert_eq!(c.classify(&frame(GUEST_A, Some(10), 46)), Verdict::Pools(1 << 1));
    // Tagged 10 to B: B's pool is not in VLAN 10, so the default pool (unicast, no pool left).
    assert_eq!(c.classify(&frame(GUEST_B, Some(10), 46)), Verdict::Pools(1));
    // Tag 20 is not in the VFTA: dropped.
    assert_eq!(c.classify(&frame(GUEST_A, Some(20), 46)), Verdict::VlanFiltered);
    // Untagged goes to AUPE pools: all three here.
    assert_eq!(c.classify(&frame(GUEST_A, None, 46)), Verdict::Pools(1 << 1));
}

#[test]
fn lengths_follow_lpe_and_rlpml_per_port_and_per_pool() {
    let mut c = level1();
    assert_eq!(c.classify(&frame(GUEST_A, None, 1500)), Verdict::Pools(1 << 1));
    assert_eq!(c.classify(&frame(GUEST_A, None, 1501)), Verdict::Oversized);
    assert_eq!(c.classify(&frame(GUEST_A, Some(0), 1500)), Verdict::Pools(1 << 1));
    c.set_port_lengths(true, 9018, false);
    // The port takes jumbo frames, pool 1 does not.
    assert_eq!(c.classify(&frame(GUEST_A, None, 8000)), Verdict::NoPool);
    let on = PoolOptions {
        enabled: true,
        accept_untagged: true,
        long_packets: true,
        max_len: 9018,
        ..Default::default()
    };
    c.set_pool(1, on).unwrap();
    assert_eq!(c.classify(&frame(GUEST_A, None, 9000)), Verdict::Pools(1 << 1));
    assert_eq!(c.classify(&frame(GUEST_A, None, 9001)), Verdict::Oversized);
    assert_eq!(c.classify(&[0u8; 13]), Verdict::Runt);
}

#[test]
fn sizes_and_indices_are_checked() {
    assert_eq!(Classifier::new(TableSizes { pools: 0, rar: 1, vlvf: 1 }).unwrap_err(), TableError::Pools(0));
    assert!(Classifier::new(TableSizes { pools: 65, rar: 1, vlvf: 1 }).is_err());
    assert!(Classifier::new(TableSizes { pools: 8, rar: 0, vlvf: 1 }).is_err());
    let mut c = Classifier::new(TableSizes::I82599).unwrap();
    assert!(c.set_rar(128, None).is_err());
    assert_eq!(c.add_mac(GUEST_A, 64).unwrap_err(), TableError::Pool { pool: 64, pools: 64 });
    // 64 pools: the last pool's bit is usable.
    c.set_pool(63, PoolOptions { enabled: true, ..Default::default() }).unwrap();
    c.add_mac(GUEST_A, 63).unwrap();
    assert_eq!(c.classify(&frame(GUEST_A, None, 46)), Verdict::Pools(1 << 63));
}
