//! Level 0's engines against pnet_packet's reading of the frames they make, and LRO against
//! the kernel's GRO rules.

use nic_models::engines::csum::{complete_partial, fold, insert_ip4, insert_l4, pseudo, verify};
use nic_models::engines::lro::{Lro, LroConfig, Out};
use nic_models::engines::tso::segment;
use nic_models::engines::{layout, TCP, UDP};
use pnet_packet::ethernet::EthernetPacket;
use pnet_packet::ipv4::{self, Ipv4Packet};
use pnet_packet::ipv6::Ipv6Packet;
use pnet_packet::tcp::{self, TcpPacket};
use pnet_packet::udp::{self, UdpPacket};
use pnet_packet::Packet;
use proptest::prelude::*;

const ACK: u8 = 0x10;
const PSH: u8 = 0x08;

/// A TCP or UDP frame over IPv4 or IPv6 with `payload`, checksums zero.
#[derive(Clone, Debug)]
struct Spec {
    v6: bool,
    proto: u8,
    vlan: bool,
    seq: u32,
    ack: u32,
    flags: u8,
    id: u16,
    df: bool,
    ttl: u8,
    ts: Option<u32>,
    payload: Vec<u8>,
}

impl Spec {
    fn tcp(payload: Vec<u8>) -> Spec {
        Spec {
            v6: false,
            proto: TCP,
            vlan: false,
            seq: 1000,
            ack: 77,
            flags: ACK,
            id: 1,
            df: true,
            ttl: 64,
            ts: Some(5),
            payload,
        }
    }

    fn build(&self) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1];
        if self.vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
        }
        let l4len = match self.proto {
            TCP => 20 + if self.ts.is_some() { 12 } else { 0 },
            _ => 8,
        };
        let l4total = l4len + self.payload.len();
        if self.v6 {
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend_from_slice(&(l4total as u16).to_be_bytes());
            f.extend_from_slice(&[self.proto, self.ttl]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
            f.extend_from_slice(&((20 + l4total) as u16).to_be_bytes());
            f.extend_from_slice(&self.id.to_be_bytes());
            f.extend_from_slice(&[if self.df { 0x40 } else { 0 }, 0, self.ttl, self.proto, 0, 0]);
            f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        }
        f.extend_from_slice(&[0x30, 0x39, 0x14, 0x51]);
        if self.proto == TCP {
            f.extend_from_slice(&self.seq.to_be_bytes());
            f.extend_from_slice(&self.ack.to_be_bytes());
            f.extend_from_slice(&[(l4len as u8 / 4) << 4, self.flags, 0x01, 0xf5, 0, 0, 0, 0]);
            if let Some(ts) = self.ts {
                f.extend_from_slice(&[1, 1, 8, 10]);
                f.extend_from_slice(&ts.to_be_bytes());
                f.extend_from_slice(&[0, 0, 0, 9]);
            }
        } else {
            f.extend_from_slice(&(l4total as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        }
        f.extend_from_slice(&self.payload);
        f
    }

    fn with_csums(&self) -> Vec<u8> {
        let mut f = self.build();
        let l = layout(&f).unwrap();
        if !l.v6 {
            insert_ip4(&mut f, &l);
        }
        insert_l4(&mut f, &l);
        f
    }
}

/// pnet's verdict on a frame's checksums, and its TCP/UDP payload.
fn pnet_check(f: &[u8]) -> (bool, Vec<u8>) {
    let eth = EthernetPacket::new(f).unwrap();
    let mut l3 = eth.payload().to_vec();
    if eth.get_ethertype().0 == 0x8100 {
        l3 = l3[4..].to_vec();
    }
    let ver = l3[0] >> 4;
    let (ok_ip, proto, l4, src, dst): (bool, u8, Vec<u8>, Vec<u8>, Vec<u8>) = if ver == 4 {
        let ip = Ipv4Packet::new(&l3).unwrap();
        let ok = ipv4::checksum(&ip) == ip.get_checksum();
        let l4 = ip.payload()[..ip.get_total_length() as usize - 20].to_vec();
        (
            ok,
            ip.get_next_level_protocol().0,
            l4,
            ip.get_source().octets().to_vec(),
            ip.get_destination().octets().to_vec(),
        )
    } else {
        let ip = Ipv6Packet::new(&l3).unwrap();
        let l4 = ip.payload()[..ip.get_payload_length() as usize].to_vec();
        (
            true,
            ip.get_next_header().0,
            l4,
            ip.get_source().octets().to_vec(),
            ip.get_destination().octets().to_vec(),
        )
    };
    let v4 = |b: &[u8]| std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    let v6 = |b: &[u8]| std::net::Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap());
    if proto == TCP {
        let t = TcpPacket::new(&l4).unwrap();
        let want = match ver {
            4 => tcp::ipv4_checksum(&t, &v4(&src), &v4(&dst)),
            _ => tcp::ipv6_checksum(&t, &v6(&src), &v6(&dst)),
        };
        (ok_ip && want == t.get_checksum(), t.payload().to_vec())
    } else {
        let u = UdpPacket::new(&l4).unwrap();
        let want = match ver {
            4 => udp::ipv4_checksum(&u, &v4(&src), &v4(&dst)),
            _ => udp::ipv6_checksum(&u, &v6(&src), &v6(&dst)),
        };
        (ok_ip && want == u.get_checksum(), u.payload().to_vec())
    }
}

