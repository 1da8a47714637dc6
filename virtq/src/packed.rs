//! A packed virtqueue (virtio 1.1, `VIRTIO_F_RING_PACKED`) seen from the device side.
//!
//! Layout (virtio 1.2, 2.8): one ring of `size` 16-byte descriptors `{addr: u64, len: u32,
//! id: u16, flags: u16}` (align 16), which the driver fills and the device writes used
//! descriptors back into, and two 4-byte event suppression areas `{off_wrap: u16, flags: u16}`
//! (align 4): the driver's, which the device reads (whether to interrupt), and the device's,
//! which the device writes (whether to kick). A descriptor is available when its AVAIL flag
//! equals the reader's wrap counter and its USED flag does not; the counters flip each lap and
//! start at 1. vhost-user gives the three parts as the descriptor, available and used
//! addresses.
//!
//! A position is a *token*: the slot in bits 0-14 and the wrap counter in bit 15 (1 on the
//! first lap), as vhost-user's `SET_VRING_BASE` and `GET_VRING_BASE` carry it. The slot is one
//! AND away, and the wrap bit is what an AVAIL or USED flag is compared with; only distances
//! (how far the driver may be ahead) unfold a token into `0..2 * size`.
//!
//! The datapath sees what a split ring offers ([`crate::Ring`]): a pending count, heads popped,
//! peeked and given back, descriptors read by head, used entries pushed by head and published
//! in one go. A head here is the chain's number (counted from the ring's start, wrapping),
//! not a slot: a chain's position, length and buffer id are recorded under it when its first
//! descriptor is seen available (the id is the last descriptor's, as the spec puts it). A used
//! entry is written where the driver looks for the next one and moves that place on by its
//! chain's length, so chains may complete in any order.
//!
//! Every field the guest writes is read with a volatile load into a local and checked there;
//! a driver that makes more descriptors available than the ring can hold gets
//! [`RingError::AvailOverrun`] and its queue stopped, as a split ring's would.

use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use iommu::{Access, Dma};
use virtio_bindings::virtio_ring::{
    VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED, VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE, VRING_PACKED_EVENT_FLAG_ENABLE, VRING_PACKED_EVENT_F_WRAP_CTR,
};

use crate::ring::{
    map_part, Desc, RingAddrs, RingError, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, MAX_RING_SIZE,
};
use crate::state::RingState;

/// `VRING_PACKED_DESC_F_AVAIL`: the driver's wrap counter when it made the descriptor available.
pub const DESC_F_AVAIL: u16 = 1 << VRING_PACKED_DESC_F_AVAIL;
/// `VRING_PACKED_DESC_F_USED`: the device's wrap counter when it used the descriptor.
pub const DESC_F_USED: u16 = 1 << VRING_PACKED_DESC_F_USED;
/// Event suppression: notify.
pub const EVENT_ENABLE: u16 = VRING_PACKED_EVENT_FLAG_ENABLE as u16;
/// Event suppression: do not notify.
pub const EVENT_DISABLE: u16 = VRING_PACKED_EVENT_FLAG_DISABLE as u16;
/// Event suppression: notify when the descriptor at `off_wrap` is reached (EVENT_IDX).
pub const EVENT_DESC: u16 = VRING_PACKED_EVENT_FLAG_DESC as u16;
/// Bit of a token (and of `off_wrap`) that holds the wrap counter.
pub const WRAP_BIT: u16 = 1 << VRING_PACKED_EVENT_F_WRAP_CTR;

/// The flags the datapath reads from a descriptor (the rest are the ring's own).
const CHAIN_FLAGS: u16 = DESC_F_NEXT | DESC_F_WRITE | DESC_F_INDIRECT;

/// One packed descriptor as the driver lays it out.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedDesc {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length (in a used descriptor: bytes written).
    pub len: u32,
    /// Buffer id (the driver's; the device echoes it in the used descriptor).
    pub id: u16,
    /// `DESC_F_*`, AVAIL and USED.
    pub flags: u16,
}

