//! Receive queue: one device-writable descriptor per RX buffer, all posted up
//! front and re-posted as soon as the frame in them has been handed out.

use std::slice;

use super::memory::VringLayout;
use super::ring::{SplitRing, VIRTQ_DESC_F_WRITE};

/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Driver state of one RX queue.
pub(crate) struct RxQueue {
    pub(crate) ring: SplitRing,
    hdr_len: usize,
    mrg_rxbuf: bool,
    buf_ptr: *mut u8,
    buf_size: usize,
    /// Whether buffer `i` is currently owned by the backend.
    posted: Vec<bool>,
    /// Heads consumed in the current batch, re-posted at its end.
    repost: Vec<u16>,
    /// Reassembly buffer for frames spanning several buffers.
    scratch: Vec<u8>,
    pub(crate) frames: u64,
    pub(crate) bytes: u64,
    /// Frames that spanned more than one buffer.
    pub(crate) merged: u64,
    pub(crate) errors: u64,
}

impl RxQueue {
    /// Creates the queue and posts every buffer (published without a kick).
    ///
    /// # Safety
    /// `base` must be the host address of the region start and `base_gpa`
    /// its guest-physical address; the buffer area of `v` must lie inside that
    /// live mapping, reserved for this queue, for as long as the queue lives.
    pub(crate) unsafe fn new(
        mut ring: SplitRing,
        v: &VringLayout,
        base: *mut u8,
        base_gpa: u64,
        hdr_len: usize,
        mrg_rxbuf: bool,
    ) -> RxQueue {
        let n = ring.size();
        let buf_gpa = base_gpa + v.bufs as u64;
        for i in 0..n {
            let gpa = buf_gpa + i as u64 * v.buf_size as u64;
            ring.write_desc(i, gpa, v.buf_size as u32, VIRTQ_DESC_F_WRITE, 0);
            ring.push_avail(i);
        }
        ring.publish(false);
        RxQueue {
            ring,
            hdr_len,
            mrg_rxbuf,
            // SAFETY: the caller guarantees the offset is inside the mapping.
            buf_ptr: unsafe { base.add(v.bufs) },
            buf_size: v.buf_size,
            posted: vec![true; n as usize],
            repost: Vec::with_capacity(n as usize),
            scratch: Vec::with_capacity(64 << 10),
            frames: 0,
            bytes: 0,
            merged: 0,
            errors: 0,
        }
    }

    /// Validates used entry `(id, len)`; returns the buffer index.
    fn check_elem(&mut self, id: u32, len: u32, min_len: usize) -> Option<usize> {
        let i = id as usize;
        if i >= self.posted.len() || !self.posted[i] {
            self.errors += 1;
            tracing::warn!("RX used ring returned id {id} which is not a posted buffer");
            return None;
        }
        self.posted[i] = false;
        self.repost.push(i as u16);
        if (len as usize) < min_len || len as usize > self.buf_size {
            self.errors += 1;
            tracing::warn!("RX used length {len} out of range for buffer {id}");
            return None;
        }
        Some(i)
    }

    /// Borrows the first `len` bytes of buffer `i`.
    ///
    /// # Safety
    /// Buffer `i` must have been returned by the backend and not re-posted
    /// yet (so the backend does not write it), `len <= buf_size`, and the
    /// slice must be dropped before the buffer is re-posted.
    unsafe fn buf(&self, i: usize, len: usize) -> &[u8] {
        // SAFETY: guaranteed by the caller; buffer i lies inside the mapping.
        unsafe { slice::from_raw_parts(self.buf_ptr.add(i * self.buf_size), len) }
    }

