//! Synthetic test frames: Ethernet (+ optional 802.1Q tag) / IPv4 / UDP with a
//! sequence number and a verifiable payload pattern.
//!
//! # Frame layout (untagged; every offset after byte 12 moves by +4 with a VLAN tag)
//!
//! | offset | size | content                                              |
//! |-------:|-----:|------------------------------------------------------|
//! | 0      | 6    | destination MAC                                      |
//! | 6      | 6    | source MAC                                           |
//! | 12     | 4    | *only if tagged:* TPID `0x8100`, TCI (PCP 0, VID)     |
//! | 12     | 2    | EtherType `0x0800` (IPv4)                            |
//! | 14     | 20   | IPv4 header 198.18.0.1 → 198.18.0.2, proto UDP, valid checksum |
//! | 34     | 8    | UDP header 5000 → 5001, checksum 0                   |
//! | 42     | 8    | **sequence number, big-endian u64** ([`SEQ_OFFSET`]) |
//! | 50     | 4    | magic `b"VSWB"` ([`MAGIC`])                          |
//! | 54     | n    | pattern: byte `i` of the pattern is `(seq + i) as u8` |
//! | ...    |      | zero padding up to the 60-byte Ethernet minimum      |
//!
//! The UDP payload is `payload_len` bytes (at least [`MIN_PAYLOAD`]): sequence
//! number, magic and pattern. [`frame_seq`] recovers the sequence number and
//! [`verify_frame`] checks that a received frame is bit-for-bit what
//! [`build_frame`] produced for that sequence number.

/// Offset of the big-endian sequence number in an untagged frame (add
/// [`VLAN_TAG_LEN`] per 802.1Q tag).
pub const SEQ_OFFSET: usize = ETH_HDR_LEN + IPV4_HDR_LEN + UDP_HDR_LEN;
/// Length of an 802.1Q tag.
pub const VLAN_TAG_LEN: usize = 4;
/// Magic bytes following the sequence number.
pub const MAGIC: [u8; 4] = *b"VSWB";
/// Smallest UDP payload: sequence number + magic.
pub const MIN_PAYLOAD: usize = 8 + MAGIC.len();
/// Minimum Ethernet frame length without FCS; shorter frames are zero padded.
pub const MIN_FRAME_LEN: usize = 60;

const ETH_HDR_LEN: usize = 14;
const IPV4_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_VLAN: u16 = 0x8100;
const SRC_IP: [u8; 4] = [198, 18, 0, 1];
const DST_IP: [u8; 4] = [198, 18, 0, 2];
const SRC_PORT: u16 = 5000;
const DST_PORT: u16 = 5001;

/// Length of the frame [`build_frame`] returns for these arguments.
pub fn frame_len(vlan: bool, payload_len: usize) -> usize {
    let tag = if vlan { VLAN_TAG_LEN } else { 0 };
    (SEQ_OFFSET + tag + payload_len.max(MIN_PAYLOAD)).max(MIN_FRAME_LEN)
}

/// Builds a test frame carrying `seq` (see the module docs for the layout).
///
/// `vlan` is the 12-bit VLAN id of an optional 802.1Q tag (higher bits are
/// masked off); `payload_len` is the UDP payload length, raised to
/// [`MIN_PAYLOAD`] if smaller. The frame is at least [`MIN_FRAME_LEN`] bytes.
pub fn build_frame(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, payload_len: usize, seq: u64) -> Vec<u8> {
    let mut f = vec![0u8; frame_len(vlan.is_some(), payload_len)];
    write_frame(&mut f, dst, src, vlan, payload_len, seq);
    f
}

