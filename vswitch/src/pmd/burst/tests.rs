#![allow(clippy::undocumented_unsafe_blocks)]
use std::collections::HashMap;

use super::viommu::{drain_parked, rx_lookahead, LOOKAHEAD};
use super::*;
use crate::clock::now_ns;
use crate::l2::vlan::VlanSet;
use crate::l2::VlanMode;
use crate::offload::csum::Sum;
use crate::offload::{self, Caps, NetHdr};
use crate::virtio::mock::{MockGuest, MockPackedRing, MockQueue, MockRing};
use crate::virtio::VirtQueue;
use virtq::ring::DESC_F_WRITE;

const MACS: [[u8; 6]; 4] =
    [[0x52, 0, 0, 0, 0, 1], [0x52, 0, 0, 0, 0, 2], [0x52, 0, 0, 0, 0, 3], [0x52, 0, 0, 0, 0, 4]];
const BCAST: [u8; 6] = [0xff; 6];

thread_local! {
    /// Whether this test's guests use packed rings (see [`packed`]).
    static PACKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs test `f` again with every guest on packed rings.
fn packed(f: fn()) {
    PACKED.set(true);
    f();
}

/// A test guest's ring: split, or packed under [`packed`].
enum TRing {
    Split(MockRing),
    Packed(MockPackedRing, usize),
}

impl TRing {
    fn new(g: &mut MockGuest, size: u16) -> Self {
        if PACKED.get() {
            TRing::Packed(g.packed_ring(size), 0)
        } else {
            TRing::Split(g.ring(size))
        }
    }

    /// Makes a chain available; its id (a split ring's head, a packed ring's buffer id).
    fn add_chain(&mut self, g: &MockGuest, bufs: &[(u64, u32, u16)]) -> u32 {
        match self {
            TRing::Split(r) => r.add_chain(g, bufs) as u32,
            TRing::Packed(r, _) => r.add_chain(g, bufs) as u32,
        }
    }

    fn take_used(&mut self, g: &MockGuest) -> Vec<(u32, u32)> {
        match self {
            TRing::Split(r) => r.take_used(g),
            TRing::Packed(r, n) => {
                let u: Vec<_> = r.take_used(g).into_iter().map(|(id, len)| (id as u32, len)).collect();
                *n += u.len();
                u
            }
        }
    }

    /// Used entries written so far.
    fn used_count(&self, g: &MockGuest) -> usize {
        match self {
            TRing::Split(r) => g.read_u16(r.used + 2) as usize,
            TRing::Packed(_, n) => *n,
        }
    }

    fn queue_with(&self, g: &MockGuest, mrg: bool, caps: Caps) -> VirtQueue {
        match self {
            TRing::Split(r) => r.queue_with(g, mrg, caps),
            TRing::Packed(r, _) => r.queue_with(g, mrg, caps),
        }
    }

    /// The split ring of a test about split rings.
    fn split(&self) -> &MockRing {
        match self {
            TRing::Split(r) => r,
            TRing::Packed(..) => panic!("a split-ring test"),
        }
    }
}

struct Guest {
    g: MockGuest,
    tx: TRing,
    rx: TRing,
    rx_bufs: HashMap<u32, (u64, u32)>,
}

struct Net {
    guests: Vec<Guest>,
    ports: Vec<Arc<Port>>,
    dp: Datapath,
}

fn net(modes: Vec<VlanMode>, mrg: bool) -> Net {
    let n = modes.len();
    net_caps(modes, vec![Caps::default(); n], mrg)
}

/// Guests that negotiated the offloads `caps`.
fn net_caps(modes: Vec<VlanMode>, caps: Vec<Caps>, mrg: bool) -> Net {
    let mut dp = Datapath::new(0, Arc::new(Fdb::new(1024, 300)));
    let mut guests = Vec::new();
    let mut ports = Vec::new();
    for (i, (mode, caps)) in modes.into_iter().zip(caps).enumerate() {
        let mut g = MockGuest::new(4 << 20);
        let tx = TRing::new(&mut g, 64);
        let rx = TRing::new(&mut g, 64);
        let port = Arc::new(Port::new(i as u16, format!("p{i}"), mode, MACS[i], 1));
        *port.txq[0].lock() = Some(tx.queue_with(&g, mrg, caps).into());
        *port.rxq[0].lock() = Some(rx.queue_with(&g, mrg, caps).into());
        dp.add_port(port.clone());
        ports.push(port);
        guests.push(Guest { g, tx, rx, rx_bufs: HashMap::new() });
    }
    Net { guests, ports, dp }
}

fn frame(dst: [u8; 6], src: [u8; 6], tci: Option<u16>, len: usize) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(dst);
    f.extend(src);
    if let Some(t) = tci {
        f.extend([0x81, 0x00]);
        f.extend(t.to_be_bytes());
    }
    f.extend([0x08, 0x00]);
    while f.len() < len {
        f.push(f.len() as u8);
    }
    f
}

