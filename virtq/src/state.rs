//! The ring state that changes hands.
//!
//! A split ring's driver-visible state lives in guest memory (the available and used indexes,
//! the suppression flags and event indexes). What lives only with the device is small: how far
//! it has consumed the available ring and how far it has filled the used ring. That pair is
//! what moves between owners, and all that needs to move for nothing to be lost or repeated.

/// The part of a ring's state that is not in guest memory: what must move when a queue changes
/// hands (a polling thread, an accelerator, a reconnect) for nothing to be lost or repeated.
///
/// This is what an accelerator module is handed at plug (it owns the ring from here on) and
/// hands back at unplug, after quiescing and draining (the software path resumes exactly here);
/// it is also what `GET_VRING_BASE` reports and a reconnect resumes from. Take it with
/// [`SplitRing::state`](crate::SplitRing::state) and resume with
/// [`SplitRing::new`](crate::SplitRing::new) at `last_avail`.
///
/// Notification state is deliberately not carried:
/// - whether EVENT_IDX is in use is a negotiated feature, given to the new owner with the
///   ring addresses;
/// - the suppression fields (used flags, `avail_event`) are in guest memory; the new owner
///   rewrites them on its first [`SplitRing::set_kicks`](crate::SplitRing::set_kicks);
/// - the new owner counts the used entries already published as signalled, so an owner
///   signals (or is told not to need to) what it published before it hands the ring over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingState {
    /// Next available-ring entry the device will consume.
    pub last_avail: u16,
    /// Next used-ring entry the device will fill. On (re)start this is read back from the
    /// used ring itself, which is authoritative: with every used entry published before the
    /// hand-over, the two agree.
    pub used_idx: u16,
}

/// A ring as it changes hands between owners (the switch's polling thread and an accelerator):
/// where its three parts are, its size, where the giver stopped, and whether EVENT_IDX
/// suppresses notifications. The new owner translates `addrs` through its own IOMMU domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingHandoff {
    /// The ring's parts, in the addresses the frontend gave (IOVAs behind a vIOMMU).
    pub addrs: crate::ring::RingAddrs,
    /// Entries (a power of two).
    pub size: u16,
    /// Where the giver stopped, every used entry it wrote published.
    pub state: RingState,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub event_idx: bool,
}
