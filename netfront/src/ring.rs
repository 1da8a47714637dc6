//! Driver side of one virtio split virtqueue living in shared memory.
//!
//! The backend reads the descriptor table and the available ring and writes
//! the used ring concurrently, so every access goes through raw pointers with
//! volatile reads/writes; the two indices that synchronise the sides use
//! atomics: `avail.idx` is stored with Release after the entries it publishes,
//! `used.idx` is loaded with Acquire before the entries it covers are read.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::error::{Error, Result};
use super::memory::{DESC_SIZE, USED_ELEM_SIZE};

// Descriptor and ring flags under their spec names: virtq's, the workspace's one copy.
pub use virtq::ring::{
    AVAIL_F_NO_INTERRUPT as VRING_AVAIL_F_NO_INTERRUPT, DESC_F_INDIRECT as VIRTQ_DESC_F_INDIRECT,
    DESC_F_NEXT as VIRTQ_DESC_F_NEXT, DESC_F_WRITE as VIRTQ_DESC_F_WRITE,
    USED_F_NO_NOTIFY as VRING_USED_F_NO_NOTIFY,
};

/// `vring_need_event` from the virtio spec: whether moving an index from
/// `old` to `new` crosses the `event` index the other side asked for.
#[inline]
pub(crate) fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Host pointers to the three parts of a vring.
#[derive(Clone, Copy)]
pub(crate) struct RingPtrs {
    pub desc: *mut u8,
    pub avail: *mut u8,
    pub used: *mut u8,
}

/// One split virtqueue: shared-memory pointers, driver-private indices and
/// the kick/call eventfds.
pub(crate) struct SplitRing {
    size: u16,
    p: RingPtrs,
    event_idx: bool,
    /// Next free slot in the available ring (entries written, maybe unpublished).
    next_avail: u16,
    /// Last value stored into `avail.idx`.
    published: u16,
    /// Next used-ring entry to consume.
    last_used: u16,
    /// Whether used-buffer notifications are currently requested.
    interrupts: bool,
    kick: EventFd,
    call: EventFd,
    kicks: u64,
    calls: u64,
}

impl SplitRing {
    /// Sets up a ring over zeroed memory, with notifications from the device
    /// suppressed.
    ///
    /// # Safety
    /// `p` must point into a live shared mapping, aligned (desc 16, avail 2,
    /// used 4) and large enough for a split ring of `size` entries including
    /// `used_event`/`avail_event`, and stay valid for the lifetime of the ring.
    /// Nobody but this ring and the device may access that memory.
    pub(crate) unsafe fn new(p: RingPtrs, size: u16, event_idx: bool) -> Result<SplitRing> {
        debug_assert!(size.is_power_of_two());
        let kick = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?;
        let mut ring = SplitRing {
            size,
            p,
            event_idx,
            next_avail: 0,
            published: 0,
            last_used: 0,
            interrupts: true,
            kick,
            call,
            kicks: 0,
            calls: 0,
        };
        ring.set_interrupts(false);
        Ok(ring)
    }

    /// Number of entries.
    pub(crate) fn size(&self) -> u16 {
        self.size
    }

    /// Eventfd the driver writes to notify the device.
    pub(crate) fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// Eventfd the device writes to notify the driver.
    pub(crate) fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Notifications sent to the device so far.
    pub(crate) fn kicks(&self) -> u64 {
        self.kicks
    }

    /// Writes descriptor `idx`.
    pub(crate) fn write_desc(&mut self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(idx < self.size, "descriptor index {idx} out of range");
        // SAFETY: idx < size, so the 16-byte entry lies inside the descriptor
        // table (see `new`); the table is 16-byte aligned, so every field is
        // naturally aligned. The device only reads descriptors that are
        // published, and callers only write unpublished ones.
        unsafe {
            let d = self.p.desc.add(idx as usize * DESC_SIZE);
            ptr::write_volatile(d.cast::<u64>(), addr.to_le());
            ptr::write_volatile(d.add(8).cast::<u32>(), len.to_le());
            ptr::write_volatile(d.add(12).cast::<u16>(), flags.to_le());
            ptr::write_volatile(d.add(14).cast::<u16>(), next.to_le());
        }
    }

    /// Appends `head` to the available ring without publishing it.
    pub(crate) fn push_avail(&mut self, head: u16) {
        let slot = (self.next_avail & (self.size - 1)) as usize;
        // SAFETY: slot < size, so the u16 lies inside avail.ring; the slot is
        // not yet covered by avail.idx, so the device does not read it.
        unsafe {
            ptr::write_volatile(self.p.avail.add(4 + 2 * slot).cast::<u16>(), head.to_le());
        }
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Entries pushed but not yet published.
    #[cfg(test)]
    pub(crate) fn unpublished(&self) -> u16 {
        self.next_avail.wrapping_sub(self.published)
    }

    fn avail_idx(&self) -> &AtomicU16 {
        // SAFETY: avail.idx is a 2-byte aligned u16 inside the live mapping;
        // the driver only ever stores it atomically, the device only loads it.
        unsafe { AtomicU16::from_ptr(self.p.avail.add(2).cast::<u16>()) }
    }

    fn used_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: used.idx is a 2-byte aligned u16 inside the live mapping,
        // written by the device and only loaded (atomically) by us.
        unsafe { AtomicU16::from_ptr(self.p.used.add(2).cast::<u16>()) }
    }