impl Net {
    fn send(&mut self, p: usize, frame: &[u8]) {
        let gu = &mut self.guests[p];
        let gpa = gu.g.alloc(12 + frame.len() as u64, 8);
        gu.g.write(gpa, &[0u8; 12]);
        gu.g.write(gpa + 12, frame);
        gu.tx.add_chain(&gu.g, &[(gpa, 12 + frame.len() as u32, 0)]);
    }

    fn post_rx(&mut self, p: usize, n: usize, size: u32) {
        let gu = &mut self.guests[p];
        for _ in 0..n {
            let gpa = gu.g.alloc(size as u64, 8);
            let head = gu.rx.add_chain(&gu.g, &[(gpa, size, DESC_F_WRITE)]);
            gu.rx_bufs.insert(head, (gpa, size));
        }
    }

    fn poll(&mut self, p: usize) -> usize {
        let port = self.ports[p].clone();
        self.dp.poll_queue(&port, 0, 1)
    }

    /// Sends `frame` behind a virtio-net header asking `vh`, the frame cut into `pieces`
    /// descriptors.
    fn send_with(&mut self, p: usize, vh: NetHdr, frame: &[u8], pieces: usize) {
        let gu = &mut self.guests[p];
        let mut b = [0u8; 12];
        vh.write(b.first_chunk_mut::<10>().unwrap());
        let mut all = b.to_vec();
        all.extend_from_slice(frame);
        let gpa = gu.g.alloc(all.len() as u64, 8);
        gu.g.write(gpa, &all);
        let step = all.len().div_ceil(pieces);
        let bufs: Vec<_> = (0..all.len())
            .step_by(step)
            .map(|o| (gpa + o as u64, step.min(all.len() - o) as u32, 0))
            .collect();
        gu.tx.add_chain(&gu.g, &bufs);
    }

    /// Frames delivered to `p` since last asked, with their virtio-net headers.
    fn received_hdrs(&mut self, p: usize) -> Vec<(NetHdr, Vec<u8>)> {
        let gu = &mut self.guests[p];
        let used = gu.rx.take_used(&gu.g);
        let mut out = Vec::new();
        let mut i = 0;
        while i < used.len() {
            let (id, len) = used[i];
            let (gpa, _) = gu.rx_bufs[&id];
            let first = gu.g.read(gpa, len as usize);
            let nbuf = u16::from_le_bytes([first[10], first[11]]) as usize;
            let vh = NetHdr::parse(first.first_chunk::<10>().unwrap());
            let mut f = first[12..].to_vec();
            for &(id2, len2) in &used[i + 1..i + nbuf] {
                let (gpa2, _) = gu.rx_bufs[&id2];
                f.extend(gu.g.read(gpa2, len2 as usize));
            }
            out.push((vh, f));
            i += nbuf.max(1);
        }
        out
    }

    /// Frames delivered to `p` since last asked (headers checked and stripped).
    fn received(&mut self, p: usize) -> Vec<Vec<u8>> {
        self.received_hdrs(p)
            .into_iter()
            .map(|(vh, f)| {
                assert_eq!(vh, NetHdr::default(), "clean header");
                f
            })
            .collect()
    }

    fn tx_returned(&mut self, p: usize) -> Vec<(u32, u32)> {
        let gu = &mut self.guests[p];
        gu.tx.take_used(&gu.g)
    }

    fn rx_stats(&self, p: usize) -> crate::virtio::queue::QueueCounters {
        self.ports[p].rxq[0].stats.snapshot()
    }

    fn tx_stats(&self, p: usize) -> crate::virtio::queue::QueueCounters {
        self.ports[p].txq[0].stats.snapshot()
    }
}

fn tagged(f: &[u8], tci: u16) -> Vec<u8> {
    let mut t = f[..12].to_vec();
    t.extend([0x81, 0x00]);
    t.extend(tci.to_be_bytes());
    t.extend(&f[12..]);
    t
}

fn untagged(f: &[u8]) -> Vec<u8> {
    let mut t = f[..12].to_vec();
    t.extend(&f[16..]);
    t
}

fn trunk(v: &[u16]) -> VlanMode {
    VlanMode::Trunk(Some(Box::new(VlanSet::new(v.iter().copied()))))
}

#[test]
fn test_unknown_unicast_floods_then_learned_goes_to_one_port() {
    let mut n = net(vec![VlanMode::default(); 3], true);
    for p in 0..3 {
        n.post_rx(p, 8, 2048);
    }
    let f = frame(MACS[1], MACS[0], None, 60);
    n.send(0, &f);
    assert_eq!(n.poll(0), 1);
    assert_eq!(n.received(1), vec![f.clone()]);
    assert_eq!(n.received(2), vec![f.clone()], "unknown unicast floods");
    assert!(n.received(0).is_empty(), "never back to the sender");
    let r = frame(MACS[0], MACS[1], None, 60);
    n.send(1, &r);
    n.poll(1);
    assert_eq!(n.received(0), vec![r]);
    assert!(n.received(2).is_empty(), "learned: only the owner gets it");
    n.send(0, &f);
    n.poll(0);
    assert_eq!(n.received(1).len(), 1);
    assert!(n.received(2).is_empty());
    assert_eq!(n.tx_returned(0).len(), 2, "source buffers returned");
}

