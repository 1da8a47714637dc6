//! A split virtqueue seen from the device side, over host pointers validated once.
//!
//! Layout (virtio 1.x, 2.7): descriptor table (16 B × size, align 16), available ring
//! (flags, idx, `ring[size]`, used_event; align 2), used ring (flags, idx, `ring[size]` of
//! `{id: u32, len: u32}`, avail_event; align 4). Every field the guest writes is read with a
//! volatile load into a local and checked there; nothing here holds a reference into guest
//! memory.

use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use iommu::{Access, Dma, DmaError};

use crate::state::RingState;

use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
};

/// `VRING_DESC_F_NEXT`: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// `VRING_DESC_F_WRITE`: the device writes this buffer.
pub const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// `VRING_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
/// `VRING_USED_F_NO_NOTIFY`: the device asks the driver not to kick.
pub const USED_F_NO_NOTIFY: u16 = VRING_USED_F_NO_NOTIFY as u16;
/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver asks the device not to interrupt.
pub const AVAIL_F_NO_INTERRUPT: u16 = VRING_AVAIL_F_NO_INTERRUPT as u16;
/// Largest split ring the spec allows (virtio 1.x, 2.7; not in `virtio-bindings`).
pub const MAX_RING_SIZE: u16 = 32768;

/// One descriptor as the guest laid it out.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `DESC_F_*`.
    pub flags: u16,
    /// Next descriptor when `DESC_F_NEXT`.
    pub next: u16,
}

/// Where a ring's three parts live, as the frontend gave them (its own virtual addresses for
/// vhost-user without an IOMMU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
}

/// Why a ring could not be set up or had to be stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// ring size {0} is not a power of two between 1 and 32768
    #[error("ring size {0} is not a power of two between 1 and 32768")]
    BadSize(u32),
    /// a ring part is not inside the guest's memory
    #[error("the {0} ring is not inside one region of the guest's memory")]
    NotMapped(&'static str),
    /// a ring part is misaligned
    #[error("the {0} ring is misaligned")]
    Misaligned(&'static str),
    /// an IOVA of the ring has no IOTLB entry yet
    #[error("the {what} ring's IOVA {iova:#x} is not in the IOTLB yet")]
    Miss {
        /// Which part.
        what: &'static str,
        /// The address to ask the frontend for.
        iova: u64,
        /// Whether the device writes there.
        write: bool,
    },
    /// a ring position outside the ring
    #[error("ring position {0:#x} is outside the ring (slot beyond its size)")]
    BadBase(u16),
    /// the driver published more entries than the ring holds
    #[error("the driver's available index ran {0} entries ahead of the device, more than the ring size")]
    AvailOverrun(u16),
}

/// Device-side view of one split ring. Hot fields only; one cache line.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct SplitRing {
    desc: NonNull<Desc>,
    avail: NonNull<u16>,
    used: NonNull<u16>,
    size: u16,
    mask: u16,
    last_avail: u16,
    /// The driver's avail idx as last read; entries up to it need no new load.
    avail_idx: u16,
    /// Next used slot (private until published).
    used_idx: u16,
    /// Used idx as last published to the driver.
    published: u16,
    /// Used idx when the driver was last notified (or told not to be).
    signalled: u16,
    event_idx: bool,
    /// Whether we currently ask the driver not to kick.
    kicks_off: bool,
    /// Whether the ring's suppression state was written since the ring started.
    kicks_written: bool,
}

const _: () = assert!(std::mem::size_of::<SplitRing>() <= 64);

// SAFETY: the pointers refer to guest memory that the ring's owner keeps mapped (it holds the
// `Dma`, and so the address space, the ring was translated through: the switch's `VirtQueue`, or
// an accelerator's queue); a ring is used by one thread at a time (its owner's lock).
unsafe impl Send for SplitRing {}

impl SplitRing {
    /// Translates and checks a ring's addresses in `mem` and resumes it at `state.last_avail`.
    /// The used index is taken from the used ring, which the guest cannot have moved.
    pub fn new(
        dma: &mut Dma,
        addrs: RingAddrs,
        size: u32,
        last_avail: u16,
        event_idx: bool,
    ) -> Result<Self, RingError> {
        if size == 0 || size > MAX_RING_SIZE as u32 || !size.is_power_of_two() {
            return Err(RingError::BadSize(size));
        }
        let n = size as u64;
        let desc = map_part(dma, addrs.desc, 16 * n, 16, Access::Read, "descriptor")?;
        let avail = map_part(dma, addrs.avail, 6 + 2 * n, 2, Access::Read, "available")?;
        let used = map_part(dma, addrs.used, 6 + 8 * n, 4, Access::Write, "used")?;
        let mut ring = SplitRing {
            desc: desc.cast(),
            avail: avail.cast(),
            used: used.cast(),
            size: size as u16,
            mask: (size - 1) as u16,
            last_avail,
            avail_idx: last_avail,
            used_idx: 0,
            published: 0,
            signalled: 0,
            event_idx,
            kicks_off: false,
            kicks_written: false,
        };
        let used_idx = ring.used_idx_atomic().load(Ordering::Acquire);
        ring.used_idx = used_idx;
        ring.published = used_idx;
        ring.signalled = used_idx;
        Ok(ring)
    }

