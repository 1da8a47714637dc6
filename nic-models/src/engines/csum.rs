//! Internet checksums (RFC 1071) as the device computes them: insert on transmit (the virtio
//! `NEEDS_CSUM` request, or a whole header), verify on receive (the 82576's IPCS/TCPCS/UDPCS
//! status with IPE/TCPE errors).

use super::{ip_end, layout, Layout, TCP, UDP};

/// The one's-complement sum of `data` added to `sum` (not folded).
#[inline]
pub fn add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        sum += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let r = chunks.remainder();
    let mut i = 0;
    while i + 1 < r.len() {
        sum += u64::from(u16::from_be_bytes([r[i], r[i + 1]]));
        i += 2;
    }
    if i < r.len() {
        sum += u64::from(r[i]) << 8;
    }
    sum
}

/// Folds a sum to 16 bits.
#[inline]
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The pseudo-header sum of an L4 segment of `len` bytes.
pub fn pseudo(f: &[u8], l: &Layout, len: usize) -> u64 {
    let s = match l.v6 {
        true => add(0, &f[l.l3 + 8..l.l3 + 40]),
        false => add(0, &f[l.l3 + 12..l.l3 + 20]),
    };
    s + u64::from(l.proto) + len as u64
}

/// Writes the IPv4 header checksum.
pub fn insert_ip4(f: &mut [u8], l: &Layout) {
    let ihl = l.l4 - l.l3;
    f[l.l3 + 10..l.l3 + 12].fill(0);
    let c = !fold(add(0, &f[l.l3..l.l3 + ihl]));
    f[l.l3 + 10..l.l3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// Offset of the L4 checksum field.
fn l4_field(l: &Layout) -> usize {
    l.l4 + if l.proto == TCP { 16 } else { 6 }
}

/// Writes the whole TCP or UDP checksum (pseudo header included).
pub fn insert_l4(f: &mut [u8], l: &Layout) {
    let end = ip_end(f, l);
    let at = l4_field(l);
    f[at..at + 2].fill(0);
    let mut c = !fold(pseudo(f, l, end - l.l4) + add(0, &f[l.l4..end]));
    if l.proto == UDP && c == 0 {
        c = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Completes a partial checksum as virtio's `NEEDS_CSUM` asks: the sum of everything from
/// `start` to the end of the datagram (the field holds the pseudo-header sum the sender put
/// there) goes, complemented, at `start + offset`. False if the offsets are outside the frame.
pub fn complete_partial(f: &mut [u8], start: usize, offset: usize, end: usize) -> bool {
    let at = start.saturating_add(offset);
    if end > f.len() || start >= end || at + 2 > end {
        return false;
    }
    let c = !fold(add(0, &f[start..end]));
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// What receive checksum verification found (the 82576's RX descriptor status).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxStatus {
    /// IPCS: the IPv4 header checksum was checked.
    pub ip_checked: bool,
    /// IPE: it was wrong.
    pub ip_error: bool,
    /// TCPCS: the TCP or UDP checksum was checked.
    pub l4_checked: bool,
    /// UDPCS: it was a UDP checksum.
    pub udp: bool,
    /// TCPE: it was wrong.
    pub l4_error: bool,
}

impl RxStatus {
    /// Whether the guest may skip checking (virtio `DATA_VALID`).
    pub fn data_valid(&self) -> bool {
        self.l4_checked && !self.l4_error && !self.ip_error
    }
}

/// Verifies a received frame's checksums, as `igb_verify_csum_in_sw` does: the IPv4 header's,
/// then TCP's or UDP's (a UDP checksum of zero over IPv4 means none and is not checked).
pub fn verify(f: &[u8]) -> RxStatus {
    let mut s = RxStatus::default();
    let Some(l) = layout(f) else { return s };
    if !l.v6 {
        s.ip_checked = true;
        s.ip_error = fold(add(0, &f[l.l3..l.l4])) != 0xffff;
    }
    let at = l4_field(&l);
    if l.proto == UDP && !l.v6 && f[at] == 0 && f[at + 1] == 0 {
        return s;
    }
    let end = ip_end(f, &l);
    s.l4_checked = true;
    s.udp = l.proto == UDP;
    s.l4_error = fold(pseudo(f, &l, end - l.l4) + add(0, &f[l.l4..end])) != 0xffff;
    s
}