    /// Publishes pushed entries with one Release store of `avail.idx` and,
    /// if `notify`, kicks the device when it asked to be notified (no
    /// `VRING_USED_F_NO_NOTIFY`, or `avail_event` crossed with EVENT_IDX).
    /// Returns whether a kick was sent.
    pub(crate) fn publish(&mut self, notify: bool) -> bool {
        let old = self.published;
        let new = self.next_avail;
        if old == new {
            return false;
        }
        self.avail_idx().store(new.to_le(), Ordering::Release);
        self.published = new;
        if !notify {
            return false;
        }
        // The store above must be visible before we read the device's
        // suppression state (store -> load ordering needs a full fence).
        fence(Ordering::SeqCst);
        let need = if self.event_idx {
            need_event(self.avail_event(), new, old)
        } else {
            self.used_flags() & VRING_USED_F_NO_NOTIFY == 0
        };
        if need {
            self.kick();
        }
        need
    }

    /// Stores `avail.idx` verbatim, without kicking (hostile tests: an index past the ring).
    pub(crate) fn store_avail_idx_raw(&mut self, idx: u16) {
        self.avail_idx().store(idx.to_le(), Ordering::Release);
    }

    /// Notifies the device unconditionally.
    pub(crate) fn kick(&mut self) {
        if let Err(e) = self.kick.write(1) {
            tracing::warn!("vring kick failed: {e}");
        }
        self.kicks += 1;
    }

    /// `used.idx` (Acquire: used entries below it are visible afterwards).
    pub(crate) fn used_idx(&self) -> u16 {
        u16::from_le(self.used_idx_atomic().load(Ordering::Acquire))
    }

    /// Next used entry to consume.
    pub(crate) fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Used entries published by the device and not consumed yet.
    pub(crate) fn pending_used(&self) -> u16 {
        self.used_idx().wrapping_sub(self.last_used)
    }

    /// Reads used entry number `pos` (free-running index) as `(id, len)`.
    /// Only valid for `pos` below a previously loaded `used_idx()`.
    pub(crate) fn used_elem(&self, pos: u16) -> (u32, u32) {
        let slot = (pos & (self.size - 1)) as usize;
        // SAFETY: slot < size, so the 8-byte element lies in used.ring, which
        // is 4-byte aligned; the Acquire load of used.idx made it visible.
        unsafe {
            let e = self.p.used.add(4 + USED_ELEM_SIZE * slot);
            (
                u32::from_le(ptr::read_volatile(e.cast::<u32>())),
                u32::from_le(ptr::read_volatile(e.add(4).cast::<u32>())),
            )
        }
    }

    /// Marks `n` used entries consumed.
    pub(crate) fn consume_used(&mut self, n: u16) {
        self.last_used = self.last_used.wrapping_add(n);
        if !self.interrupts && self.event_idx {
            // Keep used_event far ahead so the device never crosses it.
            self.write_used_event(self.last_used.wrapping_add(0x8000));
        }
    }

    fn used_flags(&self) -> u16 {
        // SAFETY: used.flags is an aligned u16 at the start of the used ring.
        u16::from_le(unsafe { ptr::read_volatile(self.p.used.cast::<u16>()) })
    }

    fn avail_event(&self) -> u16 {
        let off = 4 + USED_ELEM_SIZE * self.size as usize;
        // SAFETY: avail_event follows used.ring[size], inside the used area
        // reserved by the layout; 2-byte aligned.
        u16::from_le(unsafe { ptr::read_volatile(self.p.used.add(off).cast::<u16>()) })
    }

    fn write_used_event(&mut self, v: u16) {
        let off = 4 + 2 * self.size as usize;
        // SAFETY: used_event follows avail.ring[size], inside the avail area
        // reserved by the layout; 2-byte aligned; written only by the driver.
        unsafe { ptr::write_volatile(self.p.avail.add(off).cast::<u16>(), v.to_le()) }
    }

    fn write_avail_flags(&mut self, v: u16) {
        // SAFETY: avail.flags is an aligned u16 at the start of the avail ring,
        // written only by the driver.
        unsafe { ptr::write_volatile(self.p.avail.cast::<u16>(), v.to_le()) }
    }

    /// Requests (`true`) or suppresses (`false`) used-buffer notifications.
    ///
    /// After enabling, the caller must re-check `pending_used()` before
    /// sleeping: a buffer used before the device saw the request raises no
    /// notification. Enabling includes the required full fence.
    pub(crate) fn set_interrupts(&mut self, on: bool) {
        self.interrupts = on;
        if self.event_idx {
            // The spec requires avail.flags == 0 with EVENT_IDX.
            let ev = if on { self.last_used } else { self.last_used.wrapping_add(0x8000) };
            self.write_used_event(ev);
        } else {
            self.write_avail_flags(if on { 0 } else { VRING_AVAIL_F_NO_INTERRUPT });
        }
        if on {
            fence(Ordering::SeqCst);
        }
    }