    /// Ring size.
    #[inline(always)]
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Where the used ring lies in host memory and how many bytes it spans (flags, index,
    /// entries and avail_event): what the device writes, for a dirty log.
    pub fn used_area(&self) -> (*const u8, u64) {
        (self.used.as_ptr() as *const u8, 6 + 8 * self.size as u64)
    }

    /// The state to hand over when the ring changes owner.
    pub fn state(&self) -> RingState {
        RingState { last_avail: self.last_avail, used_idx: self.used_idx }
    }

    #[inline(always)]
    fn avail_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: avail+2 is inside the checked avail ring and 2-aligned; the memory stays mapped
        // while self lives. Shared memory is accessed only atomically or volatilely.
        unsafe { AtomicU16::from_ptr(self.avail.as_ptr().add(1)) }
    }

    #[inline(always)]
    fn used_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: as for avail_idx_atomic, on the used ring.
        unsafe { AtomicU16::from_ptr(self.used.as_ptr().add(1)) }
    }

    /// Number of entries the driver has made available and we have not taken. Loads the
    /// driver's index (one Acquire) only when the cached entries are used up.
    #[inline(always)]
    pub fn avail_pending(&mut self) -> Result<u16, RingError> {
        let cached = self.avail_idx.wrapping_sub(self.last_avail);
        if cached != 0 {
            return Ok(cached);
        }
        let idx = self.avail_idx_atomic().load(Ordering::Acquire);
        let n = idx.wrapping_sub(self.last_avail);
        if n > self.size {
            // A driver that claims more than a ring's worth is broken or hostile; the caller
            // stops the queue rather than guessing which entries are real.
            return Err(RingError::AvailOverrun(n));
        }
        self.avail_idx = idx;
        Ok(n)
    }

    /// Like `avail_pending`, but always loads the driver's index (the cached count may be
    /// behind).
    #[inline]
    pub fn avail_pending_fresh(&mut self) -> Result<u16, RingError> {
        self.avail_idx = self.last_avail;
        self.avail_pending()
    }

    /// Takes the next available head. Call only after `avail_pending` said there is one.
    /// The head is not checked here: `walk_chain` refuses heads outside the table.
    #[inline(always)]
    pub fn pop_head(&mut self) -> u16 {
        let slot = (self.last_avail & self.mask) as usize;
        self.last_avail = self.last_avail.wrapping_add(1);
        // SAFETY: slot < size, so avail+2+slot is inside the checked avail ring.
        unsafe { self.avail.as_ptr().add(2 + slot).read_volatile() }
    }

    /// The head `k` entries past the next one, without taking it; `k` must be below what
    /// `avail_pending` returned. Used only to prefetch.
    #[inline(always)]
    pub fn peek_head(&self, k: u16) -> u16 {
        let slot = (self.last_avail.wrapping_add(k) & self.mask) as usize;
        // SAFETY: slot < size, inside the checked avail ring.
        unsafe { self.avail.as_ptr().add(2 + slot).read_volatile() }
    }

    /// Starts loading descriptor `i`'s cache line (any `i`; out-of-range ones are ignored).
    #[inline(always)]
    pub fn prefetch_desc(&self, i: u16) {
        #[cfg(target_arch = "x86_64")]
        if i < self.size {
            // SAFETY: prefetch never faults; i < size keeps the address inside the table.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(
                    self.desc.as_ptr().add(i as usize) as *const i8,
                )
            };
        }
    }

    /// Where the next delivery into this ring will look first, for a prefetch before its
    /// lock is taken: the available entry of the next head and the used entry after the last.
    #[inline(always)]
    pub fn next_lines(&self) -> [usize; 2] {
        let a = self.avail.as_ptr() as usize + 4 + 2 * (self.last_avail & self.mask) as usize;
        let u = self.used.as_ptr() as usize + 4 + 8 * (self.used_idx & self.mask) as usize;
        [a, u]
    }

    /// Gives back the last `n` heads taken (a destination with too few buffers for a packet).
    #[inline]
    pub fn unpop(&mut self, n: u16) {
        self.last_avail = self.last_avail.wrapping_sub(n);
    }

    /// Copy of descriptor `i` from the table; `i` must be < size.
    #[inline(always)]
    pub fn desc(&self, i: u16) -> Desc {
        debug_assert!(i < self.size);
        // SAFETY: callers check i < size; the table is 16-aligned and inside guest memory.
        // One volatile read: the guest may rewrite the entry, so it is read once, then checked.
        unsafe { self.desc.as_ptr().add(i as usize).read_volatile() }
    }

    /// Queues a used entry (not yet visible to the driver).
    #[inline(always)]
    pub fn push_used(&mut self, id: u16, len: u32) {
        let slot = (self.used_idx & self.mask) as usize;
        // SAFETY: slot < size; the entry (8 bytes at used+4+8*slot) is inside the checked used
        // ring, 4-aligned.
        unsafe {
            let e = (self.used.as_ptr() as *mut u8).add(4 + 8 * slot) as *mut u32;
            e.write_volatile(id as u32);
            e.add(1).write_volatile(len);
        }
        self.used_idx = self.used_idx.wrapping_add(1);
    }

    /// Makes queued used entries visible with one Release store of the index.
    #[inline(always)]
    pub fn publish_used(&mut self) {
        self.publish_used_but(0);
    }

    /// Publishes all queued used entries but the last `held`.
    #[inline(always)]
    pub fn publish_used_but(&mut self, held: u16) {
        let to = self.used_idx.wrapping_sub(held);
        if to != self.published {
            self.used_idx_atomic().store(to, Ordering::Release);
            self.published = to;
        }
    }

    /// After `publish_used`: whether the driver wants an interrupt for what was published since
    /// the last notification (EVENT_IDX's used_event, or the NO_INTERRUPT flag).
    #[inline]
    pub fn needs_interrupt(&mut self) -> bool {
        let new = self.published;
        let old = self.signalled;
        if new == old {
            return false;
        }
        // Order our used-idx store before reading the driver's suppression state, or both
        // sides may decide the other will act (a lost interrupt).
        fence(Ordering::SeqCst);
        self.signalled = new;
        if self.event_idx {
            // SAFETY: used_event sits at avail+4+2*size, inside the checked avail ring.
            let used_event = unsafe { self.avail.as_ptr().add(2 + self.size as usize).read_volatile() };
            new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: avail flags at avail+0.
            let flags = unsafe { self.avail.as_ptr().read_volatile() };
            flags & AVAIL_F_NO_INTERRUPT == 0
        }
    }

    /// Tells the driver whether to kick us when it adds buffers. Turning kicks on returns
    /// whether buffers arrived meanwhile (so the caller polls instead of sleeping).
    pub fn set_kicks(&mut self, on: bool) -> bool {
        if on != self.kicks_off && self.kicks_written {
            return on && self.has_new_avail();
        }
        self.kicks_off = !on;
        self.kicks_written = true;
        if self.event_idx {
            if on {
                // SAFETY: avail_event sits at used+4+8*size, inside the checked used ring.
                unsafe {
                    let p = (self.used.as_ptr() as *mut u8).add(4 + 8 * self.size as usize) as *mut u16;
                    p.write_volatile(self.last_avail);
                }
            }
            // While polling, avail_event is simply left behind: the driver kicks only when it
            // crosses it, which a busy ring does not.
        } else {
            // SAFETY: used flags at used+0.
            unsafe { self.used.as_ptr().write_volatile(if on { 0 } else { USED_F_NO_NOTIFY }) };
        }
        on && self.has_new_avail()
    }

    fn has_new_avail(&mut self) -> bool {
        fence(Ordering::SeqCst);
        self.avail_idx_atomic().load(Ordering::Acquire) != self.last_avail
    }
}