/// A chain seen available.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    pos: u16,
    id: u16,
    count: u16,
}

/// Device-side view of one packed ring.
#[derive(Debug)]
pub struct PackedRing {
    desc: NonNull<PackedDesc>,
    /// Driver event suppression area: `[off_wrap, flags]` (the device reads it).
    driver: NonNull<u16>,
    /// Device event suppression area: `[off_wrap, flags]` (the device writes it).
    device: NonNull<u16>,
    size: u32,
    /// Chains popped (wrapping): the next head.
    popped: u16,
    /// Chains seen available (wrapping); `scanned - popped` are pending.
    scanned: u16,
    /// Position after the last chain seen available: where the next scan looks.
    scan: u16,
    /// By chain number (masked): the chain's position, buffer id and number of descriptors.
    chains: Box<[Seen]>,
    cap_mask: u16,
    /// Where the next used descriptor goes.
    used: u16,
    /// Used entries pushed and published (wrapping), and by pushed entry the used position
    /// after it.
    pushed: u16,
    published: u16,
    after: Box<[u16]>,
    /// Used position as last published (where the first entry waiting is), and when the
    /// driver was last notified.
    published_at: u16,
    signalled: u16,
    event_idx: bool,
    kicks_off: bool,
    kicks_written: bool,
    /// Used entries after the first waiting one get their flags when pushed (see
    /// [`PackedRing::set_eager`]).
    eager: bool,
}

// SAFETY: as for `SplitRing`: the pointers refer to guest memory the ring's owner keeps
// mapped, and one thread at a time uses a ring.
unsafe impl Send for PackedRing {}

impl PackedRing {
    /// Translates and checks a ring's three parts in `dma` and resumes it at token
    /// `last_avail`; the used position starts there too (a ring resumes with every entry the
    /// device took returned, as vhost-user's `SET_VRING_BASE` assumes).
    pub fn new(
        dma: &mut Dma,
        addrs: RingAddrs,
        size: u32,
        last_avail: u16,
        event_idx: bool,
    ) -> Result<Self, RingError> {
        if size == 0 || size > MAX_RING_SIZE as u32 {
            return Err(RingError::BadSize(size));
        }
        if u32::from(last_avail & !WRAP_BIT) >= size {
            return Err(RingError::BadBase(last_avail));
        }
        let desc = map_part(dma, addrs.desc, 16 * size as u64, 16, Access::Write, "descriptor")?;
        let driver = map_part(dma, addrs.avail, 4, 4, Access::Read, "driver event")?;
        let device = map_part(dma, addrs.used, 4, 4, Access::Write, "device event")?;
        let cap = size.next_power_of_two() as usize;
        let start = last_avail;
        Ok(PackedRing {
            desc: desc.cast(),
            driver: driver.cast(),
            device: device.cast(),
            size,
            popped: 0,
            scanned: 0,
            scan: start,
            chains: vec![Seen::default(); cap].into_boxed_slice(),
            cap_mask: (cap - 1) as u16,
            used: start,
            pushed: 0,
            published: 0,
            after: vec![0; cap].into_boxed_slice(),
            published_at: start,
            signalled: start,
            event_idx,
            kicks_off: false,
            kicks_written: false,
            eager: true,
        })
    }

    /// Ring size.
    #[inline(always)]
    pub fn size(&self) -> u16 {
        self.size as u16
    }

    /// What the device writes, for a dirty log: the descriptor ring (used descriptors are
    /// written into it). The device event area is logged by [`PackedRing::device_area`].
    pub fn used_area(&self) -> (*const u8, u64) {
        (self.desc.as_ptr() as *const u8, 16 * self.size as u64)
    }

    /// The device event suppression area (4 bytes), for a dirty log.
    pub fn device_area(&self) -> (*const u8, u64) {
        (self.device.as_ptr() as *const u8, 4)
    }

