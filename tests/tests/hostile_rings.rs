//! Hostile transmit chains through a real vhost-user connection: every malformed chain comes
//! back to the guest (its TX buffer is returned) and is counted in `rx.drop_malformed` of its
//! port; valid frames around it still flow; other ports notice nothing.
//!
//! The chains are written verbatim into the TX ring with `push_raw_tx_chain`, pointing into
//! the frontend's scratch memory (`guest_mem`) or deliberately elsewhere.

use std::time::Duration;

use e2e_tests::{
    assert_one_copy_each, connect, connect_default, drain, exchange, find, mac, port_info, recv_n,
    start_switch, wait_stats, wait_until, Scratch,
};
use vswitch::virtio::MAX_SEGS;
use vswitch::Switch;
use vswitch_bench::frame::build_frame;
use vswitch_bench::frontend::{
    Frontend, FrontendConfig, RawDesc, RawNext, VIRTIO_RING_F_INDIRECT_DESC, VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};

const T: Duration = Duration::from_secs(5);
/// Guest-physical base of the hostile guest's memory: address 0 is not guest memory.
const GPA_BASE: u64 = 0x4000_0000;

/// The hostile guest and the bookkeeping of what the switch should have counted.
struct Hostile<'a> {
    sw: &'a Switch,
    port: &'static str,
    fe: Frontend,
    /// Malformed chains pushed so far.
    bad: u64,
    /// Valid frames pushed so far.
    good: u64,
}

/// Scratch layout: [0, 12) header, [12, 12 + len) a valid frame A -> B; [TABLE_OFF..) tables.
const TABLE_OFF: u64 = 4096;

impl Hostile<'_> {
    fn scratch(&mut self) -> u64 {
        self.fe.guest_mem().0
    }

    /// Writes a valid frame (with a zero header in front) into scratch; returns its length.
    fn write_frame(&mut self, seq: u64) -> Vec<u8> {
        let f = build_frame(mac(0xb), mac(0xa), None, 100, seq);
        let (_, mem) = self.fe.guest_mem();
        mem[..12].fill(0);
        mem[12..12 + f.len()].copy_from_slice(&f);
        f
    }

    /// Writes an indirect table at scratch offset TABLE_OFF; returns its address.
    fn write_table(&mut self, descs: &[(u64, u32, u16, u16)]) -> u64 {
        let (gpa, mem) = self.fe.guest_mem();
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let o = TABLE_OFF as usize + 16 * i;
            mem[o..o + 8].copy_from_slice(&addr.to_le_bytes());
            mem[o + 8..o + 12].copy_from_slice(&len.to_le_bytes());
            mem[o + 12..o + 14].copy_from_slice(&flags.to_le_bytes());
            mem[o + 14..o + 16].copy_from_slice(&next.to_le_bytes());
        }
        gpa + TABLE_OFF
    }

    /// Waits until the switch has returned every chain pushed so far.
    fn all_back(&self) -> bool {
        wait_until(T, || self.fe.tx_completed(0) == self.fe.stats(0).tx_enqueued)
    }

    /// Pushes a chain the switch must refuse, and checks it came back and was counted.
    fn refused(&mut self, case: &str, descs: &[RawDesc]) {
        assert!(self.all_back(), "{case}: earlier chains still out");
        self.fe.push_raw_tx_chain(0, descs).unwrap_or_else(|| panic!("{case}: no room in the TX ring"));
        self.bad += 1;
        assert!(self.all_back(), "{case}: the chain was not returned to the guest");
        let (port, bad, good) = (self.port, self.bad, self.good);
        let s = wait_stats(self.sw, T, |s| find(s, port).rx.drop_malformed == bad);
        let rx = find(&s, port).rx;
        assert_eq!(rx.drop_malformed, bad, "{case}: counted as malformed");
        assert_eq!(rx.packets, good, "{case}: not counted as a packet");
    }

    /// Pushes a chain the switch must accept: the frame arrives at `to` intact.
    fn accepted(&mut self, case: &str, descs: &[RawDesc], frame: &[u8], to: &mut Frontend) {
        self.fe.push_raw_tx_chain(0, descs).unwrap_or_else(|| panic!("{case}: no room in the TX ring"));
        self.good += 1;
        let got = recv_n(to, 1, T);
        assert_eq!(got.len(), 1, "{case}: not delivered");
        assert!(got[0] == frame, "{case}: delivered altered");
        assert!(self.all_back(), "{case}: the chain was not returned to the guest");
    }
}

