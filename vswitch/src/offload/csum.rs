//! The Internet checksum (RFC 1071) over bytes that may sit in several buffers at any
//! alignment, as the late copy sees a frame.

use iommu::{Grant, Ro};

/// A running one's-complement sum. Bytes may be added in pieces of any length: a piece that
/// starts at an odd position of the stream is byte-swapped into place (RFC 1071's byte-order
/// independence), so the pieces of a scattered frame add up as if contiguous.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sum {
    acc: u64,
    odd: bool,
}

impl Sum {
    /// A sum of nothing.
    pub const fn new() -> Self {
        Sum { acc: 0, odd: false }
    }

    /// Adds bytes the switch owns.
    pub fn add(&mut self, b: &[u8]) {
        // SAFETY: a slice is readable for its length.
        unsafe { self.add_raw(b.as_ptr(), b.len()) }
    }

    /// Adds a 16-bit word at an even position (pseudo-header fields).
    pub fn add_u16(&mut self, v: u16) {
        self.add(&v.to_be_bytes());
    }

    /// Adds `n` bytes at `p`, read with plain loads and no reference made: a guest may be
    /// writing them (its own packet, its own loss), and a racing write must not be undefined
    /// behaviour in the switch.
    ///
    /// # Safety
    /// `p..p+n` must be readable.
    pub unsafe fn add_raw(&mut self, p: *const u8, n: usize) {
        let mut s = 0u64;
        let mut i = 0usize;
        // 32-bit big-endian words: 2^16 = 1 in one's-complement arithmetic, so a 32-bit word
        // adds the same as its two 16-bit halves. 2^32 words before the u64 could carry out.
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            let v = u64::from_be(unsafe { (p.add(i) as *const u64).read_unaligned() });
            s += (v >> 32) + (v & 0xffff_ffff);
            i += 8;
        }
        while i + 2 <= n {
            // SAFETY: i + 2 <= n.
            s += u16::from_be(unsafe { (p.add(i) as *const u16).read_unaligned() }) as u64;
            i += 2;
        }
        if i < n {
            // SAFETY: i < n.
            s += (unsafe { *p.add(i) } as u64) << 8;
        }
        let folded = fold64(s);
        let folded = if self.odd { folded.swap_bytes() } else { folded };
        self.acc += folded as u64;
        self.odd ^= n % 2 == 1;
    }

    /// Adds another sum of bytes that follow (at an even position).
    pub fn add_sum(&mut self, o: Sum) {
        self.acc += fold64(o.acc) as u64;
    }

    /// The folded 16-bit sum (not complemented): what goes in a checksum field of a packet
    /// whose checksum a receiver will complete (the pseudo-header sum).
    pub fn fold(&self) -> u16 {
        fold64(self.acc)
    }

    /// The checksum: the complement of the folded sum.
    pub fn checksum(&self) -> u16 {
        !self.fold()
    }
}

/// Folds a 64-bit sum of 16-bit words to 16 bits with end-around carries.
fn fold64(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// Adds `len` bytes starting `off` bytes into the read grants `src`. False if they hold fewer.
///
/// # Safety
/// Every grant must still be valid (its queue's lock held).
pub unsafe fn sum_granted(src: &[Grant<Ro>], off: u32, len: u32, sum: &mut Sum) -> bool {
    let (mut pos, mut left) = (off, len);
    for s in src {
        if left == 0 {
            break;
        }
        if pos >= s.len() {
            pos -= s.len();
            continue;
        }
        let k = (s.len() - pos).min(left);
        // SAFETY: `pos + k <= s.len()`, inside the grant.
        unsafe { sum.add_raw(s.as_ptr().add(pos as usize), k as usize) };
        left -= k;
        pos = 0;
    }
    left == 0
}

/// The sum of an IPv4 TCP/UDP pseudo-header.
pub fn pseudo_v4(src: &[u8], dst: &[u8], proto: u8, l4_len: u32) -> Sum {
    let mut s = Sum::new();
    s.add(src);
    s.add(dst);
    s.add_u16(proto as u16);
    s.add_u16(l4_len as u16);
    s
}

/// The sum of an IPv6 TCP/UDP pseudo-header.
pub fn pseudo_v6(src: &[u8], dst: &[u8], proto: u8, l4_len: u32) -> Sum {
    let mut s = Sum::new();
    s.add(src);
    s.add(dst);
    s.add(&l4_len.to_be_bytes());
    s.add(&[0, 0, 0, proto]);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(b: &[u8]) -> u16 {
        pnet_packet::util::checksum(b, usize::MAX / 2)
    }

    #[test]
    fn test_known_values() {
        // RFC 1071's example words 0001 f203 f4f5 f6f7 sum to ddf2.
        let mut s = Sum::new();
        s.add(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]);
        assert_eq!(s.fold(), 0xddf2);
        assert_eq!(s.checksum(), !0xddf2);
        assert_eq!(Sum::new().checksum(), 0xffff);
    }

    proptest! {
        #[test]
        fn prop_pieces_add_up_as_one(data in proptest::collection::vec(any::<u8>(), 0..3000),
                                     cuts in proptest::collection::vec(0usize..3000, 0..8)) {
            // pnet's checksum skips the 16-bit word at the index given; none skipped here.
            let whole = if data.is_empty() { 0xffff } else { reference(&data) };
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(data.len())).collect();
            cuts.sort();
            let mut s = Sum::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([data.len()]) {
                s.add(&data[at..c]);
                at = c;
            }
            prop_assert_eq!(s.checksum(), whole);
        }

        #[test]
        fn prop_granted_sum_matches(data in proptest::collection::vec(any::<u8>(), 1..2000),
                                    split in 0usize..2000, off in 0usize..100) {
            let mut data = data;
            let split = split.min(data.len());
            let (a, b) = data.split_at_mut(split);
            // SAFETY: the test's buffers outlive the sum.
            let g = unsafe { [Grant::<Ro>::from_raw(a.as_mut_ptr(), a.len() as u32),
                              Grant::<Ro>::from_raw(b.as_mut_ptr(), b.len() as u32)] };
            let off = off.min(data.len() - 1);
            let mut s = Sum::new();
            // SAFETY: as above.
            let whole = unsafe { sum_granted(&g, off as u32, (data.len() - off) as u32, &mut s) };
            prop_assert!(whole);
            prop_assert_eq!(s.checksum(), reference(&data[off..]));
        }
    }
}