/// One burst to several learned ports, interleaved, with frames to the sender's own MAC: each
/// port gets exactly its frames, in order, and the sender none; then
/// a burst mixing unicasts and a broadcast (the flood path, every port offered the whole burst).
#[test]
fn test_a_burst_to_several_ports_gives_each_its_own_frames_in_order() {
    let mut n = net(vec![VlanMode::default(); 4], true);
    for p in 0..4 {
        n.post_rx(p, 16, 2048);
    }
    for (p, mac) in MACS.iter().enumerate().skip(1) {
        n.send(p, &frame(BCAST, *mac, None, 60));
        n.poll(p);
    }
    for p in 0..4 {
        n.received(p);
    }
    let dsts = [1, 2, 1, 0, 2, 2, 3, 1, 2, 1];
    let frames: Vec<Vec<u8>> =
        dsts.iter().enumerate().map(|(k, &d)| frame(MACS[d], MACS[0], None, 60 + k)).collect();
    for f in &frames {
        n.send(0, f);
    }
    assert_eq!(n.poll(0), dsts.len());
    for p in 1..4 {
        let want: Vec<Vec<u8>> =
            dsts.iter().zip(&frames).filter(|(d, _)| **d == p).map(|(_, f)| f.clone()).collect();
        assert_eq!(n.received(p), want, "port {p} gets its frames in order");
    }
    assert!(n.received(0).is_empty(), "never back to the sender");
    assert_eq!(n.tx_returned(0).len(), dsts.len());
    let mixed = [
        frame(MACS[2], MACS[0], None, 61),
        frame(BCAST, MACS[0], None, 62),
        frame(MACS[1], MACS[0], None, 63),
    ];
    for f in &mixed {
        n.send(0, f);
    }
    n.poll(0);
    assert_eq!(n.received(1), vec![mixed[1].clone(), mixed[2].clone()]);
    assert_eq!(n.received(2), vec![mixed[0].clone(), mixed[1].clone()]);
    assert_eq!(n.received(3), vec![mixed[1].clone()]);
}

#[test]
fn test_batching_leaves_a_burst_in_a_loaded_guests_ring_until_the_next_or_the_wait() {
    // Rings of 64: a "full burst" is 16 here (a quarter ring), 32 on rings of 128 and up.
    let mut n = net(vec![VlanMode::default(); 2], true);
    n.post_rx(1, 60, 2048);
    n.dp.batch.wait = u64::MAX; // never gives up waiting, for now
    let frames: Vec<Vec<u8>> = (0..50).map(|k| frame(MACS[1], MACS[0], None, 60 + k)).collect();
    let mut sent = frames.iter();
    let mut send = |n: &mut Net, k: usize| {
        for f in sent.by_ref().take(k) {
            n.send(0, f);
        }
    };
    // A guest not known to be loaded is served at once; a full burst marks it loaded.
    send(&mut n, 16);
    assert_eq!(n.poll(0), 16);
    // Loaded: fewer than two bursts queued stay in the ring...
    send(&mut n, 20);
    assert_eq!(n.poll(0), 0, "one burst and a bit wait for the next");
    assert!(n.received(1).len() == 16 && n.tx_returned(0).len() == 16);
    // ...and with two queued, all but one burst are taken.
    send(&mut n, 12);
    assert_eq!(n.poll(0), 16, "a burst stays in the ring");
    assert_eq!(n.poll(0), 0);
    // The wait is bounded: once it has passed, the rest goes and the guest counts as
    // light again, served at once.
    n.dp.batch.wait = 1;
    assert_eq!(n.poll(0), 16, "waited long enough");
    assert_eq!((n.dp.batch.holds, n.dp.batch.expired), (2, 1));
    send(&mut n, 2);
    assert_eq!(n.poll(0), 2, "a light guest is not held back");
    assert_eq!(n.received(1), frames[16..50].to_vec(), "all delivered, in order");
    assert_eq!(n.tx_returned(0).len(), 34);
}

#[test]
fn test_broadcast_makes_one_copy_per_receiver() {
    let mut n = net(vec![VlanMode::default(); 4], false);
    for p in 0..4 {
        n.post_rx(p, 4, 2048);
    }
    let f = frame(BCAST, MACS[0], None, 1514);
    n.send(0, &f);
    n.poll(0);
    for p in 1..4 {
        assert_eq!(n.received(p), vec![f.clone()]);
        let s = n.rx_stats(p);
        assert_eq!((s.packets, s.copies, s.bytes_copied), (1, 1, 1514));
    }
    assert_eq!(n.rx_stats(0).copies, 0);
    assert_eq!(n.tx_returned(0), vec![(0, 0)]);
}

