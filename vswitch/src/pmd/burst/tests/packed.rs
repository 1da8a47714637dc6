//! The datapath over packed rings (VIRTIO_F_RING_PACKED): every test of the parent that does
//! not reach into a split ring's own fields, again with each guest's rings packed; a hostile
//! packed ring; and the datapath's instruction count per frame, split or packed.

use super::*;

/// Not a test: 64-byte frames from port 0 to port 1 through the datapath in bursts of 32, for
/// an instruction count per frame under callgrind (the datapath's A/B on a machine without
/// performance counters):
/// `PACKED=0|1 valgrind --tool=callgrind --toggle-collect='*poll_queue*' <test binary>
/// --ignored --exact pmd::burst::tests::packed::datapath_instructions_per_frame`, Ir / frames.
#[test]
#[ignore]
fn datapath_instructions_per_frame() {
    PACKED.set(std::env::var("PACKED").is_ok_and(|v| v == "1"));
    let mut n = net(vec![VlanMode::default(); 2], true);
    let (f0, f1) = (frame(MACS[1], MACS[0], None, 60), frame(MACS[0], MACS[1], None, 60));
    // Both MACs learned.
    n.post_rx(1, 1, 2048);
    n.send(0, &f0);
    n.poll(0);
    n.received(1);
    n.post_rx(0, 1, 2048);
    n.send(1, &f1);
    n.poll(1);
    n.received(0);
    let g0 = &mut n.guests[0];
    g0.tx.take_used(&g0.g);
    let tx = n.guests[0].g.alloc(72, 64);
    n.guests[0].g.write(tx, &[0u8; 12]);
    n.guests[0].g.write(tx + 12, &f0);
    let rx: Vec<u64> = (0..32).map(|_| n.guests[1].g.alloc(2048, 64)).collect();
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(2000);
    let (mut frames, mut busy) = (0, 0u64);
    for _ in 0..rounds {
        {
            let g1 = &mut n.guests[1];
            for b in &rx {
                g1.rx.add_chain(&g1.g, &[(*b, 2048, DESC_F_WRITE)]);
            }
            let g0 = &mut n.guests[0];
            for _ in 0..32 {
                g0.tx.add_chain(&g0.g, &[(tx, 72, 0)]);
            }
        }
        let mut got = 0;
        while got < 32 {
            let t = crate::clock::ticks();
            n.poll(0);
            busy += crate::clock::ticks() - t;
            let g1 = &mut n.guests[1];
            got += g1.rx.take_used(&g1.g).len();
        }
        let g0 = &mut n.guests[0];
        assert_eq!(g0.tx.take_used(&g0.g).len(), 32);
        frames += got;
    }
    println!("{frames} frames, {:.1} ticks per frame in poll", busy as f64 / frames as f64);
}

/// A packed ring's driver that makes a chain longer than the ring available (every
/// descriptor says NEXT): that queue stops, as a split ring's overrun does, and the others flow.
#[test]
fn test_a_packed_chain_longer_than_the_ring_stops_only_that_queue() {
    PACKED.set(true);
    let mut n = net(vec![VlanMode::default(); 3], true);
    n.post_rx(2, 4, 2048);
    {
        let gu = &mut n.guests[0];
        let TRing::Packed(r, _) = &gu.tx else { panic!("packed") };
        for slot in 0..r.size {
            r.write_desc(
                &gu.g,
                slot,
                0x8000,
                60,
                slot,
                virtq::ring::DESC_F_NEXT | virtq::packed::DESC_F_AVAIL,
            );
        }
    }
    assert_eq!(n.poll(0), 0);
    assert_eq!(n.tx_stats(0).drop_malformed, 1);
    assert_eq!(n.poll(0), 0, "stays stopped");
    let f = frame(MACS[2], MACS[1], None, 60);
    n.send(1, &f);
    n.poll(1);
    assert_eq!(n.received(2), vec![f], "other ports unaffected");
}

#[test]
fn unknown_unicast_floods_then_learned_goes_to_one_port() {
    packed(test_unknown_unicast_floods_then_learned_goes_to_one_port);
}

#[test]
fn batching_leaves_a_burst_in_a_loaded_guests_ring_until_the_next_or_the_wait() {
    packed(test_batching_leaves_a_burst_in_a_loaded_guests_ring_until_the_next_or_the_wait);
}

#[test]
fn broadcast_makes_one_copy_per_receiver() {
    packed(test_broadcast_makes_one_copy_per_receiver);
}

