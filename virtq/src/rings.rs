//! [`Ring`]: a queue's ring, split or packed, behind the one interface the datapath uses.
//!
//! The datapath takes heads, walks their chains and returns them used the same way for both
//! layouts; only what a head is differs (a split ring's descriptor index, a packed ring's
//! chain number) and the ring's own bookkeeping. Each call is one predictable branch on the
//! layout, which a queue never changes while it runs.

use iommu::Dma;

use crate::chain::Descs;
use crate::packed::PackedRing;
use crate::ring::{Desc, RingAddrs, RingError, SplitRing};
use crate::state::RingState;

/// A running ring of either layout.
#[derive(Debug)]
pub enum Ring {
    /// Split (virtio 1.0).
    Split(SplitRing),
    /// Packed (virtio 1.1, `VIRTIO_F_RING_PACKED`).
    Packed(Box<PackedRing>),
}

macro_rules! either {
    ($self:expr, $r:ident => $e:expr) => {
        match $self {
            Ring::Split($r) => $e,
            Ring::Packed($r) => $e,
        }
    };
}

impl Ring {
    /// Sets up a ring of the given layout (see [`SplitRing::new`], [`PackedRing::new`]).
    pub fn new(
        dma: &mut Dma,
        addrs: RingAddrs,
        size: u32,
        last_avail: u16,
        event_idx: bool,
        packed: bool,
    ) -> Result<Self, RingError> {
        Ok(if packed {
            Ring::Packed(Box::new(PackedRing::new(dma, addrs, size, last_avail, event_idx)?))
        } else {
            Ring::Split(SplitRing::new(dma, addrs, size, last_avail, event_idx)?)
        })
    }

    /// Whether this is a packed ring.
    #[inline(always)]
    pub fn is_packed(&self) -> bool {
        matches!(self, Ring::Packed(_))
    }

    /// The split ring, if it is one (what accelerators take over).
    pub fn as_split(&self) -> Option<&SplitRing> {
        match self {
            Ring::Split(r) => Some(r),
            Ring::Packed(_) => None,
        }
    }

    /// Ring size.
    #[inline(always)]
    pub fn size(&self) -> u16 {
        either!(self, r => r.size())
    }

    /// What the device writes into guest memory, for a dirty log: one or two areas.
    pub fn used_areas(&self) -> [(*const u8, u64); 2] {
        match self {
            Ring::Split(r) => [r.used_area(), (std::ptr::null(), 0)],
            Ring::Packed(r) => [r.used_area(), r.device_area()],
        }
    }

    /// The state to hand over (a packed ring's positions are tokens: slot and wrap counter).
    pub fn state(&self) -> RingState {
        either!(self, r => r.state())
    }

    /// Chains available and not yet taken.
    #[inline(always)]
    pub fn avail_pending(&mut self) -> Result<u16, RingError> {
        either!(self, r => r.avail_pending())
    }

    /// Like `avail_pending`, looking at the driver's side again.
    #[inline]
    pub fn avail_pending_fresh(&mut self) -> Result<u16, RingError> {
        either!(self, r => r.avail_pending_fresh())
    }

    /// Takes the next head.
    #[inline(always)]
    pub fn pop_head(&mut self) -> u16 {
        either!(self, r => r.pop_head())
    }

    /// The head `k` past the next one, not taken.
    #[inline(always)]
    pub fn peek_head(&self, k: u16) -> u16 {
        either!(self, r => r.peek_head(k))
    }

    /// Starts loading head `head`'s first descriptor: a split ring's, found through its
    /// available entry. Not a packed ring's: the scan that counted its chains read each one's
    /// flags, so its descriptors are usually in this CPU's cache already (four to a line).
    #[inline(always)]
    pub fn prefetch_desc(&self, head: u16) {
        if let Ring::Split(r) = self {
            r.prefetch_desc(head)
        }
    }

    /// Addresses worth prefetching before the next delivery (see [`SplitRing::next_lines`];
    /// a packed ring: the descriptors of the next chain and of the next used entry).
    #[inline(always)]
    pub fn next_lines(&self) -> [usize; 2] {
        match self {
            Ring::Split(r) => r.next_lines(),
            Ring::Packed(r) => r.next_lines(),
        }
    }

    /// Gives back the last `n` heads taken.
    #[inline]
    pub fn unpop(&mut self, n: u16) {
        either!(self, r => r.unpop(n))
    }

