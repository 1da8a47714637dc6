use super::*;
use iommu::GrantWriter;

use crate::offload::csum::Sum;
use crate::offload::{self, Caps, How};

use super::super::copy::{copy_frame, copy_range, frame_sum, Frame};

/// The virtio-net header formats on both sides of a copy: the receiver's offloads and header
/// length, and the sender's header length.
#[derive(Clone, Copy)]
pub(super) struct Headers {
    pub(super) caps: Caps,
    pub(super) hdr_len: u32,
    pub(super) src_hdr: u32,
}

/// The receiver's virtio-net header, assembled in front of a segment's own headers.
type HeaderBuf = [u8; 12 + gso::MAX_HDR + 4];

/// Writes `h` as the first 10 bytes of a receiver's header (`num_buffers` follows).
fn put_vnet(h: NetHdr, hb: &mut HeaderBuf) {
    let mut b = [0u8; 10];
    h.write(&mut b);
    hb[..10].copy_from_slice(&b);
}

impl Datapath {
    /// Renders unit `u` (a packet with an offload request, or segment `u.seg - 1` of the current
    /// segmenter) for one receiver (`fmt`, `nch` buffers) into `dst`: the request passed on,
    /// the checksum completed, or the segment cut. Returns the bytes written and what was done.
    ///
    /// # Safety
    /// As for [`copy_frame`].
    #[cold]
    #[inline(never)]
    pub(super) unsafe fn render(&self, u: Unit, nch: u8, fmt: Headers, dst: &[Grant<Rw>]) -> (u32, How) {
        let p = &self.desc.pkts[u.pkt];
        let vh = self.desc.vhdrs[u.pkt];
        let f = Frame {
            segs: &self.desc.segs[u.pkt][..p.nseg as usize],
            skip: fmt.src_hdr,
            len: p.len,
            head: &self.desc.heads[u.pkt][..p.head_len as usize],
        };
        let mut hb: HeaderBuf = [0u8; 12 + gso::MAX_HDR + 4];
        hb[10..12].copy_from_slice(&(nch as u16).to_le_bytes());
        let how = if p.offload { offload::how(&vh, fmt.caps) } else { How::Plain };
        let h = fmt.hdr_len as usize;
        // Every unsafe block below: the caller's contract forwarded (valid grants; every read
        // and write is bounded by them).
        let wrote = match how {
            // SAFETY: forwarded.
            How::Plain => unsafe { copy_frame(&f, u.edit, &hb[..h], dst) },
            How::Pass => {
                put_vnet(vh.edited(u.edit), &mut hb);
                // SAFETY: forwarded.
                unsafe { copy_frame(&f, u.edit, &hb[..h], dst) }
            }
            // SAFETY: forwarded.
            How::Complete => unsafe { complete_csum(&f, vh, u.edit, &hb[..h], dst) },
            How::Segment => {
                let Some(sg) = self.seg.as_ref() else { return (0, how) };
                // SAFETY: forwarded.
                unsafe { render_segment(&f, sg, u.seg, fmt, &mut hb, dst) }
            }
        };
        (wrote, how)
    }
}

/// Copies the frame and completes the checksum its sender left to do: over the bytes
/// delivered (snapshot included), the sender's pseudo-header sum in the field counting as it
/// must.
///
/// # Safety
/// As for [`copy_frame`].
unsafe fn complete_csum(f: &Frame<'_>, vh: NetHdr, edit: TagEdit, hdr: &[u8], dst: &[Grant<Rw>]) -> u32 {
    // SAFETY: forwarded.
    let wrote = unsafe { copy_frame(f, edit, hdr, dst) };
    let start = vh.csum_start as u32;
    let mut s = Sum::new();
    // SAFETY: forwarded.
    unsafe { frame_sum(f, start, f.len - start, &mut s) };
    let mut sum = s.checksum();
    if sum == 0 && vh.csum_offset == 6 {
        sum = 0xffff; // UDP: zero means "no checksum"
    }
    let at =
        (hdr.len() as i64 + start as i64 + offload::edit_delta(edit) as i64) as u32 + vh.csum_offset as u32;
    // SAFETY: forwarded.
    unsafe { iommu::grant::write_granted(dst, at, &sum.to_be_bytes()) };
    wrote
}

/// Writes segment `seg - 1` of `sg`: the receiver's header, the segment's own headers, then its
/// payload straight from the sender (checksummed on the way if the receiver does not take
/// partial checksums).
///
/// # Safety
/// As for [`copy_frame`].
unsafe fn render_segment(
    f: &Frame<'_>,
    sg: &Segmenter,
    seg: u16,
    fmt: Headers,
    hb: &mut HeaderBuf,
    dst: &[Grant<Rw>],
) -> u32 {
    let h = fmt.hdr_len as usize;
    let k = seg.saturating_sub(1) as u32;
    let (off, plen) = sg.payload(k);
    let ps = (!fmt.caps.rx_csum).then(|| {
        let mut s = Sum::new();
        // SAFETY: forwarded.
        unsafe { frame_sum(f, off, plen, &mut s) };
        s
    });
    let hl = sg.header_len() as usize;
    let vh2 = sg.header(k, ps, &mut hb[h..h + hl]);
    put_vnet(vh2, hb);
    let mut w = GrantWriter::new(dst);
    // SAFETY: forwarded.
    unsafe {
        w.put(&hb[..h + hl]);
        copy_range(f, off, plen, &mut w);
    }
    w.written()
}