    /// The state to hand over: the next chain to take and the next used position, as tokens.
    pub fn state(&self) -> RingState {
        RingState { last_avail: self.next_avail(), used_idx: self.used }
    }

    /// Position of the next chain to take.
    #[inline(always)]
    fn next_avail(&self) -> u16 {
        if self.popped == self.scanned {
            self.scan
        } else {
            self.chain(self.popped).pos
        }
    }

    /// The record of chain number `n`.
    #[inline(always)]
    fn chain(&self, n: u16) -> &Seen {
        // SAFETY: `chains` has `cap_mask + 1` entries, so the masked index is inside it.
        unsafe { self.chains.get_unchecked((n & self.cap_mask) as usize) }
    }

    #[inline(always)]
    fn chain_mut(&mut self, n: u16) -> &mut Seen {
        // SAFETY: as for `chain`.
        unsafe { self.chains.get_unchecked_mut((n & self.cap_mask) as usize) }
    }

    /// The used position after pushed entry number `n`.
    #[inline(always)]
    fn after_mut(&mut self, n: u16) -> &mut u16 {
        // SAFETY: `after` has `cap_mask + 1` entries too.
        unsafe { self.after.get_unchecked_mut((n & self.cap_mask) as usize) }
    }

    /// The slot of position `pos`.
    #[inline(always)]
    fn slot(&self, pos: u16) -> usize {
        (pos & !WRAP_BIT) as usize
    }

    /// The position `n` (at most `size`) after `pos`: a lap completed flips the wrap bit.
    #[inline(always)]
    fn advance(&self, pos: u16, n: u32) -> u16 {
        let s = u32::from(pos & !WRAP_BIT) + n;
        if s >= self.size {
            (s - self.size) as u16 | ((pos & WRAP_BIT) ^ WRAP_BIT)
        } else {
            s as u16 | (pos & WRAP_BIT)
        }
    }

    /// How many positions `to` is ahead of `from` (`0..2 * size`).
    #[inline(always)]
    fn distance(&self, from: u16, to: u16) -> u32 {
        let (a, b) = (pos_of(from, self.size), pos_of(to, self.size));
        if b >= a {
            b - a
        } else {
            b + 2 * self.size - a
        }
    }

    #[inline(always)]
    fn flags_atomic(&self, slot: usize) -> &AtomicU16 {
        // SAFETY: slot < size: the flags (offset 14, 2-aligned) of a descriptor inside the
        // checked ring, which stays mapped while self lives; shared memory is accessed only
        // atomically or volatilely.
        unsafe { AtomicU16::from_ptr((self.desc.as_ptr().add(slot) as *mut u16).add(7)) }
    }

    /// Whether the descriptor at `pos` is available (its flags loaded with Acquire, so the
    /// rest of what the driver wrote before them is visible).
    #[inline(always)]
    fn is_avail(&self, pos: u16) -> Option<u16> {
        let f = self.flags_atomic(self.slot(pos)).load(Ordering::Acquire);
        let wrap = pos & WRAP_BIT != 0;
        ((f & DESC_F_AVAIL != 0) == wrap && (f & DESC_F_USED != 0) != wrap).then_some(f)
    }

    #[inline(always)]
    fn read_desc(&self, slot: usize) -> PackedDesc {
        // SAFETY: slot < size; one volatile read of a descriptor inside the checked ring.
        unsafe { self.desc.as_ptr().add(slot).read_volatile() }
    }

    /// Number of chains the driver has made available that we have not taken. Looks at the
    /// ring only when the chains already seen are used up.
    #[inline(always)]
    pub fn avail_pending(&mut self) -> Result<u16, RingError> {
        let cached = self.scanned.wrapping_sub(self.popped);
        if cached != 0 {
            return Ok(cached);
        }
        self.scan_more()
    }

    /// Like `avail_pending`, but also looks for chains made available since.
    #[inline]
    pub fn avail_pending_fresh(&mut self) -> Result<u16, RingError> {
        self.scan_more()
    }

