//! A driver-side mock of a guest and its rings, split and packed (feature `test-utils`), for this crate's
//! tests and other crates': the switch builds its queues over it, the fuzz harnesses put guard
//! pages around it.
//!
//! Memory is one memfd seen two ways: as an [`AddressSpace`] (what a device uses) and, for
//! oracle tests, as a `vm_memory::GuestMemoryMmap` that rust-vmm's virtio-queue can read.
//! Test code: a bad argument panics.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use iommu::{AddressSpace, Dma, MemoryRegionDesc, Region};

use crate::ring::{Desc, RingAddrs, SplitRing, DESC_F_NEXT};

/// Frontend virtual address of guest-physical 0 (rings are given in these).
pub const UVA_BASE: u64 = 0x7f00_0000_0000;

/// A guest's memory: `size` bytes at guest-physical 0, with a bump allocator for rings,
/// tables and buffers.
pub struct MockGuest {
    /// The memory as a device sees it.
    pub mem: Arc<AddressSpace>,
    /// The memfd behind it (for a second view, e.g. virtio-queue's `GuestMemoryMmap`).
    pub file: File,
    host: *mut u8,
    size: u64,
    next: u64,
    /// The inaccessible page after guest memory, when `guarded` placed one.
    _guards: [Option<GuardPage>; 2],
}

/// A `PROT_NONE` page of our own, unmapped on drop.
struct GuardPage(*mut libc::c_void);

impl Drop for GuardPage {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by us (`guarded`) and nothing refers to it.
        unsafe { libc::munmap(self.0, PAGE) };
    }
}

const PAGE: usize = 4096;

/// A `size`-byte memfd mapped as guest memory at guest-physical 0.
fn map_memfd(size: u64) -> (File, Region) {
    // SAFETY: a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"mock-guest".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    let desc =
        MemoryRegionDesc { guest_phys_addr: 0, memory_size: size, userspace_addr: UVA_BASE, mmap_offset: 0 };
    let region = Region::map(desc, file.try_clone().unwrap(), iommu::Unsealed::Guard).unwrap();
    (file, region)
}

impl MockGuest {
    /// A `size`-byte guest.
    pub fn new(size: u64) -> Self {
        let (file, region) = map_memfd(size);
        let host = region.host();
        let mem = Arc::new(AddressSpace::new(vec![region]).unwrap());
        MockGuest { mem, file, host, size, next: 0x1000, _guards: [None, None] }
    }

    /// Like `new` (`size` a multiple of 4 KiB), with an inaccessible page right before and
    /// right after guest memory, so any access outside it faults (fuzzing under ASan or not).
    /// The guard pages are best effort: the bool says whether both sit right against it.
    pub fn guarded(size: u64) -> (Self, bool) {
        assert!(size > 0 && size.is_multiple_of(PAGE as u64));
        // Reserve [r, r + page + size + page), free all but the last page, and let the region's
        // mapping (size long, placed top-down) fill the hole right below that page; then put
        // an inaccessible page right below the region if that address is free.
        let total = 2 * PAGE + size as usize;
        let prot_none = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh anonymous reservation; the result is checked.
        let r = unsafe { libc::mmap(std::ptr::null_mut(), total, libc::PROT_NONE, prot_none, -1, 0) };
        assert_ne!(r, libc::MAP_FAILED);
        // SAFETY: inside the `total` bytes just reserved.
        let after = unsafe { r.cast::<u8>().add(total - PAGE) };
        // SAFETY: all but the last page of our own reservation, which nothing refers to.
        unsafe { libc::munmap(r, total - PAGE) };
        let guard_after = GuardPage(after.cast());
        let (file, region) = map_memfd(size);
        let host = region.host();
        // Address arithmetic only: the result is a hint to mmap, never dereferenced.
        let want = host.wrapping_sub(PAGE).cast::<libc::c_void>();
        let fixed = prot_none | libc::MAP_FIXED_NOREPLACE;
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the result is checked.
        let b = unsafe { libc::mmap(want, PAGE, libc::PROT_NONE, fixed, -1, 0) };
        let guard_before = (b == want).then(|| GuardPage(b));
        if b != libc::MAP_FAILED && b != want {
            // SAFETY: a page we just mapped (an old kernel ignored the hint), referred to by nothing.
            unsafe { libc::munmap(b, PAGE) };
        }
        let adjacent = host.wrapping_add(size as usize) == after && guard_before.is_some();
        let mem = Arc::new(AddressSpace::new(vec![region]).unwrap());
        let guards = [Some(guard_after), guard_before];
        (MockGuest { mem, file, host, size, next: 0x1000, _guards: guards }, adjacent)
    }