    /// Hands up to `budget` received frames to `f(frame, vnet_header)`,
    /// re-posts their buffers with one publish, and returns the count.
    pub(crate) fn poll<F: FnMut(&[u8], &[u8])>(&mut self, budget: usize, mut f: F) -> usize {
        let used = self.ring.used_idx();
        let start = self.ring.last_used();
        let mut pos = start;
        let mut count = 0;
        while pos != used && count < budget {
            let avail = used.wrapping_sub(pos);
            let (id, len) = self.ring.used_elem(pos);
            let Some(first) = self.check_elem(id, len, self.hdr_len) else {
                pos = pos.wrapping_add(1);
                continue;
            };
            let nbufs = if self.mrg_rxbuf {
                // SAFETY: buffer `first` was just returned (check_elem) and is
                // re-posted only at the end of this batch; the length covers
                // the header, which holds num_buffers.
                let hdr = unsafe { self.buf(first, self.hdr_len) };
                u16::from_le_bytes([hdr[NUM_BUFFERS_OFFSET], hdr[NUM_BUFFERS_OFFSET + 1]])
            } else {
                1
            };
            if nbufs == 0 || nbufs > self.ring.size() {
                self.errors += 1;
                tracing::warn!("RX num_buffers {nbufs} invalid");
                pos = pos.wrapping_add(1);
                continue;
            }
            if nbufs > avail {
                // The rest of this frame is not published yet: undo and retry later.
                self.repost.pop();
                self.posted[first] = true;
                break;
            }
            pos = pos.wrapping_add(1);
            if nbufs == 1 {
                // SAFETY: as above; `len` was validated against buf_size.
                let b = unsafe { self.buf(first, len as usize) };
                f(&b[self.hdr_len..], &b[..self.hdr_len]);
                self.bytes += (len as usize - self.hdr_len) as u64;
            } else {
                let mut scratch = std::mem::take(&mut self.scratch);
                scratch.clear();
                // SAFETY: as above.
                scratch.extend_from_slice(unsafe { self.buf(first, len as usize) });
                let mut ok = true;
                for _ in 1..nbufs {
                    let (id, len) = self.ring.used_elem(pos);
                    pos = pos.wrapping_add(1);
                    match self.check_elem(id, len, 0) {
                        // SAFETY: as above, for a continuation buffer.
                        Some(i) => scratch.extend_from_slice(unsafe { self.buf(i, len as usize) }),
                        None => ok = false,
                    }
                }
                if ok {
                    f(&scratch[self.hdr_len..], &scratch[..self.hdr_len]);
                    self.bytes += (scratch.len() - self.hdr_len) as u64;
                    self.merged += 1;
                }
                self.scratch = scratch;
                if !ok {
                    continue;
                }
            }
            count += 1;
        }
        let consumed = pos.wrapping_sub(start);
        if consumed > 0 {
            self.ring.consume_used(consumed);
        }
        self.frames += count as u64;
        self.repost_batch();
        count
    }

    /// Gives every buffer consumed in this batch back to the backend.
    fn repost_batch(&mut self) {
        if self.repost.is_empty() {
            return;
        }
        for k in 0..self.repost.len() {
            let i = self.repost[k];
            self.posted[i as usize] = true;
            // The descriptor itself is static (address, size, WRITE); only the
            // available ring entry is new.
            self.ring.push_avail(i);
        }
        self.repost.clear();
        self.ring.publish(true);
    }

    /// For hostile-input tests: points every receive descriptor at `addr` with length `len`
    /// (still device-writable). Reposted buffers keep the poisoned descriptors.
    pub(crate) fn poison(&mut self, addr: u64, len: u32) {
        for i in 0..self.ring.size() {
            self.ring.write_desc(i, addr, len, VIRTQ_DESC_F_WRITE, 0);
        }
    }