/// Like [`build_frame`] but writes into `buf` (no allocation) and returns the
/// frame length.
///
/// # Panics
/// If `buf` is shorter than [`frame_len`]`(vlan.is_some(), payload_len)`.
pub fn write_frame(
    buf: &mut [u8],
    dst: [u8; 6],
    src: [u8; 6],
    vlan: Option<u16>,
    payload_len: usize,
    seq: u64,
) -> usize {
    let payload_len = payload_len.max(MIN_PAYLOAD);
    let len = frame_len(vlan.is_some(), payload_len);
    let f = &mut buf[..len];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    let mut off = 12;
    if let Some(vid) = vlan {
        f[off..off + 2].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        f[off + 2..off + 4].copy_from_slice(&(vid & 0x0fff).to_be_bytes());
        off += VLAN_TAG_LEN;
    }
    f[off..off + 2].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    off += 2;

    // IPv4 header.
    let ip = off;
    let ip_total = (IPV4_HDR_LEN + UDP_HDR_LEN + payload_len) as u16;
    f[ip] = 0x45; // version 4, IHL 5
    f[ip + 1] = 0; // DSCP/ECN
    f[ip + 2..ip + 4].copy_from_slice(&ip_total.to_be_bytes());
    f[ip + 4..ip + 6].copy_from_slice(&(seq as u16).to_be_bytes()); // identification
    f[ip + 6..ip + 8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    f[ip + 8] = 64; // TTL
    f[ip + 9] = 17; // UDP
    f[ip + 10..ip + 12].fill(0);
    f[ip + 12..ip + 16].copy_from_slice(&SRC_IP);
    f[ip + 16..ip + 20].copy_from_slice(&DST_IP);
    let csum = ipv4_checksum(&f[ip..ip + IPV4_HDR_LEN]);
    f[ip + 10..ip + 12].copy_from_slice(&csum.to_be_bytes());
    off += IPV4_HDR_LEN;

    // UDP header (checksum 0 = not computed, legal for IPv4).
    f[off..off + 2].copy_from_slice(&SRC_PORT.to_be_bytes());
    f[off + 2..off + 4].copy_from_slice(&DST_PORT.to_be_bytes());
    f[off + 4..off + 6].copy_from_slice(&((UDP_HDR_LEN + payload_len) as u16).to_be_bytes());
    f[off + 6..off + 8].fill(0);
    off += UDP_HDR_LEN;

    // Payload: seq, magic, pattern.
    f[off..off + 8].copy_from_slice(&seq.to_be_bytes());
    f[off + 8..off + 12].copy_from_slice(&MAGIC);
    let pat = off + MIN_PAYLOAD;
    let pat_end = off + payload_len;
    for (i, b) in f[pat..pat_end].iter_mut().enumerate() {
        *b = seq.wrapping_add(i as u64) as u8;
    }
    f[pat_end..].fill(0);
    len
}

/// Offset of the sequence number in `frame` (skipping any number of 802.1Q
/// tags), if the frame looks like one built by [`build_frame`].
fn seq_offset(frame: &[u8]) -> Option<usize> {
    let mut off = 12;
    loop {
        let et = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
        match et {
            ETHERTYPE_VLAN => off += VLAN_TAG_LEN,
            ETHERTYPE_IPV4 => break,
            _ => return None,
        }
    }
    let seq_off = off + 2 + IPV4_HDR_LEN + UDP_HDR_LEN;
    if frame.get(seq_off + 8..seq_off + 12)? != MAGIC {
        return None;
    }
    Some(seq_off)
}

/// Sequence number of a frame built by [`build_frame`] (tagged or not), or
/// `None` if the frame is not one of ours.
pub fn frame_seq(frame: &[u8]) -> Option<u64> {
    let off = seq_offset(frame)?;
    Some(u64::from_be_bytes(frame[off..off + 8].try_into().ok()?))
}

/// Checks a received frame completely: IPv4 header checksum and lengths, UDP
/// length, magic, payload pattern and zero padding. Returns the sequence
/// number if the frame is intact.
pub fn verify_frame(frame: &[u8]) -> Option<u64> {
    let seq_off = seq_offset(frame)?;
    let ip = seq_off - UDP_HDR_LEN - IPV4_HDR_LEN;
    let iph = &frame[ip..ip + IPV4_HDR_LEN];
    if iph[0] != 0x45 || ipv4_checksum(iph) != 0 {
        return None;
    }
    let ip_total = u16::from_be_bytes([iph[2], iph[3]]) as usize;
    let payload_len = ip_total.checked_sub(IPV4_HDR_LEN + UDP_HDR_LEN)?;
    let udp_len = u16::from_be_bytes([frame[ip + 24], frame[ip + 25]]) as usize;
    if udp_len != UDP_HDR_LEN + payload_len || payload_len < MIN_PAYLOAD {
        return None;
    }
    let end = seq_off + payload_len;
    if frame.len() < end || frame.len() != end.max(MIN_FRAME_LEN) {
        return None;
    }
    let seq = u64::from_be_bytes(frame[seq_off..seq_off + 8].try_into().ok()?);
    let pattern_ok = frame[seq_off + MIN_PAYLOAD..end]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == seq.wrapping_add(i as u64) as u8);
    let pad_ok = frame[end..].iter().all(|&b| b == 0);
    (pattern_ok && pad_ok).then_some(seq)
}

