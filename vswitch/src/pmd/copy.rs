//! The late copy: frame bytes straight from the sender's guest memory into the receiver's
//! buffers, with the VLAN tag edit applied on the way and a fresh virtio-net header in front.
//!
//! It is a grant copy ([`iommu::GrantWriter`]): the sender's chain is a list of read grants,
//! the receiver's buffers a list of write grants, both made by the queues' `Dma` when the
//! chains were walked, and the copy cannot touch a byte outside them. This module only says
//! which bytes go where (header, snapshot, tag edit).

use iommu::grant::read_granted;
use iommu::{Grant, GrantWriter, Ro, Rw};

use crate::l2::TagEdit;
use crate::offload::csum::{sum_granted, Sum};

/// Where a frame lives in the sender's memory: its chain's segments, the sender's header
/// length to skip, and the frame length; plus the snapshot of its first bytes that the
/// switch's decisions were made on.
///
/// The snapshot closes a double fetch (Xen's XSA-155 class): the sender's memory stays
/// writable by the sender while the switch works, so a guest racing the switch could change
/// its MACs, VLAN tag or source IP between the check and the copy. Bytes covered by `head` are
/// delivered from the snapshot, so what was checked is what arrives.
#[derive(Clone, Copy)]
pub struct Frame<'a> {
    /// The sender's chain.
    pub segs: &'a [Grant<Ro>],
    /// Bytes of virtio-net header at the start of the chain.
    pub skip: u32,
    /// Frame length.
    pub len: u32,
    /// The frame's first bytes as read for decisions (empty: read everything from `segs`).
    pub head: &'a [u8],
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
/// `hdr.len() + out_len`). Returns the bytes written (fewer only if `dst` was short).
///
/// # Safety
/// Every grant must still be valid: the chain walks made them and the caller holds both
/// queues' locks.
#[inline(always)]
pub unsafe fn copy_frame(f: &Frame<'_>, edit: TagEdit, hdr: &[u8], dst: &[Grant<Rw>]) -> u32 {
    let total = hdr.len() as u32 + out_len(f.len, edit);
    if let ([s0], [d0], TagEdit::Keep) = (f.segs, dst, edit) {
        if d0.len() >= total {
            // The fast path, one buffer each side: the frame past the snapshot, the snapshot,
            // then the header (the long copy first, while the small stores wait).
            let h = f.head.len().min(f.len as usize);
            let hl = hdr.len() as u32;
            // SAFETY: (whole block) forwarded; every range is checked against its grant.
            unsafe {
                if h < f.len as usize {
                    d0.copy_at(hl + h as u32, s0, f.skip + h as u32, f.len - h as u32);
                }
                d0.write_at(hl, &f.head[..h]);
                // Usually unchanged since the buffer's last use: leave its line clean.
                d0.update_at(0, hdr);
            }
            return total;
        }
    }
    // SAFETY: forwarded caller contract.
    unsafe { copy_frame_slow(f, edit, hdr, dst) }
}

/// Several buffers on a side, or a tag edit: through a writer over every grant.
#[cold]
#[inline(never)]
unsafe fn copy_frame_slow(f: &Frame<'_>, edit: TagEdit, hdr: &[u8], dst: &[Grant<Rw>]) -> u32 {
    let mut w = GrantWriter::new(dst);
    // SAFETY: (whole block) the writer stays inside its grants, the reader inside `f.segs`.
    unsafe {
        w.put(hdr);
        match edit {
            TagEdit::Keep => copy_range(f, 0, f.len, &mut w),
            TagEdit::Pop => {
                copy_range(f, 0, 12, &mut w);
                copy_range(f, 16, f.len - 16, &mut w);
            }
            TagEdit::Retag(tci) => {
                copy_range(f, 0, 14, &mut w);
                w.put(&tci.to_be_bytes());
                copy_range(f, 16, f.len - 16, &mut w);
            }
            TagEdit::Push(tci) => {
                let tag = [0x81, 0x00, (tci >> 8) as u8, tci as u8];
                copy_range(f, 0, 12, &mut w);
                w.put(&tag);
                copy_range(f, 12, f.len - 12, &mut w);
            }
        }
    }
    w.written()
}

