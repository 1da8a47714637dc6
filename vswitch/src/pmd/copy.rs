//! The late copy: frame bytes straight from the sender's guest memory into the receiver's
//! buffers, with the VLAN tag edit applied on the way and a fresh virtio-net header in front.

use std::ptr;

use crate::l2::TagEdit;
use crate::virtio::Seg;

/// Where a frame lives in the sender's memory: its chain's segments, the sender's header
/// length to skip, and the frame length.
#[derive(Clone, Copy)]
pub struct Frame<'a> {
    /// The sender's chain.
    pub segs: &'a [Seg],
    /// Bytes of virtio-net header at the start of the chain.
    pub skip: u32,
    /// Frame length.
    pub len: u32,
}

/// Bytes a frame occupies after `edit`.
#[inline(always)]
pub fn out_len(len: u32, edit: TagEdit) -> u32 {
    match edit {
        TagEdit::Keep | TagEdit::Retag(_) => len,
        TagEdit::Pop => len - 4,
        TagEdit::Push(_) => len + 4,
    }
}

/// Writes `hdr` then the edited frame into `dst` (whose total length must be at least
/// `hdr.len() + out_len`). Returns the bytes written.
///
/// # Safety
/// Every segment must point to that many bytes of mapped guest memory (the chain walk checked
/// this), and the memory must stay mapped for the call (the caller holds both queues' locks).
pub unsafe fn copy_frame(f: &Frame<'_>, edit: TagEdit, hdr: &[u8], dst: &[Seg]) -> u32 {
    let total = hdr.len() as u32 + out_len(f.len, edit);
    let d0 = dst[0];
    if edit == TagEdit::Keep && f.segs.len() == 1 && d0.len >= total {
        // The fast path: one buffer each side; one copy of the frame, then the header.
        // SAFETY: the source holds skip+len bytes, the destination at least total.
        unsafe {
            ptr::copy_nonoverlapping(
                f.segs[0].ptr.add(f.skip as usize),
                d0.ptr.add(hdr.len()),
                f.len as usize,
            );
            ptr::copy_nonoverlapping(hdr.as_ptr(), d0.ptr, hdr.len());
        }
        return total;
    }
    // SAFETY: forwarded caller contract.
    unsafe { copy_frame_slow(f, edit, hdr, dst) }
}

#[cold]
#[inline(never)]
unsafe fn copy_frame_slow(f: &Frame<'_>, edit: TagEdit, hdr: &[u8], dst: &[Seg]) -> u32 {
    let mut w = Writer { dst, seg: 0, off: 0, written: 0 };
    // SAFETY: (whole block) the writer stays inside `dst`, the reader inside `f.segs`.
    unsafe {
        w.write(hdr.as_ptr(), hdr.len() as u32);
        match edit {
            TagEdit::Keep => copy_range(f, 0, f.len, &mut w),
            TagEdit::Pop => {
                copy_range(f, 0, 12, &mut w);
                copy_range(f, 16, f.len - 16, &mut w);
            }
            TagEdit::Retag(tci) => {
                copy_range(f, 0, 14, &mut w);
                w.write(tci.to_be_bytes().as_ptr(), 2);
                copy_range(f, 16, f.len - 16, &mut w);
            }
            TagEdit::Push(tci) => {
                let tag = [0x81, 0x00, (tci >> 8) as u8, tci as u8];
                copy_range(f, 0, 12, &mut w);
                w.write(tag.as_ptr(), 4);
                copy_range(f, 12, f.len - 12, &mut w);
            }
        }
    }
    w.written
}

struct Writer<'a> {
    dst: &'a [Seg],
    seg: usize,
    off: u32,
    written: u32,
}