    /// Walks the ring from where the last scan stopped, recording each available chain's
    /// position, length and id, until a descriptor is not available or a ring's worth is in
    /// the device's hands.
    fn scan_more(&mut self) -> Result<u16, RingError> {
        // Descriptors the device holds (seen, not yet used): the driver cannot have made more
        // than the rest available.
        let mut room = self.size - self.distance(self.used, self.scan);
        while room > 0 {
            let head = self.scan;
            if room >= 4 && self.scan_four(head) {
                room -= 4;
                continue;
            }
            let Some(mut f) = self.is_avail(head) else { break };
            let mut n = 1u32;
            let mut p = head;
            while f & DESC_F_NEXT != 0 && f & DESC_F_INDIRECT == 0 {
                if n == room {
                    // A chain running past what the driver may have made available.
                    return Err(RingError::AvailOverrun(n.min(u16::MAX as u32) as u16));
                }
                p = self.advance(p, 1);
                f = self.read_desc(self.slot(p)).flags;
                n += 1;
            }
            // SAFETY: the id (offset 12, 2-aligned) of a descriptor inside the checked ring.
            let id =
                unsafe { std::ptr::addr_of!((*self.desc.as_ptr().add(self.slot(p))).id).read_volatile() };
            *self.chain_mut(self.scanned) = Seen { pos: head, id, count: n as u16 };
            self.scanned = self.scanned.wrapping_add(1);
            self.scan = self.advance(head, n);
            room -= n;
        }
        Ok(self.scanned.wrapping_sub(self.popped))
    }

    /// Records four single-descriptor chains from `head` at once, as DPDK's vhost takes its
    /// batches: when the four slots lie before the ring's end and all four are available and
    /// say neither NEXT nor INDIRECT (else nothing is recorded and the caller goes one chain at
    /// a time).
    #[inline(always)]
    fn scan_four(&mut self, head: u16) -> bool {
        let slot = self.slot(head);
        if slot + 4 > self.size as usize {
            return false;
        }
        // What an available single descriptor shows: AVAIL equal to the wrap counter, USED not.
        let want = avail_flags(head);
        let mask = DESC_F_AVAIL | DESC_F_USED | DESC_F_NEXT | DESC_F_INDIRECT;
        // The last first: a driver adds in order, so it is the one most likely not there yet.
        // Each load is Acquire: what the driver wrote before a flag is visible after it.
        if self.flags_atomic(slot + 3).load(Ordering::Acquire) & mask != want {
            return false;
        }
        for k in 0..3 {
            if self.flags_atomic(slot + k).load(Ordering::Acquire) & mask != want {
                return false;
            }
        }
        for k in 0..4u16 {
            // SAFETY: slot + 3 < size: the id (offset 12, 2-aligned) of a descriptor inside
            // the checked ring.
            let id = unsafe {
                std::ptr::addr_of!((*self.desc.as_ptr().add(slot + k as usize)).id).read_volatile()
            };
            // The four slots lie in one lap: positions are the head's plus k.
            *self.chain_mut(self.scanned.wrapping_add(k)) = Seen { pos: head + k, id, count: 1 };
        }
        self.scanned = self.scanned.wrapping_add(4);
        self.scan = self.advance(head, 4);
        true
    }

    /// Takes the next available chain; its head (the chain's number). Call only after
    /// `avail_pending` said there is one.
    #[inline(always)]
    pub fn pop_head(&mut self) -> u16 {
        let head = self.popped;
        self.popped = self.popped.wrapping_add(1);
        head
    }

    /// Chains taken so far (wrapping): the next head.
    #[inline(always)]
    pub fn taken(&self) -> u16 {
        self.popped
    }

    /// The head `k` chains past the next one, without taking it; `k` must be below what
    /// `avail_pending` returned.
    #[inline(always)]
    pub fn peek_head(&self, k: u16) -> u16 {
        self.popped.wrapping_add(k)
    }

