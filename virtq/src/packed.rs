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
mod tests {
    use super::*;
    use crate::chain::{walk_chain, ChainError, MAX_SEGS};
    use crate::mock::{MockGuest, MockPackedDevice, MockPackedRing};
    use iommu::grant::Direction;
    use iommu::Grant;

    fn setup(size: u16, event_idx: bool) -> (MockGuest, MockPackedRing, MockPackedDevice) {
        let mut g = MockGuest::new(1 << 20);
        let r = g.packed_ring(size);
        let q = r.device(&g, event_idx);
        (g, r, q)
    }

    /// A xorshift64 generator from `seed` (not 0).
    fn xorshift(mut rng: u64) -> impl FnMut() -> u64 {
        move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        }
    }

    /// Walks `head` as the datapath does: (guest-physical address, length) of each segment.
    fn walk<D: Direction>(
        q: &mut MockPackedDevice,
        head: u16,
        indirect: bool,
    ) -> Result<Vec<(u64, u32)>, ChainError> {
        let mut segs = [Grant::<D>::default(); MAX_SEGS];
        let base = q.dma.mem().regions()[0].host() as u64;
        let c = walk_chain(&q.ring, &mut q.dma, head, indirect, 1 << 20, &mut segs)?;
        Ok(segs[..c.nseg as usize].iter().map(|s| (s.as_ptr() as u64 - base, s.len())).collect())
    }

    /// Descriptors written in rust-vmm's layout (`virtio_queue::desc::packed::Descriptor`, the
    /// only part of the packed ring virtio-queue has) read back as written: a chain of two and a
    /// single, their ids echoed in the used descriptors.
    #[test]
    fn test_descriptors_in_virtio_queues_layout() {
        use virtio_queue::desc::packed::Descriptor;
        use vm_memory::ByteValued;
        let (g, r, mut q) = setup(4, false);
        let on = DESC_F_AVAIL;
        for (slot, d) in [
            Descriptor::new(0x8000, 12, 7, on | DESC_F_NEXT),
            Descriptor::new(0x9000, 60, 7, on),
            Descriptor::new(0xa000, 100, 3, on),
        ]
        .iter()
        .enumerate()
        {
            g.write(r.desc + 16 * slot as u64, d.as_slice());
        }
        assert_eq!(q.ring.avail_pending().unwrap(), 2);
        let (h0, h1) = (q.ring.pop_head(), q.ring.pop_head());
        assert_eq!(walk::<iommu::Ro>(&mut q, h0, false).unwrap(), vec![(0x8000, 12), (0x9000, 60)]);
        assert_eq!(walk::<iommu::Ro>(&mut q, h1, false).unwrap(), vec![(0xa000, 100)]);
        q.ring.push_used(h0, 1);
        q.ring.push_used(h1, 2);
        q.ring.publish_used();
        let read = |slot: u64| {
            let mut d = Descriptor::default();
            d.as_mut_slice().copy_from_slice(&g.read(r.desc + 16 * slot, 16));
            (d.id(), d.len(), d.flags())
        };
        // The second used descriptor where the first chain's length puts it: slot 2.
        assert_eq!(read(0), (7, 1, DESC_F_AVAIL | DESC_F_USED));
        assert_eq!(read(2), (3, 2, DESC_F_AVAIL | DESC_F_USED));
    }

    /// The prefetch hint after a chain of two and a single were taken and used, a third
    /// waiting: its descriptor (slot 3), and the next used one (slot 3 too: two used entries
    /// moved the used position by the chains' lengths).
    #[test]
    fn test_next_lines_name_the_next_chain_and_used_descriptors() {
        let (g, mut r, mut q) = setup(8, false);
        r.add_chain(&g, &[(0x8000, 64, 0), (0x9000, 64, 0)]);
        r.add_chain(&g, &[(0xa000, 64, 0)]);
        r.add_chain(&g, &[(0xb000, 64, 0)]);
        let base = q.dma.mem().regions()[0].host() as usize;
        assert_eq!(q.ring.avail_pending().unwrap(), 3);
        for _ in 0..2 {
            let h = q.ring.pop_head();
            q.ring.push_used(h, 10);
        }
        q.ring.publish_used();
        let at = base + r.desc as usize + 16 * 3;
        assert_eq!(q.ring.next_lines(), [at, at]);
    }

    #[test]
    fn test_flags_are_the_spec_numbers() {
        assert_eq!((DESC_F_AVAIL, DESC_F_USED, WRAP_BIT), (0x80, 0x8000, 0x8000));
        assert_eq!((EVENT_ENABLE, EVENT_DISABLE, EVENT_DESC), (0, 1, 2));
        assert_eq!(std::mem::size_of::<PackedDesc>(), 16);
    }

    /// Chains of one to three descriptors over many laps of a small ring: the device walks
    /// exactly what the driver posted and the driver gets each id back once with its length,
    /// the wrap counters flipping on both sides.
    #[test]
    fn test_chains_over_many_laps_come_back_used_in_order() {
        let (g, mut r, mut q) = setup(8, false);
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        for round in 0..200u64 {
            let mut posted = Vec::new();
            while r.free() >= 3 {
                let n = 1 + (next() % 3) as usize;
                let bufs: Vec<(u64, u32, u16)> = (0..n)
                    .map(|k| (0x10000 + 0x1000 * (round % 16) + 0x100 * k as u64, 60 + k as u32, 0))
                    .collect();
                let id = r.add_chain(&g, &bufs);
                posted.push((id, bufs));
            }
            let n = q.ring.avail_pending().unwrap();
            assert_eq!(n as usize, posted.len(), "round {round}");
            for (id, bufs) in &posted {
                let h = q.ring.pop_head();
                let got = walk::<iommu::Ro>(&mut q, h, false).unwrap();
                assert_eq!(got, bufs.iter().map(|b| (b.0, b.1)).collect::<Vec<_>>(), "round {round}");
                q.ring.push_used(h, 1000 + *id as u32);
            }
            assert_eq!(q.ring.avail_pending().unwrap(), 0);
            assert!(r.take_used(&g).is_empty(), "nothing shows before publishing");
            q.ring.publish_used();
            let used = r.take_used(&g);
            assert_eq!(used, posted.iter().map(|(id, _)| (*id, 1000 + *id as u32)).collect::<Vec<_>>());
        }
        // The state is the next slot and wrap counter on both sides.
        let s = q.ring.state();
        assert_eq!(s.last_avail, r.next | if r.wrap { WRAP_BIT } else { 0 });
        assert_eq!(s.used_idx, s.last_avail);
    }

    /// Used entries after the first waiting one get their flags as they are pushed; the driver,
    /// reading in ring order, still sees exactly the published ones. A ring that holds entries
    /// back (the shaper's suffix) is not eager: no held entry ever shows a used flag, so a
    /// driver reading several flags at once cannot take one early. Over many laps of a small
    /// ring, chains of one to three descriptors (single ones taken four at a time), rounds
    /// eager or holding a random number back, and a ring turned eager with entries waiting.
    #[test]
    fn test_only_published_entries_show_and_held_ones_carry_no_used_flag() {
        let (g, mut r, mut q) = setup(8, false);
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
        let mut waiting = std::collections::VecDeque::new();
        let (mut eager_seen, mut held_rounds, mut batches) = (false, 0, 0);
        // The used position of pushed entry number k (the first waiting one's is published_at).
        let pos_of = |q: &MockPackedDevice, k: u16| {
            if k == q.ring.published {
                q.ring.published_at
            } else {
                q.ring.after[(k.wrapping_sub(1) & q.ring.cap_mask) as usize]
            }
        };
        let shows_used = |q: &MockPackedDevice, pos: u16| {
            let f = q.ring.flags_atomic(q.ring.slot(pos)).load(Ordering::Relaxed);
            f & (DESC_F_AVAIL | DESC_F_USED) == used_flags(pos)
        };
        for round in 0..600u64 {
            while r.free() >= 3 && (waiting.len() < 6 || next().is_multiple_of(2)) {
                let n = if next().is_multiple_of(4) { 1 + (next() % 3) as usize } else { 1 };
                let bufs: Vec<(u64, u32, u16)> =
                    (0..n).map(|k| (0x10000 + 0x100 * k as u64, 60 + k as u32, 0)).collect();
                let id = r.add_chain(&g, &bufs);
                waiting.push_back(id);
            }
            let hold = next().is_multiple_of(3);
            // As the datapath does: not eager while a queue may hold entries back.
            q.ring.set_eager(!hold);
            let scanned = q.ring.avail_pending_fresh().unwrap();
            batches += usize::from(scanned >= 4);
            let start = q.ring.pushed;
            let mut pushed = Vec::new();
            let switch_at = if hold { u16::MAX } else { (next() % (scanned as u64 + 1)) as u16 };
            for k in 0..scanned {
                if !hold && k == switch_at {
                    // The rest pushed while not eager; turned eager again after, those get
                    // their flags then.
                    q.ring.set_eager(false);
                }
                let h = q.ring.pop_head();
                let id = waiting.pop_front().unwrap();
                q.ring.push_used(h, 7000 + u32::from(id));
                pushed.push(id);
            }
            if !hold {
                q.ring.set_eager(true);
            }
            // Pushed, not published: the first's flags are unwritten, so none shows.
            assert!(r.take_used(&g).is_empty(), "round {round}: shown before publishing");
            if pushed.len() >= 2 && !hold {
                eager_seen |= shows_used(&q, pos_of(&q, start.wrapping_add(1)));
            }
            let held = if hold { (next() % (pushed.len() as u64 + 1)) as u16 } else { 0 };
            held_rounds += usize::from(held > 0 && (held as usize) < pushed.len());
            q.ring.publish_used_but(held);
            let shown = pushed.len() - held as usize;
            let want: Vec<(u16, u32)> =
                pushed[..shown].iter().map(|id| (*id, 7000 + u32::from(*id))).collect();
            assert_eq!(r.take_used(&g), want, "round {round}: held {held} of {}", pushed.len());
            for k in shown..pushed.len() {
                let pos = pos_of(&q, start.wrapping_add(k as u16));
                assert!(!shows_used(&q, pos), "round {round}: held entry {k} shows a used flag");
            }
            q.ring.publish_used();
            let rest: Vec<(u16, u32)> =
                pushed[shown..].iter().map(|id| (*id, 7000 + u32::from(*id))).collect();
            assert_eq!(r.take_used(&g), rest, "round {round}: the held ones released");
        }
        assert!(eager_seen, "no entry after the first carried its flags before publishing");
        assert!(held_rounds > 50, "only {held_rounds} rounds held some entries back");
        assert!(batches > 50, "only {batches} scans of four or more");
    }

    /// Used entries may be written in any order; the driver finds each where it looks next.
    #[test]
    fn test_out_of_order_completion() {
        let (g, mut r, mut q) = setup(8, false);
        let a = r.add_chain(&g, &[(0x8000, 10, 0), (0x9000, 20, 0)]);
        let b = r.add_chain(&g, &[(0xa000, 30, 0)]);
        let c = r.add_chain(&g, &[(0xb000, 40, 0)]);
        assert_eq!(q.ring.avail_pending().unwrap(), 3);
        let (ha, hb, hc) = (q.ring.pop_head(), q.ring.pop_head(), q.ring.pop_head());
        q.ring.push_used(hc, 3);
        q.ring.push_used(ha, 1);
        q.ring.publish_used();
        assert_eq!(r.take_used(&g), vec![(c, 3), (a, 1)]);
        q.ring.push_used(hb, 2);
        q.ring.publish_used();
        assert_eq!(r.take_used(&g), vec![(b, 2)]);
        // The ring goes on from there.
        let d = r.add_chain(&g, &[(0xc000, 50, 0)]);
        assert_eq!(q.ring.avail_pending().unwrap(), 1);
        let h = q.ring.pop_head();
        assert_eq!(walk::<iommu::Ro>(&mut q, h, false).unwrap(), vec![(0xc000, 50)]);
        q.ring.push_used(h, 5);
        q.ring.publish_used();
        assert_eq!(r.take_used(&g), vec![(d, 5)]);
    }

    /// A head given back is taken again with the same chain; held entries stay hidden.
    #[test]
    fn test_unpop_and_held_entries() {
        let (g, mut r, mut q) = setup(4, false);
        let a = r.add_chain(&g, &[(0x8000, 10, DESC_F_WRITE)]);
        let b = r.add_chain(&g, &[(0x9000, 20, DESC_F_WRITE)]);
        assert_eq!(q.ring.avail_pending().unwrap(), 2);
        let h0 = q.ring.pop_head();
        let _ = q.ring.pop_head();
        q.ring.unpop(1);
        assert_eq!(q.ring.avail_pending().unwrap(), 1);
        let h1 = q.ring.pop_head();
        assert_eq!(walk::<iommu::Rw>(&mut q, h1, false).unwrap(), vec![(0x9000, 20)]);
        q.ring.push_used(h0, 7);
        q.ring.push_used(h1, 8);
        q.ring.publish_used_but(1);
        assert_eq!(r.take_used(&g), vec![(a, 7)]);
        q.ring.publish_used();
        assert_eq!(r.take_used(&g), vec![(b, 8)]);
    }

    #[test]
    fn test_packed_indirect_tables_are_read_in_order_with_only_write_counting() {
        let (g, mut r, mut q) = setup(4, false);
        // Three packed entries; their NEXT flags and ids are noise the device ignores.
        let table = 0x4000u64;
        for (k, (addr, len)) in [(0x8000u64, 10u32), (0x9000, 20), (0xa000, 30)].iter().enumerate() {
            let mut b = [0u8; 16];
            b[0..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&0x1234u16.to_le_bytes());
            b[14..16].copy_from_slice(&(DESC_F_NEXT * (k as u16 % 2)).to_le_bytes());
            g.write(table + 16 * k as u64, &b);
        }
        r.add_chain(&g, &[(table, 48, DESC_F_INDIRECT)]);
        q.ring.avail_pending().unwrap();
        let h = q.ring.pop_head();
        assert_eq!(
            walk::<iommu::Ro>(&mut q, h, true).unwrap(),
            vec![(0x8000, 10), (0x9000, 20), (0xa000, 30)]
        );
        // Not negotiated: refused.
        r.add_chain(&g, &[(table, 48, DESC_F_INDIRECT)]);
        q.ring.avail_pending().unwrap();
        let h = q.ring.pop_head();
        assert_eq!(walk::<iommu::Ro>(&mut q, h, false), Err(ChainError::BadIndirect));
        // A device-writable entry in a chain the device reads.
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&0x8000u64.to_le_bytes());
        b[8..12].copy_from_slice(&10u32.to_le_bytes());
        b[14..16].copy_from_slice(&DESC_F_WRITE.to_le_bytes());
        g.write(table, &b);
        r.add_chain(&g, &[(table, 16, DESC_F_INDIRECT)]);
        q.ring.avail_pending().unwrap();
        let h = q.ring.pop_head();
        assert_eq!(walk::<iommu::Ro>(&mut q, h, true), Err(ChainError::WrongDirection));
    }

    /// A hostile driver: a chain that never ends, descriptors forged available in slots the
    /// device holds, and a resume position outside the ring.
    #[test]
    fn test_a_hostile_driver_cannot_make_the_device_take_more_than_the_ring() {
        let (g, r, mut q) = setup(8, false);
        // Every slot available, every one saying NEXT: a chain longer than the ring.
        for s in 0..8 {
            r.write_desc(&g, s, 0x8000, 10, 0, DESC_F_NEXT | DESC_F_AVAIL);
        }
        assert_eq!(q.ring.avail_pending(), Err(RingError::AvailOverrun(8)));
        // Eight single descriptors: all taken, and no more however the flags are forged while
        // the device holds them.
        let (g, r, mut q) = setup(8, false);
        for s in 0..8 {
            r.write_desc(&g, s, 0x8000, 10, s, DESC_F_AVAIL);
        }
        assert_eq!(q.ring.avail_pending().unwrap(), 8);
        for s in 0..8 {
            // Forged "available" under the next lap's wrap counter.
            r.write_desc(&g, s, 0x8000, 10, s, DESC_F_USED);
        }
        assert_eq!(q.ring.avail_pending_fresh().unwrap(), 8, "nothing beyond the ring's worth");
        for _ in 0..8 {
            let h = q.ring.pop_head();
            walk::<iommu::Ro>(&mut q, h, false).unwrap();
            q.ring.push_used(h, 0);
        }
        q.ring.publish_used();
        // The used descriptors overwrote the forgeries; made available again, the slots are
        // the next lap's, and fine.
        assert_eq!(q.ring.avail_pending_fresh().unwrap(), 0);
        for s in 0..8 {
            r.write_desc(&g, s, 0x8000, 10, s, DESC_F_USED);
        }
        assert_eq!(q.ring.avail_pending().unwrap(), 8);
        let mut dma = g.dma();
        let bad = PackedRing::new(&mut dma, r.addrs(), 8, 8 | WRAP_BIT, false);
        assert_eq!(bad.err(), Some(RingError::BadBase(8 | WRAP_BIT)));
        let mut addrs = r.addrs();
        addrs.avail += 2;
        assert_eq!(
            PackedRing::new(&mut dma, addrs, 8, 0, false).err(),
            Some(RingError::Misaligned("driver event"))
        );
    }

    /// Interrupts as the driver's event area asks, kicks as the device's says.
    #[test]
    fn test_event_suppression_both_ways() {
        let (g, mut r, mut q) = setup(8, true);
        let one = |r: &mut MockPackedRing, q: &mut MockPackedDevice| {
            r.add_chain(&g, &[(0x8000, 10, 0)]);
            q.ring.avail_pending().unwrap();
            let h = q.ring.pop_head();
            q.ring.push_used(h, 0);
            q.ring.publish_used();
            r.take_used(&g);
        };
        r.set_driver_event(&g, EVENT_ENABLE, 0);
        one(&mut r, &mut q);
        assert!(q.ring.needs_interrupt());
        assert!(!q.ring.needs_interrupt(), "nothing new");
        r.set_driver_event(&g, EVENT_DISABLE, 0);
        one(&mut r, &mut q);
        assert!(!q.ring.needs_interrupt());
        // EVENT_IDX: interrupt when the used descriptor at slot 4 (wrap 1) is written.
        r.set_driver_event(&g, EVENT_DESC, 4 | WRAP_BIT);
        one(&mut r, &mut q); // slot 2
        assert!(!q.ring.needs_interrupt());
        one(&mut r, &mut q); // slot 3
        assert!(!q.ring.needs_interrupt());
        one(&mut r, &mut q); // slot 4
        assert!(q.ring.needs_interrupt());
        // Past the wrap: slot 1 of the second lap (wrap 0).
        r.set_driver_event(&g, EVENT_DESC, 1);
        for _ in 0..4 {
            one(&mut r, &mut q); // slots 5, 6, 7, 0'
            assert!(!q.ring.needs_interrupt());
        }
        one(&mut r, &mut q); // slot 1'
        assert!(q.ring.needs_interrupt());
        // Kicks.
        assert!(!q.ring.set_kicks(false));
        assert_eq!(r.device_event_flags(&g), EVENT_DISABLE);
        assert!(!q.ring.set_kicks(true), "nothing arrived");
        assert_eq!(r.device_event_flags(&g), EVENT_ENABLE);
        q.ring.set_kicks(false);
        r.add_chain(&g, &[(0x8000, 10, 0)]);
        assert!(q.ring.set_kicks(true), "a chain arrived while kicks were off");
    }

    /// A ring handed over mid-lap resumes where the old owner stopped.
    #[test]
    fn test_resume_from_a_token() {
        let (g, mut r, mut q) = setup(4, false);
        for i in 0..6u16 {
            let id = r.add_chain(&g, &[(0x8000 + i as u64, 10, 0)]);
            q.ring.avail_pending().unwrap();
            let h = q.ring.pop_head();
            q.ring.push_used(h, 1);
            q.ring.publish_used();
            assert_eq!(r.take_used(&g), vec![(id, 1)]);
        }
        let s = q.ring.state();
        assert_eq!(s.last_avail, 2, "slot 2 of the second lap: wrap counter 0");
        let id = r.add_chain(&g, &[(0x9000, 10, 0)]);
        let mut dma = g.dma();
        let mut q2 = MockPackedDevice {
            ring: PackedRing::new(&mut dma, r.addrs(), 4, s.last_avail, false).unwrap(),
            dma,
        };
        assert_eq!(q2.ring.avail_pending().unwrap(), 1);
        let h = q2.ring.pop_head();
        assert_eq!(walk::<iommu::Ro>(&mut q2, h, false).unwrap(), vec![(0x9000, 10)]);
        q2.ring.push_used(h, 9);
        q2.ring.publish_used();
        assert_eq!(r.take_used(&g), vec![(id, 9)]);
    }
}
