//! The grant copy of the datapath: bytes move from buffers one guest granted the device for
//! reading into buffers another guest granted it for writing, and nowhere else.
//!
//! A virtio guest grants its device a buffer by posting it: the descriptor's address and
//! length say which bytes, its `WRITE` flag whether the device may write them (a receive
//! buffer) or only read them (a frame to send), and the grant lasts until the device hands the
//! buffer back through the used ring. That is Xen's transient grant, with the descriptor in
//! place of a grant reference. A [`Grant`] is such a buffer once [`Dma`](crate::Dma) has
//! checked it against the guest's memory (and, with a vIOMMU, the IOTLB's permissions); only
//! `Dma` makes one for guest memory, and the direction is in its type, so a copy cannot read
//! from a receive buffer or write into a frame being sent.
//!
//! The copy itself ([`GrantWriter`], [`grant_copy`]) checks every offset and length against
//! the grants it was given: whatever the caller computes, nothing outside them is touched. It
//! takes no lock and holds no reference count: what keeps a grant valid is the queue lock its
//! user holds while the buffer is out of the used ring, and the IOTLB invalidations that wait
//! for that lock (a revoke refused while in use, as `GrantTables::end_access` refuses one while
//! mapped).

use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use crate::fault::Access;

mod sealed {
    pub trait Sealed {}
}

/// The access a grant gives: [`Ro`] or [`Rw`].
pub trait Direction: Copy + sealed::Sealed {
    /// The access checked when the grant is made.
    const ACCESS: Access;
}

/// Granted for reading: a frame the guest sends.
#[derive(Clone, Copy, Debug)]
pub enum Ro {}
/// Granted for writing: a buffer the guest posted to receive into.
#[derive(Clone, Copy, Debug)]
pub enum Rw {}

impl sealed::Sealed for Ro {}
impl sealed::Sealed for Rw {}
impl Direction for Ro {
    const ACCESS: Access = Access::Read;
}
impl Direction for Rw {
    const ACCESS: Access = Access::Write;
}

/// A buffer granted to the device: `len` bytes of host memory behind a guest address, checked
/// for access `D`. Holds no lifetime: its user keeps the memory mapped (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct Grant<D> {
    ptr: *mut u8,
    len: u32,
    _d: PhantomData<D>,
}

impl<D> Default for Grant<D> {
    /// An empty grant (filler for fixed arrays; nothing can be copied through it).
    fn default() -> Self {
        Grant { ptr: ptr::null_mut(), len: 0, _d: PhantomData }
    }
}

impl<D: Direction> Grant<D> {
    /// A grant of `len` bytes at `p`, made by translation.
    #[inline(always)]
    pub(crate) fn new(p: NonNull<u8>, len: u32) -> Self {
        Grant { ptr: p.as_ptr(), len, _d: PhantomData }
    }

    /// A grant over memory the caller owns (the switch's own buffers, tests).
    ///
    /// # Safety
    /// `ptr` must point to `len` bytes that stay accessible as `D` says for as long as the
    /// grant is used.
    pub unsafe fn from_raw(ptr: *mut u8, len: u32) -> Self {
        Grant { ptr, len, _d: PhantomData }
    }

    /// Bytes granted.
    #[inline(always)]
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether nothing is granted.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first byte (for prefetching and address arithmetic; reading through it is the
    /// caller's business and its safety contract).
    #[inline(always)]
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
}

impl Grant<Rw> {
    /// Writes `bytes` (the switch's own) at `off`. False, with nothing written, if they do not
    /// fit inside the grant.
    ///
    /// # Safety
    /// The grant must still be valid (see the module docs).
    #[inline(always)]
    pub unsafe fn write_at(&self, off: u32, bytes: &[u8]) -> bool {
        if off as u64 + bytes.len() as u64 > self.len as u64 {
            return false;
        }
        // SAFETY: inside the grant (checked above); `bytes` is the caller's.
        unsafe { small_copy(self.ptr.add(off as usize), bytes.as_ptr(), bytes.len()) };
        true
    }

