//! Transmit queue: frames go from the caller into TX buffers and are handed
//! to the backend as one descriptor, a header+frame chain, or an indirect
//! table, depending on the configuration.

use std::ptr;

use super::memory::{VringLayout, DESC_SIZE, INDIRECT_ENTRIES};
use super::ring::{SplitRing, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT};
use super::{RawDesc, RawNext};

/// How a TX frame is described to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TxLayout {
    /// One descriptor covering header and frame.
    Contiguous,
    /// Two chained descriptors: header, then frame.
    SplitHeader,
    /// One `VIRTQ_DESC_F_INDIRECT` descriptor pointing at a two-entry table.
    Indirect,
}

/// Driver state of one TX queue.
///
/// Descriptors are allocated from a free stack; the chain links needed to
/// free them are kept privately (`next`, `chain_len`), never read back from
/// shared memory, so a misbehaving backend cannot corrupt our bookkeeping.
pub(crate) struct TxQueue {
    pub(crate) ring: SplitRing,
    layout: TxLayout,
    hdr_len: usize,
    buf_ptr: *mut u8,
    buf_gpa: u64,
    buf_size: usize,
    ind_ptr: *mut u8,
    ind_gpa: u64,
    free: Vec<u16>,
    is_free: Vec<bool>,
    chain_len: Vec<u16>,
    next: Vec<u16>,
    pub(crate) enqueued: u64,
    pub(crate) completed: u64,
    pub(crate) errors: u64,
}

impl TxQueue {
    /// Creates the queue over `ring` and the buffers described by `v`.
    ///
    /// # Safety
    /// `base` must be the host address of the region start and `base_gpa`
    /// its guest-physical address; the buffer and indirect areas of `v` must
    /// lie inside that live mapping, reserved for this queue, for as long as
    /// the queue lives.
    pub(crate) unsafe fn new(
        ring: SplitRing,
        v: &VringLayout,
        base: *mut u8,
        base_gpa: u64,
        layout: TxLayout,
        hdr_len: usize,
    ) -> TxQueue {
        let n = ring.size() as usize;
        TxQueue {
            ring,
            layout,
            hdr_len,
            // SAFETY: the caller guarantees both offsets are inside the mapping.
            buf_ptr: unsafe { base.add(v.bufs) },
            buf_gpa: base_gpa + v.bufs as u64,
            buf_size: v.buf_size,
            // SAFETY: as above.
            ind_ptr: unsafe { base.add(v.indirect) },
            ind_gpa: base_gpa + v.indirect as u64,
            // Pop order 0, 1, 2, ...: the backend sees ascending heads at first.
            free: (0..n as u16).rev().collect(),
            is_free: vec![true; n],
            chain_len: vec![0; n],
            next: vec![0; n],
            enqueued: 0,
            completed: 0,
            errors: 0,
        }
    }

    /// Largest frame (without virtio-net header) one TX buffer holds.
    pub(crate) fn max_frame(&self) -> usize {
        self.buf_size - self.hdr_len
    }

    /// Descriptors not owned by the backend.
    pub(crate) fn free_descs(&self) -> usize {
        self.free.len()
    }

    fn descs_per_frame(&self) -> usize {
        match self.layout {
            TxLayout::SplitHeader => 2,
            TxLayout::Contiguous | TxLayout::Indirect => 1,
        }
    }

    fn pop_free(&mut self) -> u16 {
        let d = self.free.pop().expect("free descriptor checked by caller");
        self.is_free[d as usize] = false;
        d
    }

    /// Copies `frame` behind a zeroed virtio-net header into a TX buffer and
    /// appends its chain to the available ring (unpublished). Returns false
    /// if no descriptors are free even after reclaiming completed ones.
    ///
    /// # Panics
    /// If `frame` is longer than [`max_frame`](Self::max_frame).
    pub(crate) fn enqueue(&mut self, frame: &[u8]) -> bool {
        self.enqueue_with(frame.len(), |buf| buf.copy_from_slice(frame))
    }