fn hostile_cfg(indirect: bool) -> FrontendConfig {
    FrontendConfig { gpa_base: GPA_BASE, indirect, ..FrontendConfig::default() }
}

fn last_w(addr: u64, len: u32) -> RawDesc {
    RawDesc { addr, len, flags: VIRTQ_DESC_F_WRITE, next: RawNext::Slot(0) }
}

/// Frame bytes split into `n` descriptors after a 12-byte header descriptor.
fn split_chain(g: u64, frame_len: u32, n: u32) -> Vec<RawDesc> {
    let mut v = vec![RawDesc::chained(g, 12, 1)];
    // One byte each, the rest in the last: no empty piece for any n up to the frame length.
    let mut off = 0;
    for i in 0..n {
        let len = if i + 1 == n { frame_len - off } else { 1 };
        let slot = i as u16 + 1;
        v.push(if i + 1 == n {
            RawDesc::last(g + 12 + off as u64, len)
        } else {
            RawDesc::chained(g + 12 + off as u64, len, slot + 1)
        });
        off += len;
    }
    assert_eq!(off, frame_len);
    v
}

#[test]
fn test_malformed_direct_chains_are_returned_counted_and_isolated() {
    let dir = Scratch::new("hostile-direct");
    let sw = start_switch(&dir, &["a", "b", "c"]);
    let mut fb = connect_default(&dir, "b");
    let mut fc = connect_default(&dir, "c");
    let mut fe = connect(&dir, "a", hostile_cfg(false));
    assert_eq!(fe.negotiated_features() & VIRTIO_RING_F_INDIRECT_DESC, 0);
    // B makes itself known, so frames to it go nowhere else.
    e2e_tests::send(&mut fb, 0, &build_frame(e2e_tests::BCAST, mac(0xb), None, 60, 0));
    assert_eq!(recv_n(&mut fe, 1, T).len(), 1);
    assert_eq!(recv_n(&mut fc, 1, T).len(), 1);
    let (region, region_len) = fe.guest_region();
    assert_eq!(region, GPA_BASE);
    let end = region + region_len;
    let mut h = Hostile { sw: &sw, port: "a", fe, bad: 0, good: 0 };
    let g = h.scratch();
    let f = h.write_frame(1);
    let flen = (12 + f.len()) as u32;

    // A valid raw chain first: the baseline is sound.
    h.accepted("one descriptor", &[RawDesc::last(g, flen)], &f, &mut fb);
    // Addresses outside guest memory.
    h.refused("past the end of memory", &[RawDesc::last(end + 0x1000, flen)]);
    h.refused("running off the end of memory", &[RawDesc::last(end - 16, flen)]);
    h.refused("below the start of memory", &[RawDesc::last(0, flen)]);
    h.refused("wrapping address", &[RawDesc::last(u64::MAX - 8, flen)]);
    h.refused(
        "second descriptor outside memory",
        &[RawDesc::chained(g, 12, 1), RawDesc::last(end, flen - 12)],
    );
    // Loops.
    h.refused("two-descriptor loop", &[RawDesc::chained(g, 12, 1), RawDesc::chained(g + 12, flen - 12, 0)]);
    h.refused("descriptor pointing at itself", &[RawDesc::chained(g, flen, 0)]);
    // Wrong direction.
    h.refused("device-writable buffer", &[last_w(g, flen)]);
    h.refused("device-writable second buffer", &[RawDesc::chained(g, 12, 1), last_w(g + 12, flen - 12)]);
    // Zero length.
    h.refused("zero-length buffer", &[RawDesc::last(g, 0)]);
    h.refused(
        "zero-length buffer mid-chain",
        &[RawDesc::chained(g, 12, 1), RawDesc::chained(g + 12, 0, 2), RawDesc::last(g + 12, flen - 12)],
    );
    // Too many descriptors: a valid frame in 1 + MAX_SEGS descriptors.
    h.refused("MAX_SEGS + 1 descriptors", &split_chain(g, flen - 12, MAX_SEGS as u32));
    // `next` outside the descriptor table.
    let outside = h.fe.ring_size() + 5;
    h.refused(
        "next outside the table",
        &[RawDesc { addr: g, len: 12, flags: VIRTQ_DESC_F_NEXT, next: RawNext::Absolute(outside) }],
    );
    // Runt: no room for an Ethernet header after the virtio-net header.
    h.refused("runt", &[RawDesc::last(g, 12 + 13)]);
    // Larger than the largest frame (9220 bytes after the header).
    h.refused("oversized", &[RawDesc::last(g, 12 + 9221)]);
    // An indirect table the guest did not negotiate.
    let table = h.write_table(&[(g, 12, VIRTQ_DESC_F_NEXT, 1), (g + 12, flen - 12, 0, 0)]);
    h.refused(
        "indirect without INDIRECT_DESC",
        &[RawDesc { addr: table, len: 32, flags: VIRTQ_DESC_F_INDIRECT, next: RawNext::Slot(0) }],
    );

    // Limits that are legal: 16 descriptors, and a header split across descriptors.
    let f = h.write_frame(2);
    h.accepted("MAX_SEGS descriptors", &split_chain(g, flen - 12, MAX_SEGS as u32 - 1), &f, &mut fb);
    let odd = [
        RawDesc::chained(g, 5, 1),
        RawDesc::chained(g + 5, 7, 2),
        RawDesc::chained(g + 12, 13, 3),
        RawDesc::last(g + 25, flen - 25),
    ];
    h.accepted("header and MACs split across descriptors", &odd, &f, &mut fb);

    // A burst mixing good frames and bad chains: the good ones arrive, in order.
    let f3 = build_frame(mac(0xb), mac(0xa), None, 300, 3);
    let f4 = build_frame(mac(0xb), mac(0xa), None, 400, 4);
    assert!(h.all_back());
    let before = h.fe.tx_completed(0);
    assert!(h.fe.enqueue_tx(0, &f3));
    h.fe.push_raw_tx_chain(0, &[RawDesc::last(end + 0x1000, flen)]).unwrap();
    assert!(h.fe.enqueue_tx(0, &f4));
    h.fe.push_raw_tx_chain(0, &[RawDesc::last(g, 0)]).unwrap();
    h.bad += 2;
    h.good += 2;
    let got = recv_n(&mut fb, 2, T);
    assert!(got == vec![f3, f4], "the valid frames of a mixed burst arrive in order");
    assert!(wait_until(T, || h.fe.tx_completed(0) == before + 4), "all four chains returned");

    // Normal traffic from the hostile guest afterwards.
    let mut fe = h.fe;
    exchange(&mut fe, &mut fb, mac(0xa), mac(0xb), 20, 100);
    let good = h.good + 20;
    let bad = h.bad;
    let s = wait_stats(&sw, T, |s| find(s, "a").rx.packets == good && find(s, "b").tx.packets == good);
    let a = find(&s, "a");
    assert_eq!((a.rx.packets, a.rx.drop_malformed), (good, bad));
    assert_eq!(fe.tx_completed(0), fe.stats(0).tx_enqueued, "every chain came back");
    assert_eq!(fe.stats(0).tx_errors, 0, "the switch returned only heads it was given");
    assert_eq!(find(&s, "b").tx.packets, good);
    assert_eq!(port_info(&sw, "a").device.running_queues, vec![0, 1], "the hostile guest's queues still run");

    // The bystander saw nothing, and still works both ways.
    assert!(drain(&mut fc, Duration::from_millis(30)).is_empty(), "c got nothing from the hostile guest");
    exchange(&mut fc, &mut fb, mac(0xc), mac(0xb), 20, 200);
    exchange(&mut fb, &mut fc, mac(0xb), mac(0xc), 20, 300);
    let s = sw.stats().unwrap();
    for p in ["b", "c"] {
        let c = find(&s, p);
        assert_eq!(c.rx.drop_malformed + c.tx.drop_malformed + c.tx.drop_no_buffer, 0, "{p}: {c:?}");
    }
    assert_one_copy_each(&s);
}