    /// A guest-physical translator over this guest's memory (domain 0, its own fault log).
    pub fn dma(&self) -> Dma {
        Dma::gpa(self.mem.clone(), 0, Default::default())
    }

    /// Bump-allocates `len` bytes aligned to `align`.
    pub fn alloc(&mut self, len: u64, align: u64) -> u64 {
        let a = self.next.div_ceil(align) * align;
        assert!(a + len <= self.size, "mock guest out of memory");
        self.next = a + len;
        a
    }

    /// Writes `data` at `gpa` (as the driver would).
    pub fn write(&self, gpa: u64, data: &[u8]) {
        assert!(gpa + data.len() as u64 <= self.size);
        // SAFETY: the range was checked to lie inside the `size` bytes mapped at `host`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.host.add(gpa as usize), data.len()) };
    }

    /// Reads `len` bytes at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa + len as u64 <= self.size);
        let mut v = vec![0u8; len];
        // SAFETY: the range was checked to lie inside the `size` bytes mapped at `host`.
        unsafe { std::ptr::copy_nonoverlapping(self.host.add(gpa as usize), v.as_mut_ptr(), len) };
        v
    }

    /// Writes a little-endian `u16` at `gpa`.
    pub fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }

    /// Reads a little-endian `u16` at `gpa`.
    pub fn read_u16(&self, gpa: u64) -> u16 {
        u16::from_le_bytes(self.read(gpa, 2).try_into().unwrap())
    }

    /// Reads a little-endian `u32` at `gpa`.
    pub fn read_u32(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.read(gpa, 4).try_into().unwrap())
    }

    /// Allocates a zeroed split ring of `size` entries.
    pub fn ring(&mut self, size: u16) -> MockRing {
        let desc = self.alloc(16 * size as u64, 16);
        let avail = self.alloc(6 + 2 * size as u64, 2);
        let used = self.alloc(6 + 8 * size as u64, 4);
        MockRing { desc, avail, used, size, free: 0, avail_idx: 0, used_seen: 0 }
    }
}

/// A split ring driven from the driver side.
pub struct MockRing {
    /// Guest-physical address of the descriptor table.
    pub desc: u64,
    /// Guest-physical address of the available ring.
    pub avail: u64,
    /// Guest-physical address of the used ring.
    pub used: u64,
    /// Number of entries.
    pub size: u16,
    /// Next descriptor slot to write (wraps; tests keep chains short).
    pub free: u16,
    /// The driver's available index as last published.
    pub avail_idx: u16,
    used_seen: u16,
}

impl MockRing {
    /// The ring's addresses as a vhost-user frontend gives them (its virtual addresses).
    pub fn addrs(&self) -> RingAddrs {
        RingAddrs { desc: UVA_BASE + self.desc, avail: UVA_BASE + self.avail, used: UVA_BASE + self.used }
    }