#[test]
fn test_vlan_isolation_and_tag_edits() {
    // 0: access 10, 1: access 20, 2: trunk 10,20, 3: access 10
    let mut n =
        net(vec![VlanMode::Access(10), VlanMode::Access(20), trunk(&[10, 20]), VlanMode::Access(10)], true);
    for p in 0..4 {
        n.post_rx(p, 8, 2048);
    }
    let f = frame(BCAST, MACS[0], None, 64);
    n.send(0, &f);
    n.poll(0);
    assert!(n.received(1).is_empty(), "VLAN 20 never sees VLAN 10");
    assert_eq!(n.received(3), vec![f.clone()], "access to access: untouched");
    assert_eq!(n.received(2), vec![tagged(&f, 10)], "tag pushed on the trunk");
    // Trunk sends VLAN 20 tagged (priority 5): port 1 gets it untagged.
    let t = frame(BCAST, MACS[2], Some(0xa014), 68);
    n.send(2, &t);
    n.poll(2);
    assert_eq!(n.received(1), vec![untagged(&t)]);
    assert!(n.received(0).is_empty() && n.received(3).is_empty());
    // VLAN 30 is not on the trunk; a tagged frame on an access port is refused.
    n.send(2, &frame(BCAST, MACS[2], Some(30), 68));
    n.poll(2);
    n.send(0, &frame(BCAST, MACS[0], Some(10), 68));
    n.poll(0);
    assert_eq!(n.tx_stats(2).drop_filtered, 1);
    assert_eq!(n.tx_stats(0).drop_filtered, 1);
    for p in 0..4 {
        assert!(n.received(p).is_empty());
    }
}

#[test]
fn test_full_destination_drops_without_copying() {
    let mut n = net(vec![VlanMode::default(); 2], true);
    n.post_rx(1, 1, 2048);
    n.send(0, &frame(MACS[1], MACS[0], None, 60));
    n.send(0, &frame(MACS[1], MACS[0], None, 60));
    n.poll(0);
    assert_eq!(n.received(1).len(), 1);
    let s = n.rx_stats(1);
    assert_eq!((s.packets, s.copies, s.drop_no_buffer), (1, 1, 1));
    assert_eq!(n.tx_returned(0).len(), 2, "the dropped packet's buffer is returned too");
}

#[test]
fn test_malformed_chain_is_returned_and_counted_and_the_rest_flows() {
    let mut n = net(vec![VlanMode::default(); 2], true);
    n.post_rx(1, 4, 2048);
    {
        let gu = &mut n.guests[0];
        gu.tx.add_chain(&gu.g, &[(1 << 40, 100, 0)]); // outside guest memory
        gu.tx.add_chain(&gu.g, &[(0x2000, 5, 0)]); // runt
    }
    let f = frame(MACS[1], MACS[0], None, 60);
    n.send(0, &f);
    assert_eq!(n.poll(0), 3);
    assert_eq!(n.received(1), vec![f]);
    assert_eq!(n.tx_stats(0).drop_malformed, 2);
    let back = n.tx_returned(0);
    assert_eq!(back.len(), 3);
    assert!(back.iter().all(|&(_, len)| len == 0));
}

#[test]
fn test_mergeable_buffers_carry_a_large_frame() {
    let mut n = net(vec![VlanMode::default(); 2], true);
    n.post_rx(1, 16, 64);
    let f = frame(MACS[1], MACS[0], None, 300);
    n.send(0, &f);
    n.poll(0);
    let got = n.received(1);
    assert_eq!(got, vec![f]);
    let gu = &n.guests[1];
    assert_eq!(gu.rx.used_count(&gu.g), 5, "312 bytes in 64-byte buffers");
}

#[test]
fn test_without_mergeable_buffers_a_too_small_buffer_is_not_used() {
    let mut n = net(vec![VlanMode::default(); 2], false);
    n.post_rx(1, 4, 64);
    n.send(0, &frame(MACS[1], MACS[0], None, 300));
    n.poll(0);
    assert!(n.received(1).is_empty());
    assert_eq!(n.rx_stats(1).drop_no_buffer, 1);
    n.send(0, &frame(MACS[1], MACS[0], None, 40));
    n.poll(0);
    assert_eq!(n.received(1).len(), 1, "the buffers were left for the next packet");
}

#[test]
fn test_no_hairpin_to_a_mac_on_the_same_port() {
    let mut n = net(vec![VlanMode::default(); 2], true);
    n.post_rx(0, 4, 2048);
    n.post_rx(1, 4, 2048);
    n.send(0, &frame(BCAST, MACS[2], None, 60)); // learn MACS[2] on port 0
    n.poll(0);
    n.received(1);
    n.send(0, &frame(MACS[2], MACS[0], None, 60));
    n.poll(0);
    assert!(n.received(0).is_empty() && n.received(1).is_empty());
    assert_eq!(n.tx_stats(0).drop_no_route, 1);
}