#[test]
fn test_malformed_indirect_tables_are_returned_counted_and_isolated() {
    let dir = Scratch::new("hostile-indirect");
    let sw = start_switch(&dir, &["a", "b"]);
    let mut fb = connect_default(&dir, "b");
    let fe = connect(&dir, "a", hostile_cfg(true));
    assert_ne!(fe.negotiated_features() & VIRTIO_RING_F_INDIRECT_DESC, 0, "INDIRECT_DESC negotiated");
    let end = fe.guest_region().0 + fe.guest_region().1;
    let mut h = Hostile { sw: &sw, port: "a", fe, bad: 0, good: 0 };
    let g = h.scratch();
    let f = h.write_frame(1);
    let flen = (12 + f.len()) as u32;
    let ind = |table: u64, len: u32| RawDesc {
        addr: table,
        len,
        flags: VIRTQ_DESC_F_INDIRECT,
        next: RawNext::Slot(0),
    };
    let (n, w, i) = (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT);

    // Baseline: a valid raw indirect chain, and the frontend's own (indirect) frames.
    let t = h.write_table(&[(g, 12, n, 1), (g + 12, flen - 12, 0, 0)]);
    h.accepted("valid table", &[ind(t, 32)], &f, &mut fb);

    h.refused("table length not a multiple of 16", &[ind(t, 24)]);
    h.refused("empty table", &[ind(t, 0)]);
    h.refused("table outside memory", &[ind(end + 0x1000, 32)]);
    h.refused("table running off the end of memory", &[ind(end - 16, 32)]);
    h.refused(
        "indirect descriptor with NEXT",
        &[
            RawDesc {
                addr: t,
                len: 32,
                flags: VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT,
                next: RawNext::Slot(1),
            },
            RawDesc::last(g, flen),
        ],
    );
    let t = h.write_table(&[(g, 12, n, 1), (g + 12, flen - 12, n, 0)]);
    h.refused("loop inside the table", &[ind(t, 32)]);
    let t = h.write_table(&[(g, 12, n, 5), (g + 12, flen - 12, 0, 0)]);
    h.refused("next beyond the table", &[ind(t, 32)]);
    let t = h.write_table(&[(g, 12, n, 1), (g + 12, flen - 12, w, 0)]);
    h.refused("device-writable entry", &[ind(t, 32)]);
    let t = h.write_table(&[(g, 12, n, 1), (g + 12, 0, 0, 0)]);
    h.refused("zero-length entry", &[ind(t, 32)]);
    let t = h.write_table(&[(g, 12, n, 1), (end + 0x1000, flen - 12, 0, 0)]);
    h.refused("entry outside memory", &[ind(t, 32)]);
    let t = h.write_table(&[(g, 12, n, 1), (g + TABLE_OFF, 32, i, 0)]);
    h.refused("nested table", &[ind(t, 32)]);
    // MAX_SEGS + 1 entries in one table.
    let m = MAX_SEGS as u32;
    let mut entries = vec![(g, 12u32, n, 1u16)];
    for k in 0..m {
        let last = k + 1 == m;
        let len = if last { flen - 12 - (m - 1) } else { 1 };
        entries.push((g + 12 + k as u64, len, if last { 0 } else { n }, k as u16 + 2));
    }
    let t = h.write_table(&entries);
    h.refused("MAX_SEGS + 1 entries", &[ind(t, 16 * (m + 1))]);

    // The hostile guest's normal (indirect) frames still flow.
    let mut fe = h.fe;
    exchange(&mut fe, &mut fb, mac(0xa), mac(0xb), 20, 100);
    let (good, bad) = (h.good + 20, h.bad);
    let s = wait_stats(&sw, T, |s| find(s, "a").rx.packets == good);
    assert_eq!((find(&s, "a").rx.packets, find(&s, "a").rx.drop_malformed), (good, bad));
    assert_eq!(fe.tx_completed(0), fe.stats(0).tx_enqueued, "every chain came back");
    exchange(&mut fb, &mut fe, mac(0xb), mac(0xa), 20, 200);
    assert_one_copy_each(&s);
}