    /// Like [`enqueue`](Self::enqueue), but `fill` writes the `len`-byte frame
    /// in place. The buffer holds whatever the slot held before (the frame
    /// last sent from it, or zeros), so a generator may rewrite only the
    /// bytes that change. `fill` is not called when the ring is full.
    ///
    /// # Panics
    /// If `len` is larger than [`max_frame`](Self::max_frame).
    pub(crate) fn enqueue_with(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        self.enqueue_hdr_with(&[], len, fill)
    }

    /// [`enqueue_with`](Self::enqueue_with) with the virtio-net header's first bytes set to
    /// `hdr` (an offload request: `NEEDS_CSUM`, a GSO type and size); the rest are zeros.
    pub(crate) fn enqueue_hdr_with(&mut self, hdr: &[u8], len: usize, fill: impl FnOnce(&mut [u8])) -> bool {
        assert!(
            len <= self.max_frame(),
            "TX frame of {len} bytes exceeds tx_buf_size - header ({} bytes)",
            self.max_frame()
        );
        let need = self.descs_per_frame();
        if self.free.len() < need {
            self.reclaim();
            if self.free.len() < need {
                return false;
            }
        }
        let head = self.pop_free();
        let off = head as usize * self.buf_size;
        let slot_gpa = self.buf_gpa + off as u64;
        // SAFETY: buffer `head` lies inside this queue's buffer area
        // (head < size, frame fits, see the assertion) and is not owned by
        // the backend (its descriptor was free), so nobody reads it now and
        // the mutable slice is exclusive.
        unsafe {
            let slot = self.buf_ptr.add(off);
            ptr::write_bytes(slot, 0, self.hdr_len);
            ptr::copy_nonoverlapping(hdr.as_ptr(), slot, hdr.len().min(self.hdr_len));
            fill(std::slice::from_raw_parts_mut(slot.add(self.hdr_len), len));
        }
        let hdr_len = self.hdr_len as u32;
        let frame_len = len as u32;
        match self.layout {
            TxLayout::Contiguous => {
                self.ring.write_desc(head, slot_gpa, hdr_len + frame_len, 0, 0);
                self.chain_len[head as usize] = 1;
            }
            TxLayout::SplitHeader => {
                let second = self.pop_free();
                self.ring.write_desc(head, slot_gpa, hdr_len, VIRTQ_DESC_F_NEXT, second);
                self.ring.write_desc(second, slot_gpa + hdr_len as u64, frame_len, 0, 0);
                self.next[head as usize] = second;
                self.chain_len[head as usize] = 2;
            }
            TxLayout::Indirect => {
                let table_off = head as usize * INDIRECT_ENTRIES * DESC_SIZE;
                // SAFETY: table `head` lies inside this queue's indirect area
                // and is unused by the backend while the head is free.
                unsafe {
                    let t = self.ind_ptr.add(table_off);
                    write_raw_desc(t, slot_gpa, hdr_len, VIRTQ_DESC_F_NEXT, 1);
                    write_raw_desc(t.add(DESC_SIZE), slot_gpa + hdr_len as u64, frame_len, 0, 0);
                }
                self.ring.write_desc(
                    head,
                    self.ind_gpa + table_off as u64,
                    (INDIRECT_ENTRIES * DESC_SIZE) as u32,
                    VIRTQ_DESC_F_INDIRECT,
                    0,
                );
                self.chain_len[head as usize] = 1;
            }
        }
        self.ring.push_avail(head);
        self.enqueued += 1;
        true
    }

    /// Writes a caller-supplied chain into consecutive free descriptors and
    /// appends it (unpublished). Returns the head, or `None` if there is no
    /// run of `descs.len()` free descriptors (or `descs` is empty).
    pub(crate) fn push_raw(&mut self, descs: &[RawDesc]) -> Option<u16> {
        let n = self.ring.size() as usize;
        let len = descs.len();
        if len == 0 || len > n {
            return None;
        }
        self.reclaim();
        let start = (0..=n - len).find(|&s| self.is_free[s..s + len].iter().all(|&f| f))?;
        let end = start + len;
        self.free.retain(|&d| (d as usize) < start || d as usize >= end);
        for (i, d) in descs.iter().enumerate() {
            let idx = (start + i) as u16;
            self.is_free[idx as usize] = false;
            self.next[idx as usize] = idx.wrapping_add(1);
            let next = match d.next {
                RawNext::Slot(j) => (start as u16).wrapping_add(j),
                RawNext::Absolute(a) => a,
            };
            self.ring.write_desc(idx, d.addr, d.len, d.flags, next);
        }
        let head = start as u16;
        self.chain_len[start] = len as u16;
        self.ring.push_avail(head);
        self.enqueued += 1;
        Some(head)
    }