#[test]
fn vlan_isolation_and_tag_edits() {
    packed(test_vlan_isolation_and_tag_edits);
}

#[test]
fn full_destination_drops_without_copying() {
    packed(test_full_destination_drops_without_copying);
}

#[test]
fn malformed_chain_is_returned_and_counted_and_the_rest_flows() {
    packed(test_malformed_chain_is_returned_and_counted_and_the_rest_flows);
}

#[test]
fn mergeable_buffers_carry_a_large_frame() {
    packed(test_mergeable_buffers_carry_a_large_frame);
}

#[test]
fn without_mergeable_buffers_a_too_small_buffer_is_not_used() {
    packed(test_without_mergeable_buffers_a_too_small_buffer_is_not_used);
}

#[test]
fn no_hairpin_to_a_mac_on_the_same_port() {
    packed(test_no_hairpin_to_a_mac_on_the_same_port);
}

#[test]
fn multiqueue_receiver_with_fewer_running_pairs_still_gets_packets() {
    packed(test_multiqueue_receiver_with_fewer_running_pairs_still_gets_packets);
}

#[test]
fn used_entries_keep_ring_order_around_a_bad_receive_buffer() {
    packed(test_used_entries_keep_ring_order_around_a_bad_receive_buffer);
}

#[test]
fn split_header_and_frame_descriptors() {
    packed(test_split_header_and_frame_descriptors);
}

#[test]
fn gso_frame_goes_whole_to_tso_receivers_and_cut_for_the_others() {
    packed(test_gso_frame_goes_whole_to_tso_receivers_and_cut_for_the_others);
}

#[test]
fn gso_across_vlan_edits_and_ipv6() {
    packed(test_gso_across_vlan_edits_and_ipv6);
}

#[test]
fn whole_gso_frame_fills_one_big_chain_without_mergeable_buffers() {
    packed(test_whole_gso_frame_fills_one_big_chain_without_mergeable_buffers);
}

#[test]
fn partial_checksum_passed_on_or_completed() {
    packed(test_partial_checksum_passed_on_or_completed);
}

#[test]
fn gso_metadata_reaches_receivers_canonical_whatever_the_sender_wrote() {
    packed(test_gso_metadata_reaches_receivers_canonical_whatever_the_sender_wrote);
}

#[test]
fn the_policer_charges_a_gso_frame_for_every_segment() {
    packed(test_the_policer_charges_a_gso_frame_for_every_segment);
}

#[test]
fn parked_drain_stops_after_a_burst_of_bad_buffers() {
    packed(test_parked_drain_stops_after_a_burst_of_bad_buffers);
}

#[test]
fn rx_lookahead_asks_a_bounded_number_per_pass() {
    packed(test_rx_lookahead_asks_a_bounded_number_per_pass);
}

#[test]
fn bad_offload_requests_are_dropped_and_ignored_without_offloads() {
    packed(test_bad_offload_requests_are_dropped_and_ignored_without_offloads);
}