    /// Whether the device has returned buffers not consumed yet.
    pub(crate) fn has_pending(&self) -> bool {
        self.ring.pending_used() != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FrontendConfig;
    use crate::fake_device::{FakeDevice, TestMem};

    const HDR: usize = 12;

    fn setup(n: u16, buf: u32, mrg: bool) -> (TestMem, RxQueue) {
        let tm = TestMem::new(FrontendConfig {
            ring_size: n,
            rx_buf_size: buf,
            scratch_size: 4096,
            ..FrontendConfig::default()
        });
        let ring = tm.ring(0, false);
        // SAFETY: the layout fits in `tm.mem`, which outlives the queue.
        let rx = unsafe {
            RxQueue::new(ring, &tm.layout.vrings[0], tm.mem.host_ptr(0), tm.mem.gpa_base(), HDR, mrg)
        };
        (tm, rx)
    }

    /// Device writes `frame` into as many buffers as needed (num_buffers set).
    /// Returns the heads used; publishes only the first `publish` of them.
    fn deliver(dev: &mut FakeDevice<'_>, frame: &[u8], buf: usize, publish: usize) -> Vec<u16> {
        let mut data = vec![0u8; HDR];
        data.extend_from_slice(frame);
        let nbufs = data.len().div_ceil(buf) as u16;
        data[10..12].copy_from_slice(&nbufs.to_le_bytes());
        let chunks: Vec<Vec<u8>> = data.chunks(buf).map(<[u8]>::to_vec).collect();
        let mut heads = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            let h = dev.pop_avail().expect("RX buffer available");
            let d = dev.desc(h);
            assert_eq!(d.flags, VIRTQ_DESC_F_WRITE);
            assert_eq!(d.len as usize, buf);
            dev.write(d.addr, c);
            dev.push_used(h as u32, c.len() as u32);
            if i + 1 == publish {
                dev.publish_used();
            }
            heads.push(h);
        }
        heads
    }

    fn collect(rx: &mut RxQueue) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        rx.poll(usize::MAX, |f, h| {
            assert_eq!(h.len(), HDR);
            v.push(f.to_vec())
        });
        v
    }

    #[test]
    fn all_buffers_posted_up_front() {
        let (tm, _rx) = setup(8, 256, true);
        let mut dev = tm.device(0);
        let heads: Vec<u16> = std::iter::from_fn(|| dev.pop_avail()).collect();
        assert_eq!(heads, (0..8).collect::<Vec<_>>());
    }

    #[test]
    fn single_buffer_frames_and_repost() {
        let (tm, mut rx) = setup(8, 256, false);
        let mut dev = tm.device(0);
        for round in 0..5u8 {
            // 8 buffers, 5 rounds of 4 frames: only works if buffers come back.
            for i in 0..4u8 {
                deliver(&mut dev, &[round * 10 + i; 100], 256, 1);
            }
            let got = collect(&mut rx);
            assert_eq!(got.len(), 4);
            for (i, f) in got.iter().enumerate() {
                assert_eq!(f, &vec![round * 10 + i as u8; 100]);
            }
        }
        assert_eq!((rx.frames, rx.bytes, rx.errors, rx.merged), (20, 2000, 0, 0));
    }

    #[test]
    fn merged_buffers_wait_for_the_whole_frame() {
        let (tm, mut rx) = setup(8, 64, true);
        let mut dev = tm.device(0);
        let frame: Vec<u8> = (0..150u8).collect(); // 162 bytes with header: 3 buffers
        deliver(&mut dev, &frame, 64, 2); // only 2 of 3 visible
        assert!(collect(&mut rx).is_empty(), "incomplete frame must wait");
        dev.publish_used();
        assert_eq!(collect(&mut rx), vec![frame.clone()]);
        assert_eq!(rx.merged, 1);
        // The three buffers were re-posted.
        let again: Vec<u16> = std::iter::from_fn(|| dev.pop_avail()).collect();
        assert_eq!(again.len(), 5 + 3);
        assert_eq!(rx.errors, 0);
    }

    #[test]
    fn budget_limits_frames_per_poll() {
        let (tm, mut rx) = setup(8, 256, true);
        let mut dev = tm.device(0);
        for i in 0..5u8 {
            deliver(&mut dev, &[i; 64], 256, 1);
        }
        let mut n = 0;
        assert_eq!(rx.poll(2, |_, _| n += 1), 2);
        assert_eq!(rx.poll(usize::MAX, |_, _| n += 1), 3);
        assert_eq!(n, 5);
    }

    #[test]
    fn bogus_used_entries_are_counted() {
        let (tm, mut rx) = setup(8, 256, true);
        let mut dev = tm.device(0);
        let h = dev.pop_avail().unwrap();
        dev.push_used(999, 100); // unknown id
        dev.push_used(h as u32, 5); // shorter than the header
        dev.push_used(h as u32, 100); // no longer posted
        dev.publish_used();
        deliver(&mut dev, &[7; 80], 256, 1);
        let got = collect(&mut rx);
        assert_eq!(got, vec![vec![7u8; 80]]);
        assert_eq!(rx.errors, 3);
    }
}
