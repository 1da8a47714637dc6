//! A sender's virtio-net header and GSO frame: `NetHdr::parse`, `check_tx` and the segmenter.
//!
//! Invariants: no panic; the header survives write → parse; an accepted checksum request lies
//! inside the frame; segments' payloads lie inside the frame and concatenate back to its
//! payload; `header` writes exactly `header_len` bytes; every segment's IPv4 header checksum,
//! IP length and TCP checksum verify with pnet_packet.

use arbitrary::{Arbitrary, Unstructured};
use pnet_packet::ipv4::{self, Ipv4Packet};
use pnet_packet::ipv6::Ipv6Packet;
use pnet_packet::tcp::{self, TcpPacket};

use crate::l2::TagEdit;
use crate::offload::csum::Sum;
use crate::offload::gso::{Segmenter, MAX_HDR, MAX_SEGMENTS};
use crate::offload::{check_tx, Caps, NetHdr, GSO_NONE};

/// What the sender hands over and how the receiver wants it.
#[derive(Arbitrary, Debug)]
pub struct Input {
    hdr: [u8; 10],
    caps: u8,
    max_plain: u16,
    edit: Edit,
    frame: Frame,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Edit {
    Keep,
    Pop,
    Push(u16),
    Retag(u16),
}

/// A frame: raw bytes, or a TCP/IP frame built from a few fields and then patched.
#[derive(Arbitrary, Debug)]
pub(crate) enum Frame {
    Raw(Vec<u8>),
    Tcp {
        v6: bool,
        tci: Option<u16>,
        ip_opts: u8,
        tcp_opts: u8,
        payload: u16,
        seed: u32,
        patch: Vec<(u8, u8)>,
    },
}

impl Frame {
    pub(crate) fn bytes(&self) -> Vec<u8> {
        let Frame::Tcp { v6, tci, ip_opts, tcp_opts, payload, seed, patch } = self else {
            let Frame::Raw(b) = self else { unreachable!() };
            return b.clone();
        };
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        if let Some(t) = tci {
            f.extend([0x81, 0x00]);
            f.extend(t.to_be_bytes());
        }
        let l3 = f.len();
        let ip_opts = if *v6 { 0 } else { (*ip_opts % 11) as usize * 4 };
        let tcp_opts = (*tcp_opts % 11) as usize * 4;
        let payload = (*payload % 9000) as usize;
        let l4_len = 20 + tcp_opts + payload;
        if *v6 {
            f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend((l4_len as u16).to_be_bytes());
            f.extend([6, 64]);
            f.extend([0xfd; 16]);
            f.extend([0xfe; 16]);
        } else {
            f.extend([0x08, 0x00, 0x45 + (ip_opts / 4) as u8, 0]);
            f.extend(((20 + ip_opts + l4_len).min(65535) as u16).to_be_bytes());
            f.extend([(*seed >> 8) as u8, *seed as u8, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
            f.extend(std::iter::repeat_n(1u8, ip_opts));
        }
        let _ = l3;
        f.extend([0x14, 0x51, 0x9c, 0x40]);
        f.extend(seed.to_be_bytes());
        f.extend([0, 0, 0, 0, ((5 + tcp_opts / 4) << 4) as u8, (*seed >> 24) as u8, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend(std::iter::repeat_n(1u8, tcp_opts));
        // Pseudo-random payload, eight bytes per xorshift64 step (a step per byte was a loop
        // of up to 9,000 turns per frame under coverage instrumentation).
        let mut x = u64::from(*seed) | 1;
        let start = f.len();
        while f.len() < start + payload {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            f.extend_from_slice(&x.to_le_bytes());
        }
        f.truncate(start + payload);
        for &(at, v) in patch.iter().take(4) {
            if let Some(b) = f.get_mut(at as usize) {
                *b = v;
            }
        }
        f
    }
}

fn caps(bits: u8) -> Caps {
    let b = |i: u8| bits & (1 << i) != 0;
    Caps {
        tx_csum: b(0),
        tx_tso4: b(1),
        tx_tso6: b(2),
        tx_ecn: b(3),
        rx_csum: b(4),
        rx_tso4: b(5),
        rx_tso6: b(6),
        rx_ecn: b(7),
    }
}

/// The libFuzzer entry point.
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(input);
    }
}

/// Checks one header and frame; panics on a broken invariant.
pub fn run(input: Input) {
    let h = NetHdr::parse(&input.hdr);
    let mut again = [0u8; 10];
    h.write(&mut again);
    assert_eq!(NetHdr::parse(&again), h, "header write → parse");
    let frame = input.frame.bytes();
    let len = frame.len() as u32;
    let tagged = frame.get(12..14) == Some(&[0x81, 0x00][..]);
    let l2_len = if tagged { 18 } else { 14 };
    let Ok(req) = check_tx(h, caps(input.caps), len, l2_len, input.max_plain as u32) else { return };
    if req.flags & crate::offload::F_NEEDS_CSUM != 0 {
        let end = req.csum_start as u32 + req.csum_offset as u32 + 2;
        assert!(
            req.csum_start as u32 >= l2_len && end <= len,
            "checksum request {req:?} outside {len} bytes"
        );
    }
    if req.gso_type == GSO_NONE {
        return;
    }
    let edit = match input.edit {
        Edit::Keep => TagEdit::Keep,
        Edit::Pop if tagged => TagEdit::Pop,
        Edit::Push(t) if !tagged => TagEdit::Push(t),
        Edit::Retag(t) if tagged => TagEdit::Retag(t),
        _ => TagEdit::Keep,
    };
    let Ok(seg) = Segmenter::new(&frame, len, req.gso_size, req.gso_v6(), edit) else { return };
    segments(&seg, &frame, req.gso_v6());
}

/// Cuts `frame` with `seg` and checks every segment.
fn segments(seg: &Segmenter, frame: &[u8], v6: bool) {
    let count = seg.count();
    assert!((1..=MAX_SEGMENTS).contains(&count), "{count} segments");
    let hlen = seg.header_len() as usize;
    assert!(hlen <= MAX_HDR + 4, "header of {hlen} bytes");
    let mut next = seg.payload(0).0 as usize;
    for k in 0..count {
        let (off, plen) = seg.payload(k);
        let (off, plen) = (off as usize, plen as usize);
        assert_eq!(off, next, "segment {k} does not follow the one before");
        assert!(off + plen <= frame.len(), "segment {k} payload {off}+{plen} past {}", frame.len());
        next = off + plen;
        let body = &frame[off..off + plen];
        let mut sum = Sum::new();
        sum.add(body);
        let mut out = [0xa5u8; MAX_HDR + 4 + 16];
        seg.header(k, Some(sum), &mut out);
        assert!(out[hlen..].iter().all(|&b| b == 0xa5), "header wrote past header_len");
        let mut s = out[..hlen].to_vec();
        s.extend_from_slice(body);
        verify(&s, v6, k);
    }
    assert_eq!(next, frame.len(), "segments do not reach the frame's end");
}

/// pnet_packet's view of one segment: lengths and checksums right.
fn verify(s: &[u8], v6: bool, k: u32) {
    let l3 = if s[12..14] == [0x81, 0x00] { 18 } else { 14 };
    if v6 {
        let ip = Ipv6Packet::new(&s[l3..]).expect("IPv6 header");
        assert_eq!(ip.get_payload_length() as usize, s.len() - l3 - 40, "segment {k}: IPv6 payload length");
        let t = TcpPacket::new(&s[l3 + 40..]).expect("TCP header");
        let want = tcp::ipv6_checksum(&t, &ip.get_source(), &ip.get_destination());
        assert_eq!(t.get_checksum(), want, "segment {k}: TCP checksum");
    } else {
        let ip = Ipv4Packet::new(&s[l3..]).expect("IPv4 header");
        assert_eq!(ip.get_total_length() as usize, s.len() - l3, "segment {k}: IPv4 total length");
        assert_eq!(ip.get_checksum(), ipv4::checksum(&ip), "segment {k}: IPv4 header checksum");
        let l4 = l3 + ip.get_header_length() as usize * 4;
        let t = TcpPacket::new(&s[l4..]).expect("TCP header");
        let want = tcp::ipv4_checksum(&t, &ip.get_source(), &ip.get_destination());
        assert_eq!(t.get_checksum(), want, "segment {k}: TCP checksum");
    }
}