    /// [`write_at`](Self::write_at), except that bytes already holding these values are left
    /// alone: a receive buffer's virtio-net header usually holds what the buffer's last packet
    /// had, and not rewriting it keeps its cache line clean and shared with the receiver's CPU
    /// (DPDK's vhost does the same, `ASSIGN_UNLESS_EQUAL`). DPDK's virtio driver keeps the
    /// header in the line before the frame, so an unchanged header costs it no cache miss.
    ///
    /// # Safety
    /// As for `write_at`.
    #[inline(always)]
    pub unsafe fn update_at(&self, off: u32, bytes: &[u8]) -> bool {
        let n = bytes.len();
        // A virtio-net header (10 or 12 bytes): two overlapping 8-byte loads, no memcmp call.
        if (8..=16).contains(&n) && off as u64 + n as u64 <= self.len as u64 {
            // SAFETY: inside the grant (checked just above); the two loads of each side cover
            // exactly its `n` bytes (8 <= n <= 16).
            let same = unsafe {
                let (d, b) = (self.ptr.add(off as usize), bytes.as_ptr());
                ptr::read_unaligned(d as *const u64) == ptr::read_unaligned(b as *const u64)
                    && ptr::read_unaligned(d.add(n - 8) as *const u64)
                        == ptr::read_unaligned(b.add(n - 8) as *const u64)
            };
            if same {
                return true;
            }
        }
        // SAFETY: forwarded caller contract.
        unsafe { self.write_at(off, bytes) }
    }

    /// The grant copy between two single grants: `len` bytes at `src_off` of `src` to `off` of
    /// this one. False, with nothing copied, if either range leaves its grant.
    ///
    /// # Safety
    /// Both grants must still be valid.
    #[inline(always)]
    pub unsafe fn copy_at(&self, off: u32, src: &Grant<Ro>, src_off: u32, len: u32) -> bool {
        if off as u64 + len as u64 > self.len as u64 || src_off as u64 + len as u64 > src.len as u64 {
            return false;
        }
        // SAFETY: both ranges inside their grants (checked above). `copy` (memmove): a hostile
        // frontend may hand two ports the same memory.
        unsafe { ptr::copy(src.ptr.add(src_off as usize), self.ptr.add(off as usize), len as usize) };
        true
    }
}

/// Copies `n` bytes with a few fixed-size loads and stores instead of a `memcpy` call (a
/// virtio-net header, a frame's snapshot): two overlapping moves of the largest power of two
/// not above `n`, for `n` up to 64. Both loads come before the stores, so overlap is harmless.
///
/// # Safety
/// `src` has `n` readable bytes and `dst` room for `n`.
#[inline(always)]
pub unsafe fn small_copy(dst: *mut u8, src: *const u8, n: usize) {
    /// Two moves of `W` bytes: `[0, W)` and `[n - W, n)`; needs `W <= n <= 2W`.
    #[inline(always)]
    unsafe fn two<const W: usize>(dst: *mut u8, src: *const u8, n: usize) {
        // SAFETY: both windows lie inside the n bytes (caller's contract, W <= n).
        unsafe {
            let a = (src as *const [u8; W]).read_unaligned();
            let b = (src.add(n - W) as *const [u8; W]).read_unaligned();
            (dst as *mut [u8; W]).write_unaligned(a);
            (dst.add(n - W) as *mut [u8; W]).write_unaligned(b);
        }
    }
    // SAFETY: (whole block) each arm's width fits n as `two` requires.
    unsafe {
        match n {
            0 => {}
            32..=64 => two::<32>(dst, src, n),
            16..=31 => two::<16>(dst, src, n),
            8..=15 => two::<8>(dst, src, n),
            4..=7 => two::<4>(dst, src, n),
            _ => ptr::copy(src, dst, n),
        }
    }
}

/// Fills a list of write grants front to back: the switch's own bytes ([`put`](Self::put))
/// and bytes of read grants ([`copy_from`](Self::copy_from), the grant copy proper). Never
/// writes past the last grant; an operation that does not fit writes what fits and says so.
pub struct GrantWriter<'a> {
    dst: &'a [Grant<Rw>],
    seg: usize,
    off: u32,
    written: u32,
}

impl<'a> GrantWriter<'a> {
    /// Starts at the first byte of `dst`.
    #[inline(always)]
    pub fn new(dst: &'a [Grant<Rw>]) -> Self {
        GrantWriter { dst, seg: 0, off: 0, written: 0 }
    }

    /// Bytes written so far.
    #[inline(always)]
    pub fn written(&self) -> u32 {
        self.written
    }

    /// Writes `bytes` (the switch's own: a header, a snapshot, a VLAN tag). False if the
    /// grants ran out first.
    ///
    /// # Safety
    /// Every grant in the list must still be valid (see the module docs).
    #[inline(always)]
    pub unsafe fn put(&mut self, bytes: &[u8]) -> bool {
        let n = bytes.len();
        if let Some(d) = self.dst.get(self.seg) {
            if n <= 64 && (d.len - self.off) as usize > n {
                // Fits with room to spare in the current grant: no segment change.
                // SAFETY: `off + n < d.len`; `bytes` is the caller's.
                unsafe { small_copy(d.ptr.add(self.off as usize), bytes.as_ptr(), n) };
                self.off += n as u32;
                self.written += n as u32;
                return true;
            }
        }
        // SAFETY: forwarded; `bytes` holds its length.
        unsafe { self.write(bytes.as_ptr(), n as u32) }
    }