/// Not a test: the instruction count per frame of a full mesh of `PORTS` ports (default 64),
/// the harness's `--topology mesh`: every port sends bursts of 32 64-byte frames spread over
/// all the others, so a burst has up to 31 destinations and each destination gets ~32/(N-1)
/// frames of it. Against `datapath_instructions_per_frame` (one destination per burst) it
/// separates what a mesh costs in instructions from what it costs in memory:
/// `PORTS=8|64 valgrind --tool=callgrind --cache-sim=yes --toggle-collect='*poll_queue*'
/// <test binary> --ignored --exact pmd::burst::tests::packed::mesh_instructions_per_frame`.
#[test]
#[ignore]
fn mesh_instructions_per_frame() {
    PACKED.set(std::env::var("PACKED").is_ok_and(|v| v == "1"));
    let ports: usize = std::env::var("PORTS").ok().and_then(|r| r.parse().ok()).unwrap_or(64);
    let mac = |i: usize| [0x52, 0, 0, 0, (i >> 8) as u8, i as u8 + 1];
    let mut dp = Datapath::new(0, Arc::new(Fdb::new(4096, 300)));
    let mut guests = Vec::new();
    let mut port_refs = Vec::new();
    for i in 0..ports {
        let mut g = MockGuest::new(1 << 20);
        let tx = TRing::new(&mut g, 256);
        let rx = TRing::new(&mut g, 256);
        let port = Arc::new(Port::new(i as u16, format!("p{i}"), VlanMode::default(), mac(i), 1));
        *port.txq[0].lock() = Some(tx.queue_with(&g, true, Caps::default()).into());
        *port.rxq[0].lock() = Some(rx.queue_with(&g, true, Caps::default()).into());
        dp.add_port(port.clone());
        port_refs.push(port);
        guests.push(Guest { g, tx, rx, rx_bufs: HashMap::new() });
    }
    let mut n = Net { guests, ports: port_refs, dp };
    // Every MAC learned, as after the harness's warm-up.
    for i in 0..ports {
        n.dp.fdb.learn(0, crate::l2::mac_from_bytes(mac(i)), i as u16, 1);
    }
    // Per source: one transmit buffer per destination; per destination: 32 receive buffers.
    let tx: Vec<Vec<u64>> = (0..ports)
        .map(|s| {
            (0..ports)
                .map(|d| {
                    let g = &mut n.guests[s].g;
                    let b = g.alloc(72, 64);
                    g.write(b, &[0u8; 12]);
                    g.write(b + 12, &frame(mac(d), mac(s), None, 60));
                    b
                })
                .collect()
        })
        .collect();
    let rx: Vec<Vec<u64>> =
        (0..ports).map(|d| (0..32).map(|_| n.guests[d].g.alloc(2048, 64)).collect()).collect();
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(4000 / ports);
    let (mut frames, mut busy) = (0, 0u64);
    for _ in 0..rounds {
        for (gu, bufs) in n.guests.iter_mut().zip(&rx) {
            for b in bufs {
                gu.rx.add_chain(&gu.g, &[(*b, 2048, DESC_F_WRITE)]);
            }
        }
        // Each source's 32 frames go to the next 32 ports after it (wrapping, skipping
        // itself), so every destination gets 32 frames a round.
        for (s, (gu, bufs)) in n.guests.iter_mut().zip(&tx).enumerate() {
            for k in 0..32 {
                let d = (s + 1 + k % (ports - 1)) % ports;
                gu.tx.add_chain(&gu.g, &[(bufs[d], 72, 0)]);
            }
        }
        for s in 0..ports {
            let t = crate::clock::ticks();
            while n.poll(s) > 0 {}
            busy += crate::clock::ticks() - t;
        }
        for gu in n.guests.iter_mut() {
            assert_eq!(gu.tx.take_used(&gu.g).len(), 32);
            frames += gu.rx.take_used(&gu.g).len();
        }
    }
    assert_eq!(frames, rounds * ports * 32, "every frame delivered");
    println!("{frames} frames, {:.1} ticks per frame in poll", busy as f64 / frames as f64);
}

/// A shaped port on packed rings holds packets back with their used entries already written:
/// none of the held ones shows a used flag (a shaped queue's ring is not eager), so a driver
/// reading several descriptors' flags at once cannot take one early; the ones let go show.
#[test]
fn test_a_shaped_packed_port_shows_no_used_flag_for_held_packets() {
    use crate::policy::{BitRate, ByteSize, PolicyConfig, ShaperConfig};
    PACKED.set(true);
    let mut n = net(vec![VlanMode::default(); 2], true);
    n.post_rx(1, 64, 2048);
    // 1 Mbit/s with the smallest bucket (one 1518-byte frame): about 20 of a burst of 32 go, the rest wait.
    let egress =
        ShaperConfig { rate: BitRate(1_000_000), burst: Some(ByteSize(1518)), queue: Some(64), pps: None };
    n.ports[1].set_policy(&PolicyConfig { ingress: None, egress: Some(egress), anti_spoof: None }).unwrap();
    for k in 0..32u8 {
        n.send(0, &frame(MACS[1], MACS[0], None, 60 + k as usize));
    }
    n.poll(0);
    let got = n.received(1).len();
    let held = n.ports[1].policy.held.load(std::sync::atomic::Ordering::Relaxed) as usize;
    assert!(held >= 2 && got + held == 32, "{got} let go, {held} held");
    let gu = &n.guests[1];
    let TRing::Packed(r, _) = &gu.rx else { panic!("packed") };
    // First lap: a used descriptor has AVAIL and USED both set.
    let used = (0..r.size)
        .filter(|slot| gu.g.read_u16(r.desc + 16 * u64::from(*slot) + 14) & 0x8080 == 0x8080)
        .count();
    assert_eq!(used, got, "only the packets let go show used flags ({held} held)");
}