/// The bytes [`copy_frame`] would write after a header, as pieces for vectored I/O to a device:
/// the edited snapshot (built in `head_buf`), then the rest of the frame straight from the
/// sender's segments, so the kernel's copy is the only one. Returns the pieces written into
/// `iov`; 0 if `iov` or `head_buf` is too short, or the snapshot too short for the edit (the
/// describe stage never makes one).
pub fn frame_iov(f: &Frame<'_>, edit: TagEdit, head_buf: &mut [u8], iov: &mut [libc::iovec]) -> usize {
    let (h, hl) = (f.head, f.head.len());
    let need = match edit {
        TagEdit::Keep => 1,
        TagEdit::Push(_) => 12,
        TagEdit::Pop | TagEdit::Retag(_) => 16,
    };
    if hl < need || hl + 4 > head_buf.len() || hl > f.len as usize || iov.is_empty() {
        return 0;
    }
    let n = match edit {
        TagEdit::Keep => {
            head_buf[..hl].copy_from_slice(h);
            hl
        }
        TagEdit::Pop => {
            head_buf[..12].copy_from_slice(&h[..12]);
            head_buf[12..hl - 4].copy_from_slice(&h[16..]);
            hl - 4
        }
        TagEdit::Retag(tci) => {
            head_buf[..hl].copy_from_slice(h);
            head_buf[14..16].copy_from_slice(&tci.to_be_bytes());
            hl
        }
        TagEdit::Push(tci) => {
            head_buf[..12].copy_from_slice(&h[..12]);
            head_buf[12..16].copy_from_slice(&[0x81, 0x00, (tci >> 8) as u8, tci as u8]);
            head_buf[16..hl + 4].copy_from_slice(&h[12..]);
            hl + 4
        }
    };
    iov[0] = libc::iovec { iov_base: head_buf.as_mut_ptr().cast(), iov_len: n };
    let mut k = 1;
    // The frame past the snapshot, at chain offset `skip + hl`.
    let (mut off, mut left) = (f.skip as usize + hl, f.len as usize - hl);
    for s in f.segs {
        if left == 0 {
            break;
        }
        let sl = s.len() as usize;
        if off >= sl {
            off -= sl;
            continue;
        }
        let Some(v) = iov.get_mut(k) else { return 0 };
        let take = (sl - off).min(left);
        *v = libc::iovec { iov_base: (s.as_ptr() as *mut u8).wrapping_add(off).cast(), iov_len: take };
        k += 1;
        left -= take;
        off = 0;
    }
    if left != 0 {
        return 0;
    }
    k
}

/// Adds frame bytes `[from, from + n)` to a checksum: those the snapshot covers from it (what
/// is delivered), the rest from the chain.
///
/// # Safety
/// As for `copy_frame`.
pub unsafe fn frame_sum(f: &Frame<'_>, from: u32, n: u32, sum: &mut Sum) {
    let (mut from, mut n) = (from, n);
    let h = f.head.len() as u32;
    if from < h {
        let k = (h - from).min(n);
        sum.add(&f.head[from as usize..(from + k) as usize]);
        from += k;
        n -= k;
    }
    // SAFETY: forwarded.
    unsafe { sum_granted(f.segs, f.skip + from, n, sum) };
}

/// Copies frame bytes `[from, from + n)` (frame offsets, after the sender's header): those the
/// snapshot covers from it, the rest from the chain.
///
/// # Safety
/// As for `copy_frame`.
pub unsafe fn copy_range(f: &Frame<'_>, from: u32, n: u32, w: &mut GrantWriter<'_>) {
    let (mut from, mut n) = (from, n);
    let h = f.head.len() as u32;
    if from < h {
        let k = (h - from).min(n);
        // SAFETY: the snapshot is ours; the writer checks its grants.
        unsafe { w.put(&f.head[from as usize..(from + k) as usize]) };
        from += k;
        n -= k;
    }
    // SAFETY: forwarded.
    unsafe { w.copy_from(f.segs, f.skip + from, n) };
}