    /// The slot of head `head`'s first descriptor.
    #[inline(always)]
    pub fn head_slot(&self, head: u16) -> u16 {
        self.slot(self.chain(head).pos) as u16
    }

    /// The descriptors the next delivery looks at first: the next chain's and the next used.
    #[inline(always)]
    pub fn next_lines(&self) -> [usize; 2] {
        let base = self.desc.as_ptr() as usize;
        [base + 16 * self.slot(self.next_avail()), base + 16 * self.slot(self.used)]
    }

    /// Gives back the last `n` heads taken.
    #[inline]
    pub fn unpop(&mut self, n: u16) {
        self.popped = self.popped.wrapping_sub(n);
    }

    /// Descriptor at slot `slot` (< size) in split form: its chain flags only, and `next` the
    /// slot after it, where a packed chain goes on.
    #[inline(always)]
    pub fn desc(&self, slot: u16) -> Desc {
        let slot = (slot as usize).min(self.size as usize - 1);
        let d = self.read_desc(slot);
        let next = if slot + 1 == self.size as usize { 0 } else { slot as u16 + 1 };
        Desc { addr: d.addr, len: d.len, flags: d.flags & CHAIN_FLAGS, next }
    }

    /// Whether used entries after the first waiting one get their flags as they are pushed
    /// (the default). The driver reads used descriptors in ring order, so only the first entry
    /// waiting must stay hidden: publishing writes its flags last, as DPDK's vhost flushes its
    /// shadow ring. A queue that holds entries back across publishes (`publish_used_but` with
    /// `held` > 0: a shaped port) must turn this off first: a flag once shown is never taken
    /// back, since a driver may read four descriptors' flags in one vector load (DPDK's
    /// vectorized packed path) and see them in any order. Turned on, the entries waiting get
    /// their flags then.
    #[inline(always)]
    pub fn set_eager(&mut self, on: bool) {
        if on && !self.eager {
            self.flag_waiting(self.pushed);
        }
        self.eager = on;
    }

    /// Writes the flags of the entries waiting after the first, up to (not including) pushed
    /// entry number `to`.
    #[inline(always)]
    fn flag_waiting(&mut self, to: u16) {
        if to == self.published {
            return;
        }
        let mut k = self.published.wrapping_add(1);
        while k != to {
            let at = *self.after_mut(k.wrapping_sub(1));
            self.flags_atomic(self.slot(at)).store(used_flags(at), Ordering::Relaxed);
            k = k.wrapping_add(1);
        }
    }

    /// Queues a used entry for chain `head` (not yet visible to the driver).
    #[inline(always)]
    pub fn push_used(&mut self, head: u16, len: u32) {
        let c = *self.chain(head);
        let (id, n) = (c.id, u32::from(c.count).max(1));
        let pos = self.used;
        let slot = self.slot(pos);
        // SAFETY: slot < size: the id and len of a descriptor inside the checked ring.
        unsafe {
            let d = self.desc.as_ptr().add(slot);
            std::ptr::addr_of_mut!((*d).id).write_volatile(id);
            std::ptr::addr_of_mut!((*d).len).write_volatile(len);
        }
        if self.eager && self.pushed != self.published {
            // Relaxed: a driver reads it only after the first entry's flags, whose Release
            // store puts this entry's id, len and flags before them.
            self.flags_atomic(slot).store(used_flags(pos), Ordering::Relaxed);
        }
        self.used = self.advance(pos, n);
        let k = self.pushed;
        *self.after_mut(k) = self.used;
        self.pushed = k.wrapping_add(1);
    }

    /// Makes queued used entries visible: the first one's flags, after the others'.
    #[inline(always)]
    pub fn publish_used(&mut self) {
        self.publish_used_but(0);
    }