    /// Notifications received from the device through `wait_call`.
    pub(crate) fn calls(&self) -> u64 {
        self.calls
    }

    /// Waits up to `timeout` for the device to signal the call eventfd, then
    /// drains it. Returns whether a notification arrived.
    pub(crate) fn wait_call(&mut self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfd` is a valid pollfd array of length 1 for the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
        }
        let got = r > 0 && self.drain_call();
        self.calls += u64::from(got);
        Ok(got)
    }

    /// Resets the call eventfd counter; returns whether it was non-zero.
    pub(crate) fn drain_call(&self) -> bool {
        self.call.read().is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemory;

    #[test]
    fn need_event_matches_spec() {
        // Device asked for a kick when idx passes 5.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(5, 12, 7));
        // Wrap-around.
        assert!(need_event(0xffff, 2, 0xfffe));
        assert!(!need_event(0xffff, 0xffff, 0xfffe));
    }

    /// Plays the device by poking the used ring directly.
    #[test]
    fn publish_and_consume() {
        let mem = GuestMemory::new(1 << 16, false, 0, true).unwrap();
        let n = 4u16;
        let p = RingPtrs { desc: mem.host_ptr(0), avail: mem.host_ptr(4096), used: mem.host_ptr(8192) };
        // SAFETY: the three areas are inside the fresh mapping, aligned and
        // large enough for 4 entries; nothing else accesses them.
        let mut r = unsafe { SplitRing::new(p, n, false) }.unwrap();
        // SAFETY: reading the avail flags the ring just wrote.
        let flags = unsafe { ptr::read(p.avail.cast::<u16>()) };
        assert_eq!(flags, VRING_AVAIL_F_NO_INTERRUPT);

        r.write_desc(1, 0x1234, 100, VIRTQ_DESC_F_WRITE, 0);
        r.push_avail(1);
        assert_eq!(r.unpublished(), 1);
        assert!(r.publish(true), "device did not set NO_NOTIFY: must kick");
        assert_eq!(r.kicks(), 1);
        // SAFETY: avail.idx and avail.ring[0] are inside the mapping.
        unsafe {
            assert_eq!(ptr::read(p.avail.add(2).cast::<u16>()), 1);
            assert_eq!(ptr::read(p.avail.add(4).cast::<u16>()), 1);
            assert_eq!(ptr::read(p.desc.add(16).cast::<u64>()), 0x1234);
        }

        // Device: NO_NOTIFY, then use descriptor 1 with 60 bytes.
        // SAFETY: used.flags, used.ring[0] and used.idx are inside the mapping.
        unsafe {
            ptr::write(p.used.cast::<u16>(), VRING_USED_F_NO_NOTIFY);
            ptr::write(p.used.add(4).cast::<u32>(), 1);
            ptr::write(p.used.add(8).cast::<u32>(), 60);
            ptr::write(p.used.add(2).cast::<u16>(), 1);
        }
        r.push_avail(2);
        assert!(!r.publish(true), "NO_NOTIFY set: no kick");
        assert_eq!(r.pending_used(), 1);
        assert_eq!(r.used_elem(r.last_used()), (1, 60));
        r.consume_used(1);
        assert_eq!(r.pending_used(), 0);
        assert!(!r.wait_call(Duration::from_millis(1)).unwrap());
        r.call_fd().write(1).unwrap();
        assert!(r.wait_call(Duration::from_millis(100)).unwrap());
        assert!(!r.drain_call());
    }

    #[test]
    fn event_idx_suppression() {
        let mem = GuestMemory::new(1 << 16, false, 0, true).unwrap();
        let n = 4u16;
        let p = RingPtrs { desc: mem.host_ptr(0), avail: mem.host_ptr(4096), used: mem.host_ptr(8192) };
        // SAFETY: as in `publish_and_consume`.
        let mut r = unsafe { SplitRing::new(p, n, true) }.unwrap();
        let used_event = || {
            // SAFETY: used_event lies right after avail.ring[4].
            unsafe { ptr::read(p.avail.add(4 + 2 * 4).cast::<u16>()) }
        };
        assert_eq!(used_event(), 0x8000);
        r.set_interrupts(true);
        assert_eq!(used_event(), 0);
        // Device wants a kick once avail idx passes 2 (avail_event = 2).
        // SAFETY: avail_event lies right after used.ring[4].
        unsafe { ptr::write(p.used.add(4 + 8 * 4).cast::<u16>(), 2) };
        r.push_avail(0);
        r.push_avail(1);
        assert!(!r.publish(true), "0 -> 2 does not cross event 2");
        r.push_avail(2);
        assert!(r.publish(true), "2 -> 3 crosses event 2");
    }
}