/// Reads up to `N` frame bytes from the start of the frame into `out` (the snapshot decisions
/// are made on). Returns how many were read.
///
/// # Safety
/// As for `copy_frame`.
#[inline(always)]
pub unsafe fn read_prefix<const N: usize>(f: &Frame<'_>, out: &mut [u8; N]) -> usize {
    let s0 = f.segs[0];
    if f.len as usize >= N && s0.len() as usize >= f.skip as usize + N {
        // Fixed size: a few loads, no call.
        // SAFETY: the first segment holds skip+N bytes.
        *out = unsafe { (s0.as_ptr().add(f.skip as usize) as *const [u8; N]).read_unaligned() };
        return N;
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
    if (32..=64).contains(&want) && s0.len() as usize >= f.skip as usize + want {
        // A short frame's whole head: two fixed 32-byte loads that overlap, no call.
        // SAFETY: the first segment holds skip+want bytes, and 32 <= want <= out.len().
        unsafe {
            let src = s0.as_ptr().add(f.skip as usize);
            let a = (src as *const [u8; 32]).read_unaligned();
            let b = (src.add(want - 32) as *const [u8; 32]).read_unaligned();
            (out.as_mut_ptr() as *mut [u8; 32]).write_unaligned(a);
            (out.as_mut_ptr().add(want - 32) as *mut [u8; 32]).write_unaligned(b);
        }
        return want;
    }
    // SAFETY: forwarded.
    unsafe { read_granted(f.segs, f.skip, &mut out[..want]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg<D: iommu::grant::Direction>(b: &mut [u8]) -> Grant<D> {
        // SAFETY: test buffers outlive every copy through them.
        unsafe { Grant::from_raw(b.as_mut_ptr(), b.len() as u32) }
    }

    fn raw(p: *mut u8, len: u32) -> Grant<Ro> {
        // SAFETY: as for `seg`.
        unsafe { Grant::from_raw(p, len) }
    }

    fn frame_bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| i as u8).collect()
    }

    #[test]
    fn test_fast_path_single_buffers() {
        let mut src = vec![0xee; 12];
        src.extend(frame_bytes(60));
        let mut dst = vec![0u8; 100];
        let f = Frame { segs: &[seg(&mut src)], skip: 12, len: 60, head: &[] };
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
        let f = Frame { segs: &[seg(&mut h), seg(a1), seg(a2)], skip: 10, len: 70, head: &[] };
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
        let f = Frame { segs: &[seg(&mut src)], skip: 0, len: 64, head: &[] };
        // SAFETY: test buffers.
        let n = unsafe { copy_frame(&f, TagEdit::Push(0x2064), &[], &[seg(&mut dst)]) };
        assert_eq!(n, 68);
        assert_eq!(&dst[..12], &frame_bytes(12)[..]);
        assert_eq!(&dst[12..16], &[0x81, 0x00, 0x20, 0x64]);
        assert_eq!(&dst[16..68], &frame_bytes(64)[12..]);
        let mut back = vec![0u8; 100];
        let f2 = Frame { segs: &[seg(&mut dst[..68])], skip: 0, len: 68, head: &[] };
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
        let f = Frame { segs: &[seg(&mut src)], skip: 0, len: 64, head: &[] };
        // SAFETY: test buffers.
        let n = unsafe { copy_frame(&f, TagEdit::Retag(0x600a), &[], &[seg(&mut dst)]) };
        assert_eq!(n, 64);
        assert_eq!(&dst[12..16], &[0x81, 0x00, 0x60, 0x0a]);
        assert_eq!(&dst[16..64], &src[16..64]);
    }

    #[test]
    fn test_snapshot_bytes_are_what_arrives() {
        // The guest rewrote its source MAC and VLAN after the switch read them: the copy
        // delivers the bytes the switch decided on, on every path.
        let checked = frame_bytes(18);
        let mut now = frame_bytes(80);
        now[6..18].fill(0x66);
        for (edit, dst_len) in
            [(TagEdit::Keep, 92usize), (TagEdit::Retag(0x0123), 92), (TagEdit::Push(5), 96)]
        {
            for split in [false, true] {
                let mut src = now.clone();
                let mut h = vec![0u8; 12];
                let base = src.as_mut_ptr();
                let segs = if split {
                    vec![seg(&mut h), raw(base, 7), raw(base.wrapping_add(7), 73)]
                } else {
                    vec![raw(base, 80)]
                };
                let f = Frame { segs: &segs, skip: if split { 12 } else { 0 }, len: 80, head: &checked };
                let mut d = vec![0u8; dst_len];
                // SAFETY: test buffers, live for the call.
                let n = unsafe { copy_frame(&f, edit, &[0u8; 12], &[seg(&mut d)]) };
                let out = &d[12..n as usize];
                assert_eq!(&out[..12], &checked[..12], "{edit:?} split {split}: MACs from the snapshot");
                assert_eq!(
                    &out[out.len() - 60..],
                    &now[20..],
                    "{edit:?} split {split}: the rest from the guest"
                );
            }
        }
    }

    #[test]
    fn test_short_frame_head_read_in_one_go() {
        let mut src = frame_bytes(72);
        let f = Frame { segs: &[seg(&mut src)], skip: 12, len: 60, head: &[] };
        let mut out = [0u8; 64];
        // SAFETY: test buffer.
        assert_eq!(unsafe { read_bytes(&f, &mut out) }, 60);
        assert_eq!(&out[..60], &frame_bytes(72)[12..]);
    }

    #[test]
    fn test_read_prefix_across_segments() {
        let mut h = vec![0u8; 12];
        let mut a = frame_bytes(5);
        let mut b = frame_bytes(40);
        let f = Frame { segs: &[seg(&mut h), seg(&mut a), seg(&mut b)], skip: 12, len: 45, head: &[] };
        let mut out = [0u8; 18];
        // SAFETY: test buffers.
        assert_eq!(unsafe { read_prefix(&f, &mut out) }, 18);
        assert_eq!(&out[..5], &frame_bytes(5)[..]);
        assert_eq!(&out[5..], &frame_bytes(13)[..]);
    }

    #[test]
    fn test_frame_iov_gives_the_bytes_copy_frame_writes_for_every_tag_edit() {
        let mut frame = frame_bytes(200);
        frame[12..14].copy_from_slice(&[0x81, 0x00]);
        let snap: Vec<u8> = frame[..18].iter().map(|b| b ^ 0x5a).collect(); // what was checked
        for edit in [TagEdit::Keep, TagEdit::Pop, TagEdit::Push(0x2005), TagEdit::Retag(0x3007)] {
            // The sender's chain: a header and the frame cut in three pieces.
            let mut a = vec![0xee; 12];
            a.extend(&frame[..7]);
            let mut b = frame[7..90].to_vec();
            let mut c = frame[90..].to_vec();
            let segs = [seg(&mut a), seg(&mut b), seg(&mut c)];
            let f = Frame { segs: &segs, skip: 12, len: 200, head: &snap };
            let mut want = vec![0u8; 220];
            // SAFETY: test buffers are live and large enough.
            let n = unsafe { copy_frame(&f, edit, &[], &[seg(&mut want)]) } as usize;
            let mut head = [0u8; 40];
            let empty = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };
            let mut iov = [empty; 6];
            let k = frame_iov(&f, edit, &mut head, &mut iov);
            assert!(k > 0, "{edit:?}");
            let mut got = Vec::new();
            for v in &iov[..k] {
                // SAFETY: every piece points into a live test buffer.
                got.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                });
            }
            assert_eq!(got, want[..n], "{edit:?}");
        }
        // Too few pieces to hold the frame: refused, not truncated.
        let mut a = frame.clone();
        let mut b = frame.clone();
        let segs = [seg(&mut a), seg(&mut b)];
        let f = Frame { segs: &segs, skip: 150, len: 200, head: &snap };
        let mut head = [0u8; 40];
        let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; 2];
        assert_eq!(frame_iov(&f, TagEdit::Keep, &mut head, &mut iov), 0);
    }
}