    /// Publishes all queued used entries but the last `held`.
    #[inline(always)]
    pub fn publish_used_but(&mut self, held: u16) {
        let to = self.pushed.wrapping_sub(held);
        if to == self.published || held > self.pushed.wrapping_sub(self.published) {
            return;
        }
        let first = self.published_at;
        let end = if held == 0 { self.used } else { *self.after_mut(to.wrapping_sub(1)) };
        if !self.eager {
            self.flag_waiting(to);
        } else if held != 0 {
            // Against `set_eager`'s rule (the datapath turns it off first): the first entry
            // held back got its flags when pushed and is hidden again before the ones ahead of
            // it show, which a driver reading flags one at a time never sees; the ring stops
            // being eager.
            self.flags_atomic(self.slot(end)).store(avail_flags(end), Ordering::Relaxed);
            self.eager = false;
        }
        // Release: every entry's id, len and flags (and the hiding above) before the flags
        // that let the driver read on.
        self.flags_atomic(self.slot(first)).store(used_flags(first), Ordering::Release);
        self.published_at = end;
        self.published = to;
    }

    /// After publishing: whether the driver wants an interrupt for what was published since
    /// the last notification (its event suppression area: enabled, disabled, or at a
    /// descriptor with EVENT_IDX).
    #[inline]
    pub fn needs_interrupt(&mut self) -> bool {
        let (new, old) = (self.published_at, self.signalled);
        if new == old {
            return false;
        }
        // Our flag stores before the driver's suppression state, or both sides may decide the
        // other will act (a lost interrupt).
        fence(Ordering::SeqCst);
        self.signalled = new;
        // SAFETY: the driver area's 4 checked bytes: off_wrap at +0, flags at +2.
        let flags = unsafe { self.driver.as_ptr().add(1).read_volatile() } & 3;
        match flags {
            EVENT_ENABLE => true,
            EVENT_DESC if self.event_idx => {
                // SAFETY: as above.
                let off_wrap = unsafe { self.driver.as_ptr().read_volatile() };
                // As vhost does it: slots, with the event moved back a lap when it is on the
                // other side of the wrap from where we are now.
                let size = self.size as u16;
                let (n, mut o) = (self.slot(new) as u16, self.slot(old) as u16);
                if n <= o {
                    o = o.wrapping_sub(size);
                }
                let mut off = off_wrap & !WRAP_BIT;
                if off_wrap & WRAP_BIT != new & WRAP_BIT {
                    off = off.wrapping_sub(size);
                }
                n.wrapping_sub(off).wrapping_sub(1) < n.wrapping_sub(o)
            }
            EVENT_DESC => true,
            _ => false,
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
        // SAFETY: the device area's 4 checked bytes: flags at +2.
        unsafe { self.device.as_ptr().add(1).write_volatile(if on { EVENT_ENABLE } else { EVENT_DISABLE }) };
        on && self.has_new_avail()
    }

    fn has_new_avail(&mut self) -> bool {
        fence(Ordering::SeqCst);
        self.popped != self.scanned || self.is_avail(self.scan).is_some()
    }
}

/// The flags of a used descriptor at position `pos`: AVAIL and USED both equal to its wrap
/// counter.
#[inline(always)]
fn used_flags(pos: u16) -> u16 {
    if pos & WRAP_BIT != 0 {
        DESC_F_AVAIL | DESC_F_USED
    } else {
        0
    }
}

/// The flags of a descriptor the driver made available at position `pos` (AVAIL equal to the
/// wrap counter, USED not): what a used entry taken back shows again.
#[inline(always)]
fn avail_flags(pos: u16) -> u16 {
    if pos & WRAP_BIT != 0 {
        DESC_F_AVAIL
    } else {
        DESC_F_USED
    }
}

/// Token `t` unfolded into `0..2 * size` (the first lap first).
#[inline(always)]
fn pos_of(t: u16, size: u32) -> u32 {
    let slot = u32::from(t & !WRAP_BIT);
    if t & WRAP_BIT != 0 {
        slot
    } else {
        slot + size
    }
}

#[cfg(test)]
mod tests;