    /// Frees the descriptors of every buffer the backend has returned.
    /// Returns how many chains were completed.
    pub(crate) fn reclaim(&mut self) -> usize {
        let used = self.ring.used_idx();
        let mut pos = self.ring.last_used();
        let mut done = 0;
        while pos != used {
            let (id, _len) = self.ring.used_elem(pos);
            pos = pos.wrapping_add(1);
            let Some(&chain) = self.chain_len.get(id as usize).filter(|&&c| c > 0) else {
                self.errors += 1;
                tracing::warn!("TX used ring returned id {id} which is not an in-flight head");
                continue;
            };
            let mut d = id as u16;
            for _ in 0..chain {
                self.is_free[d as usize] = true;
                self.free.push(d);
                d = self.next[d as usize];
            }
            self.chain_len[id as usize] = 0;
            done += 1;
        }
        let n = used.wrapping_sub(self.ring.last_used());
        if n > 0 {
            self.ring.consume_used(n);
        }
        self.completed += done as u64;
        done
    }

    /// Chains returned so far, including ones not reclaimed yet.
    pub(crate) fn completed_total(&self) -> u64 {
        self.completed + u64::from(self.ring.pending_used())
    }
}

/// Writes one descriptor at `p` (an indirect table entry).
///
/// # Safety
/// `p` must be valid for a 16-byte write, 16-byte aligned, and not read by
/// the backend concurrently.
unsafe fn write_raw_desc(p: *mut u8, addr: u64, len: u32, flags: u16, next: u16) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        ptr::write_volatile(p.cast::<u64>(), addr.to_le());
        ptr::write_volatile(p.add(8).cast::<u32>(), len.to_le());
        ptr::write_volatile(p.add(12).cast::<u16>(), flags.to_le());
        ptr::write_volatile(p.add(14).cast::<u16>(), next.to_le());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FrontendConfig;
    use crate::fake_device::{Desc, TestMem};

    const HDR: usize = 12;

    fn setup(n: u16, layout: TxLayout) -> (TestMem, TxQueue) {
        let tm = TestMem::new(FrontendConfig {
            ring_size: n,
            gpa_base: 0x4000_0000,
            scratch_size: 4096,
            ..FrontendConfig::default()
        });
        let ring = tm.ring(1, false);
        // SAFETY: the layout fits in `tm.mem`, which outlives the queue.
        let tx = unsafe {
            TxQueue::new(ring, &tm.layout.vrings[1], tm.mem.host_ptr(0), tm.mem.gpa_base(), layout, HDR)
        };
        (tm, tx)
    }

    fn with_hdr(frame: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; HDR];
        v.extend_from_slice(frame);
        v
    }

    #[test]
    fn layouts_describe_header_and_frame() {
        for layout in [TxLayout::Contiguous, TxLayout::SplitHeader, TxLayout::Indirect] {
            let (tm, mut tx) = setup(8, layout);
            let mut dev = tm.device(1);
            let frame: Vec<u8> = (0..100u8).collect();
            assert!(tx.enqueue(&frame));
            assert_eq!(dev.pop_avail(), None, "{layout:?}: not published yet");
            tx.ring.publish(true);
            let head = dev.pop_avail().expect("published");
            let chain = dev.chain(head);
            let lens: Vec<u32> = chain.iter().map(|d| d.len).collect();
            match layout {
                TxLayout::Contiguous => assert_eq!(lens, [112]),
                _ => assert_eq!(lens, [12, 100], "{layout:?}"),
            }
            assert!(chain.iter().all(|d| d.flags & 2 == 0), "no WRITE flag on TX");
            if layout == TxLayout::Indirect {
                assert_eq!(dev.desc(head).flags, VIRTQ_DESC_F_INDIRECT);
                assert_eq!(dev.desc(head).len, 32);
            }
            assert_eq!(dev.read_chain(&chain), with_hdr(&frame), "{layout:?}");
        }
    }

    #[test]
    fn ring_full_then_reclaim() {
        let (tm, mut tx) = setup(8, TxLayout::SplitHeader);
        let mut dev = tm.device(1);
        for i in 0..4 {
            assert!(tx.enqueue(&[i; 60]), "frame {i}");
        }
        assert!(!tx.enqueue(&[9; 60]), "8 descriptors = 4 split frames");
        tx.ring.publish(true);
        let heads: Vec<u16> = std::iter::from_fn(|| dev.pop_avail()).collect();
        assert_eq!(heads.len(), 4);
        assert_eq!(tx.completed_total(), 0);
        // Complete out of order.
        dev.push_used(heads[2] as u32, 0);
        dev.push_used(heads[0] as u32, 0);
        dev.publish_used();
        assert_eq!(tx.completed_total(), 2, "counted before reclaim");
        assert!(tx.enqueue(&[5; 60]), "enqueue reclaims");
        assert_eq!(tx.completed, 2);
        assert_eq!(tx.free_descs(), 2);
        assert!(tx.enqueue(&[6; 60]));
        assert!(!tx.enqueue(&[7; 60]));
        tx.ring.publish(true);
        let heads: Vec<u16> = std::iter::from_fn(|| dev.pop_avail()).collect();
        assert_eq!(heads.len(), 2);
        for h in heads {
            let chain = dev.chain(h);
            assert_eq!(chain.len(), 2);
            assert_eq!(chain[1].len, 60);
        }
    }

    #[test]
    fn bogus_used_ids_are_counted_not_trusted() {
        let (tm, mut tx) = setup(8, TxLayout::SplitHeader);
        let mut dev = tm.device(1);
        assert!(tx.enqueue(&[1; 60]));
        tx.ring.publish(true);
        let head = dev.pop_avail().unwrap();
        let second = dev.desc(head).next;
        dev.push_used(999, 0); // out of range
        dev.push_used(second as u32, 0); // not a head
        dev.push_used(head as u32, 0);
        dev.push_used(head as u32, 0); // twice
        dev.publish_used();
        assert_eq!(tx.reclaim(), 1);
        assert_eq!(tx.errors, 3);
        assert_eq!(tx.free_descs(), 8);
    }

    #[test]
    fn raw_chains_use_consecutive_slots() {
        let (tm, mut tx) = setup(8, TxLayout::Contiguous);
        let mut dev = tm.device(1);
        assert!(tx.enqueue(&[1; 60])); // takes descriptor 0
        let descs = [
            RawDesc::chained(0x10, 12, 1),
            RawDesc::chained(0x20, 30, 2),
            RawDesc { addr: u64::MAX, len: 0, flags: VIRTQ_DESC_F_NEXT | 2, next: RawNext::Absolute(77) },
        ];
        let head = tx.push_raw(&descs).expect("room");
        assert_eq!(head, 1);
        tx.ring.publish(true);
        assert_eq!(dev.pop_avail(), Some(0));
        assert_eq!(dev.pop_avail(), Some(1));
        assert_eq!(dev.desc(1), Desc { addr: 0x10, len: 12, flags: 1, next: 2 });
        assert_eq!(dev.desc(2), Desc { addr: 0x20, len: 30, flags: 1, next: 3 });
        assert_eq!(dev.desc(3), Desc { addr: u64::MAX, len: 0, flags: 3, next: 77 });
        assert_eq!(tx.free_descs(), 4);
        // Too long for the remaining run 4..8.
        assert_eq!(tx.push_raw(&[RawDesc::last(0, 1); 5]), None);
        assert_eq!(tx.push_raw(&[]), None);
        dev.push_used(1, 0);
        dev.publish_used();
        assert_eq!(tx.reclaim(), 1);
        assert_eq!(tx.free_descs(), 7);
        assert_eq!(tx.push_raw(&[RawDesc::last(0, 1); 7]), Some(1));
    }

    #[test]
    #[should_panic(expected = "exceeds tx_buf_size")]
    fn oversized_frame_panics() {
        let (_tm, mut tx) = setup(8, TxLayout::Contiguous);
        let big = vec![0u8; tx.max_frame() + 1];
        tx.enqueue(&big);
    }
}