    /// Writes descriptor `i` of the table.
    pub fn write_desc(&self, g: &MockGuest, i: u16, d: Desc) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        b[12..14].copy_from_slice(&d.flags.to_le_bytes());
        b[14..16].copy_from_slice(&d.next.to_le_bytes());
        g.write(self.desc + 16 * i as u64, &b);
    }

    /// Writes a chain of (addr, len, flags) at consecutive slots, linking with NEXT, and
    /// publishes it. Returns the head.
    pub fn add_chain(&mut self, g: &MockGuest, bufs: &[(u64, u32, u16)]) -> u16 {
        let head = self.free;
        for (k, &(addr, len, flags)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % self.size;
            let last = k + 1 == bufs.len();
            let next = (i + 1) % self.size;
            let flags = if last { flags } else { flags | DESC_F_NEXT };
            self.write_desc(g, i, Desc { addr, len, flags, next: if last { 0 } else { next } });
        }
        self.free = (head + bufs.len() as u16) % self.size;
        self.publish(g, head);
        head
    }

    /// Puts `head` in the available ring and moves the index.
    pub fn publish(&mut self, g: &MockGuest, head: u16) {
        g.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size) as u64, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        g.write_u16(self.avail + 2, self.avail_idx);
    }

    /// New used entries since the last call.
    pub fn take_used(&mut self, g: &MockGuest) -> Vec<(u32, u32)> {
        let idx = g.read_u16(self.used + 2);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.used + 4 + 8 * (self.used_seen % self.size) as u64;
            out.push((g.read_u32(e), g.read_u32(e + 4)));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// The device side of this ring: a running [`SplitRing`] from the start of the ring,
    /// without EVENT_IDX, and the translator it was set up through.
    pub fn device(&self, g: &MockGuest) -> MockDevice {
        let mut dma = g.dma();
        let ring = SplitRing::new(&mut dma, self.addrs(), self.size as u32, 0, false).expect("mock ring");
        MockDevice { ring, dma }
    }
}

/// A device-side ring over a [`MockRing`], with what keeps its memory mapped.
pub struct MockDevice {
    /// The ring.
    pub ring: SplitRing,
    /// How the ring's buffers are reached (guest-physical; it holds the address space).
    pub dma: Dma,
}

/// A packed ring driven from the driver side (virtio 1.2, 2.8): chains written at consecutive
/// slots with the driver's wrap counter in their AVAIL/USED flags, the head's flags last; used
/// descriptors read back where the device writes them, skipping each chain's length.
pub struct MockPackedRing {
    /// Guest-physical address of the descriptor ring.
    pub desc: u64,
    /// Guest-physical address of the driver event suppression area.
    pub driver: u64,
    /// Guest-physical address of the device event suppression area.
    pub device: u64,
    /// Number of descriptors.
    pub size: u16,
    /// Next slot to fill, and the driver's wrap counter there.
    pub next: u16,
    /// The driver's wrap counter at `next`.
    pub wrap: bool,
    used_next: u16,
    used_wrap: bool,
    /// By buffer id: how many descriptors its chain took (0: not outstanding).
    taken: Vec<u16>,
    next_id: u16,
}

impl MockGuest {
    /// Allocates a zeroed packed ring of `size` descriptors.
    pub fn packed_ring(&mut self, size: u16) -> MockPackedRing {
        let desc = self.alloc(16 * size as u64, 16);
        let driver = self.alloc(4, 4);
        let device = self.alloc(4, 4);
        MockPackedRing {
            desc,
            driver,
            device,
            size,
            next: 0,
            wrap: true,
            used_next: 0,
            used_wrap: true,
            taken: vec![0; size as usize],
            next_id: 0,
        }
    }
}

impl MockPackedRing {
    /// The ring's addresses as a vhost-user frontend gives them: descriptors, driver area as
    /// "available", device area as "used".
    pub fn addrs(&self) -> RingAddrs {
        RingAddrs { desc: UVA_BASE + self.desc, avail: UVA_BASE + self.driver, used: UVA_BASE + self.device }
    }

    /// Writes the descriptor at `slot`: address, length, id and flags, the flags last.
    pub fn write_desc(&self, g: &MockGuest, slot: u16, addr: u64, len: u32, id: u16, flags: u16) {
        self.write_body(g, slot, addr, len, id);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.write_flags(g, slot, flags);
    }