#[test]
fn test_avail_index_overrun_stops_only_that_queue() {
    let mut n = net(vec![VlanMode::default(); 3], true);
    n.post_rx(2, 4, 2048);
    {
        let gu = &mut n.guests[0];
        gu.g.write_u16(gu.tx.split().avail + 2, 300); // claims 300 entries in a 64-entry ring
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
fn test_multiqueue_receiver_with_fewer_running_pairs_still_gets_packets() {
    let mut n = net(vec![VlanMode::default(); 2], true);
    // Port 1 offers two pairs but its guest runs only pair 1 (QEMU enables only the pairs
    // the guest uses); this thread would prefer pair 0.
    let old = n.ports[1].clone();
    let p1 = Arc::new(Port::new(1, "p1".into(), VlanMode::default(), MACS[1], 2));
    *p1.rxq[1].lock() = old.rxq[0].lock().take();
    n.dp.add_port(p1.clone());
    n.ports[1] = p1.clone();
    n.post_rx(1, 2, 2048);
    let f = frame(MACS[1], MACS[0], None, 60);
    n.send(0, &f);
    n.poll(0);
    assert_eq!(n.received(1), vec![f]);
    assert_eq!(p1.rxq[1].stats.snapshot().packets, 1);
    assert_eq!(p1.rxq[0].stats.snapshot().drop_no_buffer, 0);
}

/// An IPv4/UDP frame from MACS[0] to MACS[1] of flow `sport`, carrying `seq`.
fn udp_frame(sport: u16, seq: u32) -> Vec<u8> {
    let mut f = frame(MACS[1], MACS[0], None, 14);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    f.extend(ip);
    f.extend(sport.to_be_bytes());
    f.extend(5201u16.to_be_bytes());
    f.extend([0u8; 4]);
    f.extend(seq.to_be_bytes());
    f.resize(64, 0);
    f
}

#[test]
fn test_multiqueue_receiver_gets_flows_spread_each_in_order_on_one_queue() {
    let mut n = net(vec![VlanMode::default(); 2], true);
    let old = n.ports[1].clone();
    let p1 = Arc::new(Port::new(1, "p1".into(), VlanMode::default(), MACS[1], 2));
    *p1.rxq[0].lock() = old.rxq[0].lock().take();
    // Pair 1's receive ring, in the same guest.
    let gu = &mut n.guests[1];
    let mut rx2 = gu.g.ring(64);
    *p1.rxq[1].lock() = Some(rx2.queue(&gu.g, true).into());
    let mut bufs2 = HashMap::new();
    for _ in 0..40 {
        let gpa = gu.g.alloc(2048, 8);
        bufs2.insert(rx2.add_chain(&gu.g, &[(gpa, 2048, DESC_F_WRITE)]) as u32, gpa);
    }
    n.dp.add_port(p1.clone());
    n.ports[1] = p1.clone();
    n.post_rx(1, 40, 2048);
    // 16 flows, 4 packets each, interleaved.
    for seq in 0..4u32 {
        for flow in 0..16u16 {
            n.send(0, &udp_frame(40_000 + flow, seq));
        }
    }
    n.poll(0);
    n.poll(0);
    let q0 = n.received(1);
    let gu = &mut n.guests[1];
    let q1: Vec<Vec<u8>> = rx2
        .take_used(&gu.g)
        .into_iter()
        .map(|(id, len)| gu.g.read(bufs2[&id] + 12, len as usize - 12))
        .collect();
    assert!(!q0.is_empty() && !q1.is_empty(), "both queues get flows: {} and {}", q0.len(), q1.len());
    assert_eq!(q0.len() + q1.len(), 64);
    let flow = |f: &Vec<u8>| u16::from_be_bytes([f[34], f[35]]);
    let seq = |f: &Vec<u8>| u32::from_be_bytes([f[42], f[43], f[44], f[45]]);
    for q in [&q0, &q1] {
        for fl in 40_000..40_016u16 {
            let seqs: Vec<u32> = q.iter().filter(|f| flow(f) == fl).map(seq).collect();
            assert!(seqs.is_empty() || seqs == vec![0, 1, 2, 3], "flow {fl}: {seqs:?}, whole and in order");
        }
    }
    assert_eq!(p1.rxq[0].stats.snapshot().packets + p1.rxq[1].stats.snapshot().packets, 64);
}

#[test]
fn test_used_entries_keep_ring_order_around_a_bad_receive_buffer() {
    let mut n = net(vec![VlanMode::default(); 2], true);
    n.post_rx(1, 1, 2048);
    {
        let gu = &mut n.guests[1];
        let head = gu.rx.add_chain(&gu.g, &[(1 << 40, 2048, DESC_F_WRITE)]); // outside memory
        gu.rx_bufs.insert(head, (0, 0));
    }
    n.post_rx(1, 1, 2048);
    for _ in 0..3 {
        n.send(0, &frame(MACS[1], MACS[0], None, 60));
    }
    n.poll(0);
    let gu = &mut n.guests[1];
    let used = gu.rx.take_used(&gu.g);
    let ids: Vec<u32> = used.iter().map(|u| u.0).collect();
    assert_eq!(ids, vec![0, 1, 2], "in ring order (VIRTIO_F_IN_ORDER)");
    assert_eq!(used[1].1, 0, "the bad buffer comes back empty");
    assert_eq!(n.rx_stats(1).packets, 2);
    assert_eq!(n.rx_stats(1).drop_malformed, 1);
}

#[test]
fn test_split_header_and_frame_descriptors() {
    let mut n = net(vec![VlanMode::default(); 2], true);
    n.post_rx(1, 4, 2048);
    let f = frame(MACS[1], MACS[0], None, 100);
    {
        let gu = &mut n.guests[0];
        let h = gu.g.alloc(12, 8);
        let a = gu.g.alloc(7, 8);
        let b = gu.g.alloc(93, 8);
        gu.g.write(h, &[0u8; 12]);
        gu.g.write(a, &f[..7]);
        gu.g.write(b, &f[7..]);
        gu.tx.add_chain(&gu.g, &[(h, 12, 0), (a, 7, 0), (b, 93, 0)]);
    }
    n.poll(0);
    assert_eq!(n.received(1), vec![f]);
}

fn all_caps() -> Caps {
    Caps::from_features(crate::virtio::features::Negotiated { bits: crate::virtio::features::OFFLOADS })
}

fn tso4(gso_size: u16, l2: u16) -> NetHdr {
    NetHdr {
        flags: offload::F_NEEDS_CSUM,
        gso_type: offload::GSO_TCPV4,
        hdr_len: l2 + 52,
        gso_size,
        csum_start: l2 + 20,
        csum_offset: 16,
    }
}

/// What a receiving kernel does with NEEDS_CSUM.
fn complete_csum(vh: NetHdr, f: &mut [u8]) {
    assert_eq!(vh.flags, offload::F_NEEDS_CSUM);
    let (st, at) = (vh.csum_start as usize, (vh.csum_start + vh.csum_offset) as usize);
    let mut s = Sum::new();
    s.add(&f[st..]);
    f[at..at + 2].copy_from_slice(&s.checksum().to_be_bytes());
}

#[test]
fn test_gso_frame_goes_whole_to_tso_receivers_and_cut_for_the_others() {
    use crate::offload::gso::tests::{check, gso_frame, FLAGS};
    // p1 takes TSO, p2 nothing, p3 only partial checksums. The frame's destination is
    // unknown, so it floods to all three: one frame, three treatments.
    let csum_only = Caps { rx_csum: true, ..Caps::default() };
    let caps = vec![all_caps(), all_caps(), Caps::default(), csum_only];
    let mut n = net_caps(vec![VlanMode::default(); 4], caps, true);
    for p in 1..4 {
        n.post_rx(p, 60, 2048);
    }
    let f = gso_frame(false, None, 20_000, FLAGS);
    n.send_with(0, tso4(1448, 14), &f, 19);
    assert_eq!(n.poll(0), 1);
    let whole = n.received_hdrs(1);
    assert_eq!(whole.len(), 1, "one 20 KB frame, in mergeable buffers");
    assert_eq!(whole[0].0, tso4(1448, 14), "the request passed on as is");
    assert_eq!(whole[0].1, f);
    assert_eq!(n.rx_stats(1).gso_whole, 1);

    let cut: Vec<_> = n
        .received_hdrs(2)
        .into_iter()
        .map(|(vh, s)| {
            assert_eq!(vh, NetHdr::default(), "full checksums, nothing asked");
            s
        })
        .collect();
    assert_eq!(cut.len(), 14);
    check(&f, &cut, false, 1448, FLAGS, None);
    let st = n.rx_stats(2);
    assert_eq!((st.gso_segmented, st.packets, st.drop_no_buffer), (1, 14, 0));

    let partial: Vec<_> = n
        .received_hdrs(3)
        .into_iter()
        .map(|(vh, mut s)| {
            complete_csum(vh, &mut s);
            s
        })
        .collect();
    check(&f, &partial, false, 1448, FLAGS, None);
    assert_eq!(n.tx_stats(0).packets, 1);
    assert_eq!(n.tx_stats(0).drop_malformed, 0);
}

#[test]
fn test_gso_across_vlan_edits_and_ipv6() {
    use crate::offload::gso::tests::{check, gso_frame, FLAGS};
    // p0 sends untagged on VLAN 5; the trunks get it tagged: offsets move by 4.
    let caps = vec![all_caps(), all_caps(), Caps::default()];
    let mut n = net_caps(vec![VlanMode::Access(5), trunk(&[5]), trunk(&[5])], caps, true);
    n.post_rx(1, 60, 2048);
    n.post_rx(2, 60, 2048);
    let f = gso_frame(true, None, 9_001, FLAGS);
    let vh = NetHdr {
        gso_type: offload::GSO_TCPV6 | offload::GSO_ECN,
        hdr_len: 86,
        csum_start: 54,
        ..tso4(1000, 14)
    };
    n.send_with(0, vh, &f, 3);
    n.poll(0);
    let whole = n.received_hdrs(1);
    assert_eq!(whole.len(), 1);
    assert_eq!(whole[0].0, NetHdr { hdr_len: 90, csum_start: 58, ..vh });
    assert_eq!(whole[0].1, tagged(&f, 5));
    let cut: Vec<_> = n.received_hdrs(2).into_iter().map(|(_, s)| s).collect();
    check(&f, &cut, true, 1000, FLAGS, Some(5));
}

#[test]
fn test_whole_gso_frame_fills_one_big_chain_without_mergeable_buffers() {
    // A Linux guest with TSO and no MRG_RXBUF posts 19-page chains ("big packets").
    use crate::offload::gso::tests::{gso_frame, FLAGS};
    let mut n = net_caps(vec![VlanMode::default(); 2], vec![all_caps(); 2], false);
    let gu = &mut n.guests[1];
    let bufs: Vec<_> = (0..19).map(|_| (gu.g.alloc(4096, 4096), 4096, DESC_F_WRITE)).collect();
    let head = gu.rx.add_chain(&gu.g, &bufs);
    let f = gso_frame(false, None, 65_000, FLAGS);
    n.send_with(0, tso4(1448, 14), &f, 19);
    n.poll(0);
    let gu = &mut n.guests[1];
    let used = gu.rx.take_used(&gu.g);
    assert_eq!(used, vec![(head, 12 + f.len() as u32)]);
    let mut got = Vec::new();
    for &(gpa, len, _) in &bufs {
        got.extend(gu.g.read(gpa, len as usize));
    }
    assert_eq!(&got[12..12 + f.len()], &f[..]);
}

#[test]
fn test_partial_checksum_passed_on_or_completed() {
    use crate::offload::csum::pseudo_v4;
    use crate::offload::gso::tests::{gso_frame, V4};
    use pnet_packet::tcp::{ipv4_checksum, TcpPacket};
    // p2 gets it tagged: the completed checksum lands 4 bytes further.
    let csum_only = Caps { rx_csum: true, ..Caps::default() };
    let caps = vec![all_caps(), csum_only, Caps::default()];
    let mut n = net_caps(vec![VlanMode::Access(3), VlanMode::Access(3), trunk(&[3])], caps, true);
    n.post_rx(1, 4, 2048);
    n.post_rx(2, 4, 2048);
    let mut f = gso_frame(false, None, 999, 0x18);
    // As Linux leaves it: the pseudo-header sum in the field.
    let ps = pseudo_v4(&V4.0.octets(), &V4.1.octets(), 6, (f.len() - 34) as u32).fold();
    f[50..52].copy_from_slice(&ps.to_be_bytes());
    let vh = NetHdr { flags: offload::F_NEEDS_CSUM, csum_start: 34, csum_offset: 16, ..NetHdr::default() };
    n.send_with(0, vh, &f, 2);
    n.poll(0);
    let passed = n.received_hdrs(1);
    assert_eq!(passed, vec![(vh, f.clone())]);
    let done = n.received_hdrs(2);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0, NetHdr::default());
    let t = TcpPacket::new(&done[0].1[38..]).unwrap();
    assert_eq!(t.get_checksum(), ipv4_checksum(&t, &V4.0, &V4.1), "completed in software");
    assert_eq!(&done[0].1[..50 + 4], &tagged(&f, 3)[..54]);
    assert_eq!(&done[0].1[56..], &tagged(&f, 3)[56..]);
    assert_eq!(n.rx_stats(2).csum_completed, 1);
    assert_eq!(n.rx_stats(1).csum_completed, 0);
}

#[test]
fn test_gso_metadata_reaches_receivers_canonical_whatever_the_sender_wrote() {
    use crate::offload::gso::tests::{gso_frame, FLAGS};
    let caps = vec![all_caps(), all_caps()];
    let mut n = net_caps(vec![VlanMode::default(); 2], caps, true);
    n.post_rx(1, 32, 2048);
    let f = gso_frame(false, None, 20_000, FLAGS);
    // What Linux had to learn to refuse: the checksum "in" the IP header, a header length
    // of 0, and no NEEDS_CSUM on a GSO frame.
    let odd = NetHdr { flags: 0, hdr_len: 0, csum_start: 14, csum_offset: 10, ..tso4(1448, 14) };
    n.send_with(0, odd, &f, 3);
    let big = NetHdr { hdr_len: 65535, ..odd };
    n.send_with(0, big, &f, 1);
    assert_eq!(n.poll(0), 2);
    let got = n.received_hdrs(1);
    assert_eq!(got.len(), 2);
    for (vh, frame) in got {
        assert_eq!(vh, tso4(1448, 14), "rebuilt from the parse: TCP checksum field, real header length");
        assert_eq!(frame, f);
    }
    // Segments too small to be real TCP only multiply packets: refused.
    for mss in [1, 31, 32, 87] {
        n.send_with(0, tso4(mss, 14), &f, 1);
    }
    n.send_with(0, tso4(88, 14), &gso_frame(false, None, 880, FLAGS), 1);
    assert_eq!(n.poll(0), 5);
    assert_eq!(n.tx_stats(0).drop_malformed, 4);
    assert_eq!(n.received_hdrs(1).len(), 1, "the 88-byte segments pass");
}

#[test]
fn test_the_policer_charges_a_gso_frame_for_every_segment() {
    use crate::offload::gso::tests::{gso_frame, FLAGS};
    use crate::policy::{BitRate, PolicerConfig, PolicyConfig};
    let caps = vec![all_caps(), all_caps()];
    let mut n = net_caps(vec![VlanMode::default(); 2], caps, true);
    n.post_rx(1, 40, 2048);
    // 100 packets/s, burst 32: one 20 KB frame cut at 1448 is 14 packets.
    let pol = PolicerConfig {
        rate: BitRate(10_000_000_000),
        burst: None,
        excess_burst: None,
        excess_rate: None,
        pps: Some(100),
    };
    n.ports[0].set_policy(&PolicyConfig { ingress: Some(pol), egress: None, anti_spoof: None }).unwrap();
    let f = gso_frame(false, None, 20_000, FLAGS);
    for _ in 0..4 {
        n.send_with(0, tso4(1448, 14), &f, 1);
    }
    n.poll(0);
    let s = n.ports[0].policy.stats.snapshot();
    assert_eq!(s.policed, 2, "two frames of 14 segments fit a burst of 32 packets, four do not");
    assert_eq!(n.received_hdrs(1).len(), 2);
}

/// A receive queue of `size` whose buffers translate through an empty IOTLB (every one
/// misses) and whose misses go nowhere (counted unsent).
fn iova_rx(size: u16) -> (MockGuest, TRing, VirtQueue, Arc<crate::vhost::iotlb::IotlbStats>) {
    let mut g = MockGuest::new(4 << 20);
    let ring = TRing::new(&mut g, size);
    let mut rq = ring.queue_with(&g, true, Caps::default());
    rq.dma = iommu::Dma::iova(g.mem.clone(), iommu::Iotlb::new(64), 0, Default::default());
    let stats = Arc::<crate::vhost::iotlb::IotlbStats>::default();
    rq.iotlb = Some(Box::new(crate::vhost::iotlb::IotlbLink::new(None, stats.clone())));
    (g, ring, rq, stats)
}

#[test]
fn test_parked_drain_stops_after_a_burst_of_bad_buffers() {
    let (g, mut ring, mut rq, _) = iova_rx(256);
    for _ in 0..200 {
        let gpa = 0x10_0000;
        ring.add_chain(&g, &[(gpa, 0, DESC_F_WRITE)]); // zero-length: malformed
    }
    let frame = vec![0u8; 12 + 60];
    rq.iotlb.as_deref_mut().unwrap().parked.push_back((frame, now_ns()));
    let d = drain_parked(&mut rq);
    assert_eq!(d.malformed, BURST as u64, "one call takes at most a burst of bad buffers");
    assert_eq!(rq.iotlb.as_deref().unwrap().parked.len(), 1, "the frame waits for the next call");
    let d = drain_parked(&mut rq);
    assert_eq!(d.malformed, BURST as u64);
}

#[test]
fn test_rx_lookahead_asks_a_bounded_number_per_pass() {
    let (mut g, mut ring, mut rq, stats) = iova_rx(1024);
    for _ in 0..1000 {
        let gpa = g.alloc(4096, 4096);
        ring.add_chain(&g, &[(gpa, 2048, DESC_F_WRITE)]);
    }
    let asked = || stats.misses_unsent.load(std::sync::atomic::Ordering::Relaxed);
    rx_lookahead(&mut rq);
    assert_eq!(asked(), LOOKAHEAD as u64);
    rx_lookahead(&mut rq);
    assert_eq!(asked(), 2 * LOOKAHEAD as u64, "the next pass goes on where this one stopped");
}

#[test]
fn test_bad_offload_requests_are_dropped_and_ignored_without_offloads() {
    use crate::offload::gso::tests::{gso_frame, FLAGS};
    let caps = vec![all_caps(), all_caps(), Caps::default()];
    let mut n = net_caps(vec![VlanMode::default(); 3], caps, true);
    n.post_rx(1, 16, 2048);
    let f = gso_frame(false, None, 100, 0x18);
    // The checksum field past the frame's end.
    let bad = NetHdr { flags: offload::F_NEEDS_CSUM, csum_start: 200, csum_offset: 16, ..NetHdr::default() };
    n.send_with(0, bad, &f, 1);
    // TCPv6 said, IPv4 given.
    let v6 = NetHdr { gso_type: offload::GSO_TCPV6, ..tso4(1448, 14) };
    n.send_with(0, v6, &gso_frame(false, None, 5000, FLAGS), 1);
    // Segment size 0.
    n.send_with(0, tso4(0, 14), &gso_frame(false, None, 5000, FLAGS), 1);
    // Longer than a frame without GSO may be.
    let plain = NetHdr { flags: offload::F_NEEDS_CSUM, csum_start: 34, csum_offset: 16, ..NetHdr::default() };
    n.send_with(0, plain, &gso_frame(false, None, 12_000, FLAGS), 1);
    n.poll(0);
    assert_eq!(n.tx_stats(0).drop_malformed, 4);
    assert!(n.received_hdrs(1).is_empty());
    assert_eq!(n.tx_returned(0).len(), 4, "every chain given back");
    // p2 negotiated nothing: whatever its header says is not a request.
    n.send_with(2, tso4(1448, 14), &f, 1);
    n.poll(2);
    assert_eq!(n.received_hdrs(1), vec![(NetHdr::default(), f.clone())]);
}

/// The same tests over packed rings, a hostile packed ring, and the instruction count.
mod packed;