    /// The next available head and its first descriptor, not taken (`None`: nothing
    /// available, or a split ring's head outside its table); the layout looked at once.
    #[inline(always)]
    pub fn next_desc(&mut self) -> Option<(u16, Desc)> {
        match self {
            Ring::Split(r) => {
                if r.avail_pending().ok()? == 0 {
                    return None;
                }
                let head = r.peek_head(0);
                (head < r.size()).then(|| (head, r.desc(head)))
            }
            Ring::Packed(r) => {
                if r.avail_pending().ok()? == 0 {
                    return None;
                }
                let head = r.peek_head(0);
                Some((head, r.desc(r.head_slot(head))))
            }
        }
    }

    /// [`walk_chain`](crate::walk_chain) of `head`, the layout looked at once.
    #[inline(always)]
    pub fn walk<D: iommu::grant::Direction>(
        &self,
        dma: &mut Dma,
        head: u16,
        indirect_ok: bool,
        max_len: u32,
        segs: &mut [iommu::Grant<D>],
    ) -> Result<crate::Chain, crate::ChainError> {
        match self {
            Ring::Split(r) => crate::walk_chain(r, dma, head, indirect_ok, max_len, segs),
            Ring::Packed(r) => crate::walk_chain(&**r, dma, head, indirect_ok, max_len, segs),
        }
    }

    /// Queues a used entry for `head`.
    #[inline(always)]
    pub fn push_used(&mut self, head: u16, len: u32) {
        either!(self, r => r.push_used(head, len))
    }

    /// Whether a packed ring writes used entries' flags as they are pushed (see
    /// [`PackedRing::set_eager`]; a split ring's used index is its one publish).
    #[inline(always)]
    pub fn set_eager(&mut self, on: bool) {
        if let Ring::Packed(r) = self {
            r.set_eager(on)
        }
    }

    /// Publishes every queued used entry.
    #[inline(always)]
    pub fn publish_used(&mut self) {
        either!(self, r => r.publish_used())
    }

    /// Publishes all queued used entries but the last `held`.
    #[inline(always)]
    pub fn publish_used_but(&mut self, held: u16) {
        either!(self, r => r.publish_used_but(held))
    }

    /// Whether the driver wants an interrupt for what was published since the last one.
    #[inline]
    pub fn needs_interrupt(&mut self) -> bool {
        either!(self, r => r.needs_interrupt())
    }

    /// Tells the driver whether to kick; turning kicks on says whether buffers arrived.
    pub fn set_kicks(&mut self, on: bool) -> bool {
        either!(self, r => r.set_kicks(on))
    }
}

/// What a reader of a ring's available side needs, whatever the layout (the vIOMMU's
/// look-ahead over posted buffers).
pub trait AvailView: Descs {
    /// Chains available and not yet taken.
    fn avail_pending(&mut self) -> Result<u16, RingError>;
    /// The head `k` past the next one, not taken.
    fn peek_head(&self, k: u16) -> u16;
    /// Heads taken so far (wrapping): what look-ahead positions count from.
    fn taken(&self) -> u16;
}

impl AvailView for SplitRing {
    fn avail_pending(&mut self) -> Result<u16, RingError> {
        SplitRing::avail_pending(self)
    }
    fn peek_head(&self, k: u16) -> u16 {
        SplitRing::peek_head(self, k)
    }
    fn taken(&self) -> u16 {
        self.state().last_avail
    }
}

impl AvailView for Ring {
    fn avail_pending(&mut self) -> Result<u16, RingError> {
        Ring::avail_pending(self)
    }
    fn peek_head(&self, k: u16) -> u16 {
        Ring::peek_head(self, k)
    }
    fn taken(&self) -> u16 {
        match self {
            Ring::Split(r) => r.state().last_avail,
            Ring::Packed(r) => r.taken(),
        }
    }
}

impl Descs for Ring {
    #[inline(always)]
    fn size(&self) -> u16 {
        Ring::size(self)
    }
    #[inline(always)]
    fn head_slot(&self, head: u16) -> Option<u16> {
        match self {
            Ring::Split(r) => Descs::head_slot(r, head),
            Ring::Packed(r) => Some(r.head_slot(head)),
        }
    }
    #[inline(always)]
    fn desc(&self, slot: u16) -> Desc {
        either!(self, r => r.desc(slot))
    }
    #[inline(always)]
    fn packed(&self) -> bool {
        self.is_packed()
    }
}

impl Descs for PackedRing {
    #[inline(always)]
    fn size(&self) -> u16 {
        PackedRing::size(self)
    }
    #[inline(always)]
    fn head_slot(&self, head: u16) -> Option<u16> {
        Some(PackedRing::head_slot(self, head))
    }
    #[inline(always)]
    fn desc(&self, slot: u16) -> Desc {
        PackedRing::desc(self, slot)
    }
    #[inline(always)]
    fn packed(&self) -> bool {
        true
    }
}