fn spec() -> impl Strategy<Value = Spec> {
    (any::<bool>(), any::<bool>(), any::<bool>(), any::<u32>(), prop::collection::vec(any::<u8>(), 1..3000))
        .prop_map(|(v6, udp, vlan, seq, payload)| Spec {
            v6,
            proto: if udp { UDP } else { TCP },
            vlan,
            seq,
            ..Spec::tcp(payload)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn inserted_checksums_are_what_pnet_computes_and_verify_accepts_them(s in spec(), flip in any::<prop::sample::Index>()) {
        let f = s.with_csums();
        let (ok, payload) = pnet_check(&f);
        prop_assert!(ok);
        prop_assert_eq!(payload, s.payload.clone());
        let st = verify(&f);
        prop_assert!(st.l4_checked && !st.l4_error && !st.ip_error && st.data_valid());
        prop_assert_eq!(st.udp, s.proto == UDP);
        prop_assert_eq!(st.ip_checked, !s.v6);
        // One flipped payload bit: the device reports a TCP/UDP checksum error.
        let mut bad = f.clone();
        let i = f.len() - s.payload.len() + flip.index(s.payload.len());
        bad[i] ^= 0x10;
        prop_assert!(verify(&bad).l4_error);
    }

    #[test]
    fn a_partial_checksum_is_completed_as_the_guest_asked(s in spec()) {
        // As Linux sends CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum.
        let mut f = s.with_csums();
        let l = layout(&f).unwrap();
        let end = f.len();
        let off = if l.proto == TCP { 16 } else { 6 };
        let ph = fold(pseudo(&f, &l, end - l.l4));
        f[l.l4 + off..l.l4 + off + 2].copy_from_slice(&ph.to_be_bytes());
        prop_assert!(complete_partial(&mut f, l.l4, off, end));
        let (ok, _) = pnet_check(&f);
        // UDP's "no checksum" zero is the one value a partial completion may differ in.
        prop_assert!(ok || (l.proto == UDP && f[l.l4 + 6..l.l4 + 8] == [0, 0]));
        prop_assert!(!complete_partial(&mut f, l.l4, end, end));
    }

    #[test]
    fn tso_segments_are_valid_frames_that_carry_the_payload_in_order(
        payload in prop::collection::vec(any::<u8>(), 1..20_000), mss in 88u16..9000, v6 in any::<bool>(),
        vlan in any::<bool>(), psh in any::<bool>(),
    ) {
        let flags = ACK | if psh { PSH } else { 0 } | 0x80; // CWR on the first only
        let s = Spec { v6, vlan, flags, ..Spec::tcp(payload.clone()) };
        let f = s.build();
        let mut out = Vec::new();
        let mut got = Vec::new();
        let mut segs = Vec::new();
        let count = segment(&f, mss, &mut out, |seg| segs.push(seg.to_vec())).unwrap();
        prop_assert_eq!(count, payload.len().div_ceil(mss as usize));
        for (n, seg) in segs.iter().enumerate() {
            let (ok, p) = pnet_check(seg);
            prop_assert!(ok, "segment {} checksums", n);
            prop_assert!(p.len() <= mss as usize);
            let l = layout(seg).unwrap();
            let seq = u32::from_be_bytes(seg[l.l4 + 4..l.l4 + 8].try_into().unwrap());
            prop_assert_eq!(seq, s.seq.wrapping_add(got.len() as u32));
            let fl = seg[l.l4 + 13];
            let last = n + 1 == count;
            prop_assert_eq!(fl & PSH != 0, psh && last);
            prop_assert_eq!(fl & 0x80 != 0, n == 0);
            if !v6 {
                prop_assert_eq!(u16::from_be_bytes([seg[l.l3 + 4], seg[l.l3 + 5]]), s.id.wrapping_add(n as u16));
            }
            got.extend_from_slice(&p);
        }
        prop_assert_eq!(got, payload);
    }

    #[test]
    fn lro_gives_back_what_tso_cut_and_guests_see_one_frame(
        payload in prop::collection::vec(any::<u8>(), 1..40_000), mss in 500u16..1460, v6 in any::<bool>(),
    ) {
        let s = Spec { v6, ..Spec::tcp(payload.clone()) };
        let f = s.build();
        let mut out = Vec::new();
        let mut lro = Lro::new(LroConfig { max_segs: 100, ..LroConfig::default() });
        let mut given = Vec::new();
        segment(&f, mss, &mut out, |seg| lro.receive(seg, 0, &mut given)).unwrap();
        lro.flush_all(&mut given);
        prop_assert_eq!(given.len(), 1, "one coalesced frame");
        let o = &given[0];
        let (ok, p) = pnet_check(&o.frame);
        prop_assert!(ok);
        prop_assert_eq!(p, payload.clone());
        prop_assert_eq!(o.segs as usize, payload.len().div_ceil(mss as usize));
        prop_assert_eq!(o.mss as usize, payload.len().min(mss as usize));
        prop_assert_eq!(o.v6, v6);
    }
}

#[test]
fn lro_can_leave_the_tcp_checksum_partial_for_the_receiver_to_complete() {
    let mut lro = Lro::new(LroConfig { partial: true, ..LroConfig::default() });
    let mut out = Vec::new();
    for i in 0..3u32 {
        lro.receive(&seg(i * 1000, 1000, |s| s.id = 1), 0, &mut out);
    }
    lro.flush_all(&mut out);
    assert_eq!(out.len(), 1);
    let mut f = out.pop().unwrap().frame;
    let l = layout(&f).unwrap();
    assert!(!pnet_check(&f).0, "partial: not yet a valid checksum");
    let end = f.len();
    assert!(complete_partial(&mut f, l.l4, 16, end));
    let (ok, p) = pnet_check(&f);
    assert!(ok && p.len() == 3000);
    // Buffers come back for reuse.
    lro.recycle(f);
    lro.receive(&seg(0, 100, |_| {}), 0, &mut out);
    lro.flush_all(&mut out);
    assert_eq!(out[0].frame.len(), seg(0, 100, |_| {}).len());
}

#[test]
fn lro_leaves_segments_under_the_minimum_mss_alone() {
    let mut lro = Lro::new(LroConfig { min_mss: 88, ..LroConfig::default() });
    let mut out = Vec::new();
    for i in 0..4u32 {
        lro.receive(&seg(i * 50, 50, |s| s.id = 1), 0, &mut out);
    }
    lro.flush_all(&mut out);
    assert_eq!(out.iter().map(|o| o.segs).collect::<Vec<_>>(), vec![1, 1, 1, 1]);
}

fn seg(seq_off: u32, len: usize, edit: impl Fn(&mut Spec)) -> Vec<u8> {
    let mut s = Spec::tcp(vec![seq_off as u8; len]);
    s.seq = 1000 + seq_off;
    s.id = 1 + (seq_off / 1000) as u16;
    edit(&mut s);
    s.with_csums()
}

/// Feeds segments, then flushes; the frames out, as (segments, payload length).
fn run(segs: &[Vec<u8>]) -> Vec<(u16, usize)> {
    let mut lro = Lro::new(LroConfig::default());
    let mut out: Vec<Out> = Vec::new();
    for s in segs {
        lro.receive(s, 0, &mut out);
    }
    lro.flush_all(&mut out);
    out.iter().map(|o| (o.segs, pnet_check(&o.frame).1.len())).collect()
}

#[test]
fn lro_merges_in_order_segments_of_one_flow() {
    let got = run(&[seg(0, 1000, |_| {}), seg(1000, 1000, |_| {}), seg(2000, 1000, |_| {})]);
    assert_eq!(got, vec![(3, 3000)]);
}

#[test]
fn lro_refuses_what_gro_refuses() {
    // Out of order: the held frame goes, the next starts anew.
    assert_eq!(run(&[seg(0, 1000, |_| {}), seg(2000, 1000, |_| {})]), vec![(1, 1000), (1, 1000)]);
    // A different ACK number.
    assert_eq!(run(&[seg(0, 1000, |_| {}), seg(1000, 1000, |s| s.ack = 78)]), vec![(1, 1000), (1, 1000)]);
    // Different TCP options (timestamps).
    assert_eq!(run(&[seg(0, 1000, |_| {}), seg(1000, 1000, |s| s.ts = Some(6))]), vec![(1, 1000), (1, 1000)]);
    // A longer segment than the first (the MSS).
    assert_eq!(run(&[seg(0, 1000, |_| {}), seg(1000, 1200, |_| {})]), vec![(1, 1000), (1, 1200)]);
    // A different TTL.
    assert_eq!(run(&[seg(0, 1000, |_| {}), seg(1000, 1000, |s| s.ttl = 63)]), vec![(1, 1000), (1, 1000)]);
    // An IP id that neither increments nor stays fixed under DF.
    assert_eq!(run(&[seg(0, 1000, |_| {}), seg(1000, 1000, |s| s.id = 9)]), vec![(1, 1000), (1, 1000)]);
    // ... but a fixed id with DF merges.
    assert_eq!(run(&[seg(0, 1000, |_| {}), seg(1000, 1000, |s| s.id = 1)]), vec![(2, 2000)]);
    // CWR is never merged.
    assert_eq!(
        run(&[seg(0, 1000, |_| {}), seg(1000, 1000, |s| s.flags |= 0x80)]),
        vec![(1, 1000), (1, 1000)]
    );
    // A pure ACK passes at once, after the held frame.
    assert_eq!(run(&[seg(0, 1000, |_| {}), seg(1000, 0, |_| {})]), vec![(1, 1000), (1, 0)]);
    // A bad TCP checksum is not merged.
    let mut bad = seg(1000, 1000, |_| {});
    let n = bad.len();
    bad[n - 1] ^= 1;
    assert_eq!(run(&[seg(0, 1000, |_| {}), bad]), vec![(1, 1000), (1, 1000)]);
    // UDP passes.
    assert_eq!(run(&[seg(0, 100, |s| s.proto = UDP)]), vec![(1, 100)]);
}

#[test]
fn lro_ends_a_frame_on_psh_fin_or_a_short_segment() {
    let got = run(&[seg(0, 1000, |_| {}), seg(1000, 1000, |s| s.flags |= PSH), seg(2000, 1000, |_| {})]);
    assert_eq!(got, vec![(2, 2000), (1, 1000)]);
    let got = run(&[seg(0, 1000, |_| {}), seg(1000, 500, |_| {}), seg(1500, 1000, |_| {})]);
    assert_eq!(got, vec![(2, 1500), (1, 1000)]);
    // PSH on a segment with nothing held: delivered alone, not held.
    assert_eq!(run(&[seg(0, 1000, |s| s.flags |= PSH)]), vec![(1, 1000)]);
}

#[test]
fn lro_holds_at_most_the_bounds() {
    // 65,535 bytes of datagram: 1400-byte segments, 46 fit (46 * 1400 + 52 < 65,535).
    let mut lro = Lro::new(LroConfig { max_segs: 1000, ..LroConfig::default() });
    let mut out = Vec::new();
    for i in 0..60u32 {
        lro.receive(&seg(i * 1400, 1400, |s| s.id = 1), 0, &mut out);
    }
    lro.flush_all(&mut out);
    let sizes: Vec<u16> = out.iter().map(|o| o.segs).collect();
    assert_eq!(sizes, vec![46, 14]);
    assert!(out.iter().all(|o| o.frame.len() - 14 <= 65_535 && pnet_check(&o.frame).0));
    // max_segs (Linux: 18).
    let mut lro = Lro::new(LroConfig::default());
    let mut out = Vec::new();
    for i in 0..20u32 {
        lro.receive(&seg(i * 100, 100, |s| s.id = 1), 0, &mut out);
    }
    lro.flush_all(&mut out);
    assert_eq!(out.iter().map(|o| o.segs).collect::<Vec<_>>(), vec![18, 2]);
    // The timer: held past the timeout, given back without a flush.
    let mut lro = Lro::new(LroConfig { timeout_ns: 1000, ..LroConfig::default() });
    let mut out = Vec::new();
    lro.receive(&seg(0, 100, |_| {}), 0, &mut out);
    lro.flush_due(999, &mut out);
    assert!(out.is_empty() && lro.held() == 1);
    lro.flush_due(1000, &mut out);
    assert_eq!((out.len(), lro.held()), (1, 0));
}