pub(crate) fn map_part(
    dma: &mut Dma,
    addr: u64,
    len: u64,
    align: u64,
    access: Access,
    what: &'static str,
) -> Result<NonNull<u8>, RingError> {
    if !addr.is_multiple_of(align) {
        return Err(RingError::Misaligned(what));
    }
    let p = dma.translate_ring(addr, len, access).map_err(|e| match e {
        DmaError::Miss { iova, access } => RingError::Miss { what, iova, write: access == Access::Write },
        DmaError::Fault(_) => RingError::NotMapped(what),
    })?;
    if !(p.as_ptr() as u64).is_multiple_of(align) {
        return Err(RingError::Misaligned(what));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prefetch hint after two of three chains were taken and used: the third's available
    /// entry and the third used entry, in the ring as mapped.
    #[test]
    fn test_next_lines_name_the_next_available_and_used_entries() {
        let mut g = crate::mock::MockGuest::new(1 << 20);
        let mut r = g.ring(8);
        for k in 0..3 {
            r.add_chain(&g, &[(0x8000 + 0x100 * k, 64, DESC_F_WRITE)]);
        }
        let mut q = r.device(&g);
        let base = q.dma.mem().regions()[0].host() as usize;
        assert_eq!(q.ring.avail_pending().unwrap(), 3);
        for _ in 0..2 {
            let h = q.ring.pop_head();
            q.ring.push_used(h, 10);
        }
        q.ring.publish_used();
        let want = [base + r.avail as usize + 4 + 2 * 2, base + r.used as usize + 4 + 8 * 2];
        assert_eq!(q.ring.next_lines(), want);
    }

    #[test]
    fn test_flags_are_the_spec_numbers() {
        assert_eq!((DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT), (1, 2, 4));
        assert_eq!((USED_F_NO_NOTIFY, AVAIL_F_NO_INTERRUPT), (1, 1));
    }
}