/// A TCP/IPv4 segment from `src` to `dst` with `len` payload bytes (a pattern from `seq`) at
/// sequence number `seq`, IP id `id`, only ACK set, both checksums right: what a sender's stack
/// puts on a wire without offloads.
pub fn build_tcp_segment(dst: [u8; 6], src: [u8; 6], seq: u32, id: u16, len: usize) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
    f.extend_from_slice(&((40 + len) as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(&[0x40, 0, 64, 6, 0, 0]);
    f.extend_from_slice(&SRC_IP);
    f.extend_from_slice(&DST_IP);
    let c = ipv4_checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&SRC_PORT.to_be_bytes());
    f.extend_from_slice(&(DST_PORT + u16::from(dst[5])).to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&7u32.to_be_bytes());
    f.extend_from_slice(&[0x50, 0x10, 0x01, 0xf5, 0, 0, 0, 0]);
    f.extend((0..len).map(|i| (seq as usize + i) as u8));
    // The TCP checksum over the pseudo header and the segment.
    let mut pseudo = f[26..34].to_vec();
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&((20 + len) as u16).to_be_bytes());
    pseudo.extend_from_slice(&f[34..]);
    let c = ipv4_checksum(&pseudo);
    f[50..52].copy_from_slice(&c.to_be_bytes());
    f
}

/// RFC 791 header checksum of `hdr`: compute it over a header whose checksum field is zero;
/// over a correct header (checksum included) it gives 0.
pub fn ipv4_checksum(hdr: &[u8]) -> u16 {
    let mut sum: u32 =
        hdr.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    const B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

    #[test]
    fn untagged_layout_and_roundtrip() {
        let f = build_frame(B, A, None, 100, 0x0102_0304_0506_0708);
        assert_eq!(f.len(), SEQ_OFFSET + 100);
        assert_eq!(&f[0..6], &B);
        assert_eq!(&f[6..12], &A);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(&f[SEQ_OFFSET..SEQ_OFFSET + 8], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&f[SEQ_OFFSET + 8..SEQ_OFFSET + 12], &MAGIC);
        assert_eq!(frame_seq(&f), Some(0x0102_0304_0506_0708));
        assert_eq!(verify_frame(&f), Some(0x0102_0304_0506_0708));
        assert_eq!(ipv4_checksum(&f[14..34]), 0);
    }

    #[test]
    fn tagged_layout() {
        let f = build_frame(B, A, Some(0x1234), 20, 7);
        assert_eq!(&f[12..16], &[0x81, 0x00, 0x02, 0x34], "VID masked to 12 bits");
        assert_eq!(&f[16..18], &[0x08, 0x00]);
        let off = SEQ_OFFSET + VLAN_TAG_LEN;
        assert_eq!(u64::from_be_bytes(f[off..off + 8].try_into().unwrap()), 7);
        assert_eq!(frame_seq(&f), Some(7));
        assert_eq!(verify_frame(&f), Some(7));
    }

    #[test]
    fn minimum_size_and_padding() {
        for vlan in [None, Some(5)] {
            let f = build_frame(B, A, vlan, 0, 42);
            assert_eq!(f.len(), MIN_FRAME_LEN);
            assert_eq!(frame_seq(&f), Some(42));
            assert_eq!(verify_frame(&f), Some(42));
        }
        assert_eq!(frame_len(false, 0), 60);
        assert_eq!(frame_len(false, 1458), 1500);
        assert_eq!(frame_len(true, 1458), 1504);
    }

    #[test]
    fn corruption_is_detected() {
        let f = build_frame(B, A, None, 200, 99);
        for pos in [20, SEQ_OFFSET + 9, SEQ_OFFSET + 50, f.len() - 1] {
            let mut g = f.clone();
            g[pos] ^= 0x40;
            assert_eq!(verify_frame(&g), None, "flip at {pos} not detected");
        }
        // Truncation and extension.
        assert_eq!(verify_frame(&f[..f.len() - 1]), None);
        let mut longer = f.clone();
        longer.push(0);
        assert_eq!(verify_frame(&longer), None);
    }

    #[test]
    fn foreign_frames_are_rejected() {
        assert_eq!(frame_seq(&[]), None);
        assert_eq!(frame_seq(&[0u8; 60]), None);
        let mut arp = build_frame(B, A, None, 50, 1);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(frame_seq(&arp), None);
        let mut no_magic = build_frame(B, A, None, 50, 1);
        no_magic[SEQ_OFFSET + 8] = b'X';
        assert_eq!(frame_seq(&no_magic), None);
    }

    #[test]
    fn write_frame_matches_build_frame() {
        let mut buf = [0xffu8; 2048];
        let n = write_frame(&mut buf, B, A, Some(10), 1000, 12345);
        assert_eq!(&buf[..n], &build_frame(B, A, Some(10), 1000, 12345)[..]);
    }
}