    /// Writes the descriptor at `slot` but its flags.
    pub fn write_body(&self, g: &MockGuest, slot: u16, addr: u64, len: u32, id: u16) {
        let mut b = [0u8; 14];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&id.to_le_bytes());
        g.write(self.desc + 16 * slot as u64, &b);
    }

    /// Writes the flags of the descriptor at `slot`.
    pub fn write_flags(&self, g: &MockGuest, slot: u16, flags: u16) {
        g.write_u16(self.desc + 16 * slot as u64 + 14, flags);
    }

    /// The AVAIL/USED flags that make a descriptor available under wrap counter `wrap`.
    pub fn avail_flags(wrap: bool) -> u16 {
        use crate::packed::{DESC_F_AVAIL, DESC_F_USED};
        if wrap {
            DESC_F_AVAIL
        } else {
            DESC_F_USED
        }
    }

    /// Free descriptors (not in a chain the device holds).
    pub fn free(&self) -> u16 {
        self.size - self.taken.iter().sum::<u16>()
    }

    /// Makes a chain of (addr, len, flags) available at the next slots under a fresh buffer
    /// id (in the last descriptor; the others carry it too, as Linux does), the head's flags
    /// written last. Returns the id.
    pub fn add_chain(&mut self, g: &MockGuest, bufs: &[(u64, u32, u16)]) -> u16 {
        let n = bufs.len() as u16;
        assert!(n > 0 && n <= self.free(), "mock packed ring full");
        while self.taken[self.next_id as usize] != 0 {
            self.next_id = (self.next_id + 1) % self.size;
        }
        let id = self.next_id;
        self.next_id = (self.next_id + 1) % self.size;
        self.taken[id as usize] = n;
        let head = self.next;
        let mut head_flags = 0;
        for (k, &(addr, len, flags)) in bufs.iter().enumerate() {
            let more = if k + 1 < bufs.len() { crate::ring::DESC_F_NEXT } else { 0 };
            let f = flags | more | Self::avail_flags(self.wrap);
            if k == 0 {
                // Everything but the flags now; the flags once the rest of the chain is there.
                head_flags = f;
                self.write_body(g, self.next, addr, len, id);
            } else {
                self.write_desc(g, self.next, addr, len, id, f);
            }
            self.next += 1;
            if self.next == self.size {
                self.next = 0;
                self.wrap = !self.wrap;
            }
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.write_flags(g, head, head_flags);
        id
    }

    /// New used descriptors since the last call: (buffer id, length).
    pub fn take_used(&mut self, g: &MockGuest) -> Vec<(u16, u32)> {
        use crate::packed::{DESC_F_AVAIL, DESC_F_USED};
        let mut out = Vec::new();
        loop {
            let at = self.desc + 16 * self.used_next as u64;
            let f = g.read_u16(at + 14);
            if (f & DESC_F_AVAIL != 0) != self.used_wrap || (f & DESC_F_USED != 0) != self.used_wrap {
                return out;
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            let id = g.read_u16(at + 12);
            let len = g.read_u32(at + 8);
            let n = std::mem::take(&mut self.taken[id as usize]);
            assert!(n > 0, "the device used buffer id {id}, which is not outstanding");
            out.push((id, len));
            self.used_next += n;
            if self.used_next >= self.size {
                self.used_next -= self.size;
                self.used_wrap = !self.used_wrap;
            }
        }
    }

    /// Sets the driver event suppression area (what the device reads to decide to interrupt).
    pub fn set_driver_event(&self, g: &MockGuest, flags: u16, off_wrap: u16) {
        g.write_u16(self.driver, off_wrap);
        g.write_u16(self.driver + 2, flags);
    }

    /// The device event suppression flags (whether the device wants kicks).
    pub fn device_event_flags(&self, g: &MockGuest) -> u16 {
        g.read_u16(self.device + 2)
    }

    /// The device side of this ring from its start (token 0x8000: slot 0, wrap counter 1).
    pub fn device(&self, g: &MockGuest, event_idx: bool) -> MockPackedDevice {
        let mut dma = g.dma();
        let ring =
            crate::packed::PackedRing::new(&mut dma, self.addrs(), self.size as u32, 0x8000, event_idx)
                .expect("mock packed ring");
        MockPackedDevice { ring, dma }
    }
}

/// A device-side ring over a [`MockPackedRing`], with what keeps its memory mapped.
pub struct MockPackedDevice {
    /// The ring.
    pub ring: crate::packed::PackedRing,
    /// How the ring's buffers are reached.
    pub dma: Dma,
}