    /// The grant copy: `len` bytes starting `off` bytes into the read grants `src`. False,
    /// having copied what fit, if `src` holds fewer bytes past `off` or the write grants run
    /// out.
    ///
    /// # Safety
    /// Every grant in both lists must still be valid.
    #[inline(always)]
    pub unsafe fn copy_from(&mut self, src: &[Grant<Ro>], off: u32, len: u32) -> bool {
        let mut pos = off;
        let mut left = len;
        for s in src {
            if left == 0 {
                break;
            }
            if pos >= s.len {
                pos -= s.len;
                continue;
            }
            let k = (s.len - pos).min(left);
            // SAFETY: `pos + k <= s.len`, inside the read grant.
            if !unsafe { self.write(s.ptr.add(pos as usize), k) } {
                return false;
            }
            left -= k;
            pos = 0;
        }
        left == 0
    }

    /// # Safety
    /// `src` points to `n` readable bytes; the grants are valid.
    unsafe fn write(&mut self, mut src: *const u8, mut n: u32) -> bool {
        while n > 0 {
            let Some(d) = self.dst.get(self.seg) else { return false };
            let k = (d.len - self.off).min(n);
            // SAFETY: `off + k <= d.len`; src has n >= k bytes. `copy` (memmove): a hostile
            // frontend may hand two ports the same memory, so source and destination may
            // overlap.
            unsafe {
                ptr::copy(src, d.ptr.add(self.off as usize), k as usize);
                src = src.add(k as usize);
            }
            n -= k;
            self.off += k;
            self.written += k;
            if self.off == d.len {
                self.seg += 1;
                self.off = 0;
            }
        }
        true
    }
}

/// Copies `len` bytes from `off` bytes into `src` to the start of `dst` (Xen's `GNTTABOP_copy`
/// between two granted lists). Returns the bytes copied: `len` unless a side ran out.
///
/// # Safety
/// Every grant in both lists must still be valid.
pub unsafe fn grant_copy(src: &[Grant<Ro>], off: u32, dst: &[Grant<Rw>], len: u32) -> u32 {
    let mut w = GrantWriter::new(dst);
    // SAFETY: forwarded.
    unsafe { w.copy_from(src, off, len) };
    w.written()
}

/// Reads up to `out.len()` bytes from `off` bytes into `src` (what the switch decides on).
/// Returns how many were read.
///
/// # Safety
/// Every grant in `src` must still be valid.
pub unsafe fn read_granted(src: &[Grant<Ro>], off: u32, out: &mut [u8]) -> usize {
    let w = [Grant::<Rw> { ptr: out.as_mut_ptr(), len: out.len() as u32, _d: PhantomData }];
    // SAFETY: `out` is ours for the call; the rest forwarded.
    unsafe { grant_copy(src, off, &w, out.len() as u32) as usize }
}

