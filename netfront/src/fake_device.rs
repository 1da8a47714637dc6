//! Test-only device side of a split vring, operating directly on the shared
//! memory, so the driver-side queues can be tested without a backend.

use std::ptr;
use std::sync::atomic::{AtomicU16, Ordering};

use super::config::FrontendConfig;
use super::memory::{GuestMemory, Layout, VringLayout};
use super::ring::{RingPtrs, SplitRing, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT};

/// One descriptor as read by the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Guest memory plus layout for tests.
pub(crate) struct TestMem {
    pub mem: GuestMemory,
    pub layout: Layout,
    pub cfg: FrontendConfig,
}

impl TestMem {
    pub(crate) fn new(cfg: FrontendConfig) -> TestMem {
        let layout = Layout::new(&cfg);
        let mem = GuestMemory::new(layout.total, false, cfg.gpa_base, true).expect("guest memory");
        TestMem { mem, layout, cfg }
    }

    /// Driver ring for vring `i`.
    pub(crate) fn ring(&self, i: usize, event_idx: bool) -> SplitRing {
        let v = &self.layout.vrings[i];
        let p = RingPtrs {
            desc: self.mem.host_ptr(v.desc),
            avail: self.mem.host_ptr(v.avail),
            used: self.mem.host_ptr(v.used),
        };
        // SAFETY: the layout fits in `mem`, which outlives the test's queues.
        unsafe { SplitRing::new(p, self.cfg.ring_size, event_idx) }.expect("ring")
    }

    /// Device view of vring `i`.
    pub(crate) fn device(&self, i: usize) -> FakeDevice<'_> {
        FakeDevice {
            mem: &self.mem,
            v: self.layout.vrings[i],
            size: self.cfg.ring_size,
            last_avail: 0,
            used_idx: 0,
        }
    }
}

/// Device side of one vring.
pub(crate) struct FakeDevice<'a> {
    mem: &'a GuestMemory,
    v: VringLayout,
    size: u16,
    last_avail: u16,
    used_idx: u16,
}

impl FakeDevice<'_> {
    fn p(&self, off: usize) -> *mut u8 {
        self.mem.host_ptr(off)
    }

    /// `avail.idx` (Acquire).
    pub(crate) fn avail_idx(&self) -> u16 {
        // SAFETY: avail.idx is an aligned u16 in the mapping, stored atomically.
        unsafe { AtomicU16::from_ptr(self.p(self.v.avail + 2).cast()) }.load(Ordering::Acquire)
    }

    /// Takes the next available head, if any.
    pub(crate) fn pop_avail(&mut self) -> Option<u16> {
        if self.avail_idx() == self.last_avail {
            return None;
        }
        let slot = (self.last_avail % self.size) as usize;
        // SAFETY: slot < size: inside avail.ring.
        let head = unsafe { ptr::read_volatile(self.p(self.v.avail + 4 + 2 * slot).cast::<u16>()) };
        self.last_avail = self.last_avail.wrapping_add(1);
        Some(head)
    }

    /// Descriptor `i` of the table.
    pub(crate) fn desc(&self, i: u16) -> Desc {
        assert!(i < self.size);
        self.desc_at(self.p(self.v.desc + 16 * i as usize))
    }

    fn desc_at(&self, d: *mut u8) -> Desc {
        // SAFETY: callers pass a 16-byte aligned descriptor inside the mapping.
        unsafe {
            Desc {
                addr: ptr::read_volatile(d.cast::<u64>()),
                len: ptr::read_volatile(d.add(8).cast::<u32>()),
                flags: ptr::read_volatile(d.add(12).cast::<u16>()),
                next: ptr::read_volatile(d.add(14).cast::<u16>()),
            }
        }
    }

    fn host(&self, gpa: u64, len: usize) -> *mut u8 {
        let off = (gpa - self.mem.gpa_base()) as usize;
        assert!(off + len <= self.mem.len(), "gpa {gpa:#x}+{len} outside memory");
        self.mem.host_ptr(off)
    }

    /// The chain starting at `head`, indirect tables expanded.
    pub(crate) fn chain(&self, head: u16) -> Vec<Desc> {
        let mut out = Vec::new();
        let d = self.desc(head);
        if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
            let p = self.host(d.addr, d.len as usize);
            let mut i = 0u16;
            loop {
                // SAFETY: index bounded by the table length.
                let e = self.desc_at(unsafe { p.add(16 * i as usize) });
                out.push(e);
                if e.flags & VIRTQ_DESC_F_NEXT == 0 {
                    return out;
                }
                i = e.next;
                assert!((i as usize) < d.len as usize / 16);
            }
        }
        let mut d = d;
        loop {
            out.push(d);
            if d.flags & VIRTQ_DESC_F_NEXT == 0 || out.len() > self.size as usize {
                return out;
            }
            d = self.desc(d.next);
        }
    }

    /// Bytes described by `chain`, concatenated.
    pub(crate) fn read_chain(&self, chain: &[Desc]) -> Vec<u8> {
        let mut v = Vec::new();
        for d in chain {
            let p = self.host(d.addr, d.len as usize);
            // SAFETY: `host` checked the range; the driver does not write it now.
            v.extend_from_slice(unsafe { std::slice::from_raw_parts(p, d.len as usize) });
        }
        v
    }

    /// Writes `data` at guest-physical `gpa`.
    pub(crate) fn write(&self, gpa: u64, data: &[u8]) {
        let p = self.host(gpa, data.len());
        // SAFETY: `host` checked the range; the buffer is device-owned.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    /// Writes a used element (not yet visible: see `publish_used`).
    pub(crate) fn push_used(&mut self, id: u32, len: u32) {
        let slot = (self.used_idx % self.size) as usize;
        let e = self.p(self.v.used + 4 + 8 * slot);
        // SAFETY: slot < size: inside used.ring.
        unsafe {
            ptr::write_volatile(e.cast::<u32>(), id);
            ptr::write_volatile(e.add(4).cast::<u32>(), len);
        }
        self.used_idx = self.used_idx.wrapping_add(1);
    }

    /// Makes pushed used elements visible (Release store of `used.idx`).
    pub(crate) fn publish_used(&self) {
        // SAFETY: used.idx is an aligned u16 in the mapping.
        unsafe { AtomicU16::from_ptr(self.p(self.v.used + 2).cast()) }
            .store(self.used_idx, Ordering::Release);
    }
}