impl Writer<'_> {
    /// # Safety
    /// `src` points to `n` readable bytes and the destination has room for them.
    unsafe fn write(&mut self, mut src: *const u8, mut n: u32) {
        while n > 0 {
            let Some(d) = self.dst.get(self.seg) else { return };
            let room = d.len - self.off;
            let k = room.min(n);
            // SAFETY: `off + k <= d.len`; src has n >= k bytes.
            unsafe {
                ptr::copy_nonoverlapping(src, d.ptr.add(self.off as usize), k as usize);
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
    }
}

/// Copies frame bytes `[from, from + n)` (frame offsets, after the sender's header).
unsafe fn copy_range(f: &Frame<'_>, from: u32, n: u32, w: &mut Writer<'_>) {
    let mut pos = f.skip + from; // chain offset still to skip to
    let mut left = n;
    for s in f.segs {
        if left == 0 {
            break;
        }
        if pos >= s.len {
            pos -= s.len;
            continue;
        }
        let k = (s.len - pos).min(left);
        // SAFETY: `pos + k <= s.len`.
        unsafe { w.write(s.ptr.add(pos as usize), k) };
        left -= k;
        pos = 0;
    }
}

/// Reads up to `out.len()` frame bytes from the start of the frame (header parsing).
/// Returns how many were read.
///
/// # Safety
/// As for `copy_frame`.
#[inline(always)]
pub unsafe fn read_prefix(f: &Frame<'_>, out: &mut [u8; 18]) -> usize {
    let s0 = f.segs[0];
    if f.len >= 18 && s0.len >= f.skip + 18 {
        // Fixed size: two loads, no call.
        // SAFETY: the first segment holds skip+18 bytes.
        *out = unsafe { (s0.ptr.add(f.skip as usize) as *const [u8; 18]).read_unaligned() };
        return 18;
    }
    // SAFETY: forwarded.
    unsafe { read_bytes(f, out) }
}

/// Reads up to `out.len()` frame bytes from the start of the frame, any length (policy checks
/// that look past the L2 header). Returns how many were read.
///
/// # Safety
/// As for `copy_frame`.
pub unsafe fn read_bytes(f: &Frame<'_>, out: &mut [u8]) -> usize {
    let s0 = f.segs[0];
    let want = out.len().min(f.len as usize);
    if s0.len as usize >= f.skip as usize + want {
        // SAFETY: the first segment holds skip+want bytes.
        unsafe { ptr::copy_nonoverlapping(s0.ptr.add(f.skip as usize), out.as_mut_ptr(), want) };
        return want;
    }
    let mut w_segs = [Seg { ptr: out.as_mut_ptr(), len: want as u32 }];
    let mut w = Writer { dst: &mut w_segs, seg: 0, off: 0, written: 0 };
    // SAFETY: forwarded.
    unsafe { copy_range(f, 0, want as u32, &mut w) };
    w.written as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(b: &mut [u8]) -> Seg {
        Seg { ptr: b.as_mut_ptr(), len: b.len() as u32 }
    }

    fn frame_bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| i as u8).collect()
    }

    #[test]
    fn test_fast_path_single_buffers() {
        let mut src = vec![0xee; 12];
        src.extend(frame_bytes(60));
        let mut dst = vec![0u8; 100];
        let f = Frame { segs: &[seg(&mut src)], skip: 12, len: 60 };
        let hdr = [1u8; 12];
        // SAFETY: test buffers are live and large enough.
        let n = unsafe { copy_frame(&f, TagEdit::Keep, &hdr, &[seg(&mut dst)]) };
        assert_eq!(n, 72);
        assert_eq!(&dst[..12], &hdr);
        assert_eq!(&dst[12..72], &frame_bytes(60)[..]);
    }

    #[test]
    fn test_scatter_gather_with_split_header() {
        let mut h = vec![0u8; 10];
        let mut a = frame_bytes(70);
        let (a1, a2) = a.split_at_mut(7);
        let f = Frame { segs: &[seg(&mut h), seg(a1), seg(a2)], skip: 10, len: 70 };
        let mut d1 = vec![0u8; 5];
        let mut d2 = vec![0u8; 100];
        // SAFETY: test buffers.
        let n = unsafe { copy_frame(&f, TagEdit::Keep, &[9u8; 12], &[seg(&mut d1), seg(&mut d2)]) };
        assert_eq!(n, 82);
        let mut out = d1.clone();
        out.extend(&d2[..77]);
        assert_eq!(&out[12..], &frame_bytes(70)[..]);
    }

    #[test]
    fn test_push_and_pop_tag() {
        let mut src = frame_bytes(64);
        let mut dst = vec![0u8; 100];
        let f = Frame { segs: &[seg(&mut src)], skip: 0, len: 64 };
        // SAFETY: test buffers.
        let n = unsafe { copy_frame(&f, TagEdit::Push(0x2064), &[], &[seg(&mut dst)]) };
        assert_eq!(n, 68);
        assert_eq!(&dst[..12], &frame_bytes(12)[..]);
        assert_eq!(&dst[12..16], &[0x81, 0x00, 0x20, 0x64]);
        assert_eq!(&dst[16..68], &frame_bytes(64)[12..]);
        let mut back = vec![0u8; 100];
        let f2 = Frame { segs: &[seg(&mut dst[..68])], skip: 0, len: 68 };
        // SAFETY: test buffers.
        let n = unsafe { copy_frame(&f2, TagEdit::Pop, &[], &[seg(&mut back)]) };
        assert_eq!(n, 64);
        assert_eq!(&back[..64], &frame_bytes(64)[..]);
    }

    #[test]
    fn test_retag_replaces_the_tci_in_place() {
        let mut src = frame_bytes(64);
        src[12..16].copy_from_slice(&[0x81, 0x00, 0x60, 0x00]); // priority 3, VID 0
        let mut dst = vec![0u8; 100];
        let f = Frame { segs: &[seg(&mut src)], skip: 0, len: 64 };
        // SAFETY: test buffers.
        let n = unsafe { copy_frame(&f, TagEdit::Retag(0x600a), &[], &[seg(&mut dst)]) };
        assert_eq!(n, 64);
        assert_eq!(&dst[12..16], &[0x81, 0x00, 0x60, 0x0a]);
        assert_eq!(&dst[16..64], &src[16..64]);
    }

    #[test]
    fn test_read_prefix_across_segments() {
        let mut h = vec![0u8; 12];
        let mut a = frame_bytes(5);
        let mut b = frame_bytes(40);
        let f = Frame { segs: &[seg(&mut h), seg(&mut a), seg(&mut b)], skip: 12, len: 45 };
        let mut out = [0u8; 18];
        // SAFETY: test buffers.
        assert_eq!(unsafe { read_prefix(&f, &mut out) }, 18);
        assert_eq!(&out[..5], &frame_bytes(5)[..]);
        assert_eq!(&out[5..], &frame_bytes(13)[..]);
    }
}