/// Writes `bytes` at `off` bytes into the write grants `dst` (a field patched after a copy,
/// such as a checksum completed in software). False, having written what fit, if `dst` holds
/// fewer bytes past `off`.
///
/// # Safety
/// Every grant in `dst` must still be valid.
pub unsafe fn write_granted(dst: &[Grant<Rw>], off: u32, bytes: &[u8]) -> bool {
    let (mut pos, mut left) = (off, bytes);
    for d in dst {
        if left.is_empty() {
            break;
        }
        if pos >= d.len {
            pos -= d.len;
            continue;
        }
        let k = ((d.len - pos) as usize).min(left.len());
        // SAFETY: `pos + k <= d.len`, inside the write grant; `left` holds k bytes.
        unsafe { ptr::copy(left.as_ptr(), d.ptr.add(pos as usize), k) };
        left = &left[k..];
        pos = 0;
    }
    left.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_small_copy_every_length() {
        let src: Vec<u8> = (0..80).collect();
        for n in 0..=80 {
            let mut d = vec![0xaau8; 82];
            // SAFETY: src has 80 bytes, d has 82.
            unsafe { small_copy(d.as_mut_ptr().add(1), src.as_ptr(), n) };
            assert_eq!(&d[1..1 + n], &src[..n], "n = {n}");
            assert!(d[0] == 0xaa && d[1 + n..].iter().all(|&b| b == 0xaa), "n = {n}: wrote outside");
        }
    }

    #[test]
    fn test_update_at_writes_only_what_differs() {
        // A read-only page: an update with the bytes it already holds must not write (it would
        // fault), which is what keeps a receiver's header line clean.
        // SAFETY: a fresh anonymous mapping, unmapped below.
        let page = unsafe {
            libc::mmap(
                ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(page, libc::MAP_FAILED);
        let hdr: Vec<u8> = (1..=12).collect();
        for n in [10usize, 12, 16, 4, 20] {
            let bytes: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
            // SAFETY: (whole block) the page is ours and 4096 bytes long.
            unsafe {
                ptr::copy_nonoverlapping(bytes.as_ptr(), page.cast::<u8>().add(100), n);
                assert_eq!(libc::mprotect(page, 4096, libc::PROT_READ), 0);
                let g = Grant::<Rw>::from_raw(page.cast::<u8>().add(100), 64);
                if (8..=16).contains(&n) {
                    assert!(g.update_at(0, &bytes), "n = {n}: unchanged bytes on a read-only page");
                }
                assert_eq!(libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_WRITE), 0);
                // Different bytes are written, and nothing past them.
                let fresh: Vec<u8> = bytes.iter().map(|b| !b).collect();
                std::ptr::write_bytes(page.cast::<u8>().add(100 + n), 0xee, 8);
                assert!(g.update_at(0, &fresh));
                let got = std::slice::from_raw_parts(page.cast::<u8>().add(100), n + 8);
                assert_eq!(&got[..n], &fresh[..], "n = {n}");
                assert!(got[n..].iter().all(|&b| b == 0xee), "n = {n}: wrote past the bytes");
                // A change in the last byte only is seen too (the second load covers it).
                let mut last = fresh.clone();
                last[n - 1] ^= 1;
                assert!(g.update_at(0, &last));
                assert_eq!(std::slice::from_raw_parts(page.cast::<u8>().add(100), n), &last[..]);
                // Outside the grant: refused, nothing written.
                assert!(!g.update_at(64 - 4, &hdr));
                assert_eq!(std::slice::from_raw_parts(page.cast::<u8>().add(100), n), &last[..]);
            }
        }
        // SAFETY: mapped above.
        unsafe { libc::munmap(page, 4096) };
    }

    /// Cuts `[0, total)` at the given points (sorted, deduplicated) into `(start, len)` pieces.
    fn cut(total: usize, mut at: Vec<usize>) -> Vec<(usize, usize)> {
        at.retain(|&a| a > 0 && a < total);
        at.sort_unstable();
        at.dedup();
        let mut out = Vec::new();
        let mut s = 0;
        for a in at.into_iter().chain([total]) {
            out.push((s, a - s));
            s = a;
        }
        out
    }

    proptest! {
        /// Whatever offsets and lengths a caller asks for, a grant copy writes only inside the
        /// write grants (gaps and guards between them stay untouched), reads only inside the
        /// read grants, and delivers the granted bytes in order.
        #[test]
        fn prop_grant_copy_stays_inside_its_grants(
            src_len in 1usize..300,
            src_cuts in proptest::collection::vec(0usize..300, 0..5),
            dst_lens in proptest::collection::vec(1usize..120, 1..5),
            off in 0u32..320,
            len in 0u32..400,
            put in proptest::collection::vec(any::<u8>(), 0..70),
        ) {
            // Source grants over the middle of a buffer; its ends are not granted.
            let mut src_mem: Vec<u8> = (0..src_len + 64).map(|i| (i * 7 + 3) as u8).collect();
            let pieces = cut(src_len, src_cuts);
            let base = src_mem.as_mut_ptr();
            // SAFETY: every piece lies inside src_mem[32..32 + src_len].
            let src: Vec<Grant<Ro>> =
                pieces.iter().map(|&(s, l)| unsafe { Grant::from_raw(base.add(32 + s), l as u32) }).collect();
            // Destination grants with 16-byte gaps between them.
            let dst_total: usize = dst_lens.iter().map(|l| l + 16).sum::<usize>() + 16;
            let mut dst_mem = vec![0xeeu8; dst_total];
            let dbase = dst_mem.as_mut_ptr();
            let mut dst = Vec::new();
            let mut spans = Vec::new();
            let mut at = 16;
            for &l in &dst_lens {
                // SAFETY: inside dst_mem.
                dst.push(unsafe { Grant::<Rw>::from_raw(dbase.add(at), l as u32) });
                spans.push((at, l));
                at += l + 16;
            }
            let mut w = GrantWriter::new(&dst);
            // SAFETY: every grant points into the live vectors above.
            let put_ok = unsafe { w.put(&put) };
            let after_put = w.written();
            // SAFETY: as above.
            let copy_ok = unsafe { w.copy_from(&src, off, len) };
            let room: usize = dst_lens.iter().sum();
            let avail = src_len.saturating_sub(off as usize);
            prop_assert_eq!(put_ok, put.len() <= room);
            prop_assert_eq!(after_put as usize, put.len().min(room));
            let want = (len as usize).min(avail).min(room - after_put as usize);
            prop_assert_eq!(w.written() as usize, after_put as usize + want);
            prop_assert_eq!(copy_ok, (len as usize) <= avail && after_put as usize + len as usize <= room);
            // What the grants hold, in order, is the put bytes then source bytes from `off`.
            let mut got = Vec::new();
            for &(s, l) in &spans {
                got.extend_from_slice(&dst_mem[s..s + l]);
            }
            let mut model = put.clone();
            model.truncate(room);
            if want > 0 {
                model.extend_from_slice(&src_mem[32 + off as usize..][..want]);
            }
            prop_assert_eq!(&got[..model.len()], &model[..]);
            prop_assert!(got[model.len()..].iter().all(|&b| b == 0xee), "wrote past what it reported");
            // Nothing outside the write grants changed.
            let mut inside = vec![false; dst_total];
            for &(s, l) in &spans {
                inside[s..s + l].iter_mut().for_each(|x| *x = true);
            }
            for (i, &b) in dst_mem.iter().enumerate() {
                prop_assert!(inside[i] || b == 0xee, "byte {} outside every grant was written", i);
            }
        }
    }

    #[test]
    fn test_single_grant_copies_refuse_what_leaves_a_grant() {
        let mut src: Vec<u8> = (0..100).collect();
        let mut dst = vec![0u8; 64];
        // SAFETY: live test buffers; the grants cover 80 and 48 bytes of them.
        let (s, d) = unsafe {
            (Grant::<Ro>::from_raw(src.as_mut_ptr(), 80), Grant::<Rw>::from_raw(dst.as_mut_ptr(), 48))
        };
        // SAFETY: (whole block) as above.
        unsafe {
            assert!(d.copy_at(8, &s, 70, 10));
            assert!(!d.copy_at(8, &s, 71, 10), "past the read grant");
            assert!(!d.copy_at(40, &s, 0, 9), "past the write grant");
            assert!(!d.copy_at(u32::MAX, &s, 0, 2), "offsets do not wrap");
            assert!(d.write_at(0, b"hdr"));
            assert!(!d.write_at(46, b"xyz"));
        }
        assert_eq!(&dst[..3], b"hdr");
        assert_eq!(dst[8..18].to_vec(), (70..80).collect::<Vec<u8>>());
        assert!(dst[18..].iter().all(|&b| b == 0), "nothing else written");
    }

    #[test]
    fn test_read_granted_across_pieces() {
        let mut a: Vec<u8> = (0..5).collect();
        let mut b: Vec<u8> = (5..40).collect();
        // SAFETY: live test buffers.
        let src = unsafe { [Grant::from_raw(a.as_mut_ptr(), 5), Grant::from_raw(b.as_mut_ptr(), 35)] };
        let mut out = [0u8; 18];
        // SAFETY: as above.
        assert_eq!(unsafe { read_granted(&src, 3, &mut out) }, 18);
        assert_eq!(out.to_vec(), (3..21).collect::<Vec<u8>>());
        let mut long = [0u8; 64];
        // SAFETY: as above.
        assert_eq!(unsafe { read_granted(&src, 30, &mut long) }, 10, "only what was granted");
    }

    #[test]
    fn test_write_granted_across_grants_and_past_the_end() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 4];
        // SAFETY: the test's buffers outlive the writes.
        let g =
            unsafe { [Grant::<Rw>::from_raw(a.as_mut_ptr(), 3), Grant::<Rw>::from_raw(b.as_mut_ptr(), 4)] };
        // SAFETY: as above.
        assert!(unsafe { write_granted(&g, 2, &[1, 2]) });
        // SAFETY: as above.
        assert!(!unsafe { write_granted(&g, 6, &[3, 4]) }, "one byte fits, the other does not");
        // SAFETY: as above.
        assert!(!unsafe { write_granted(&g, 9, &[5]) });
        assert_eq!((a, b), ([0, 0, 1], [2, 0, 0, 3]));
    }
}
