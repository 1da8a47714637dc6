//! Virtio rings, split and packed, as data structures seen from the device side.
//!
//! - [`ring`]: the split-ring layout and [`SplitRing`], the device-side accessor over host
//!   pointers validated once through an [`iommu::Dma`];
//! - [`packed`]: the packed-ring layout (virtio 1.1) and [`PackedRing`], its device side;
//! - [`rings`]: [`Ring`], either of them behind the interface the datapath uses;
//! - [`chain`]: walking a descriptor chain into translated, bounds-checked [`iommu::Grant`]s,
//!   with every check a guest could try to dodge;
//! - [`state`]: [`RingState`], what a ring's owner hands over (a polling thread, an
//!   accelerator, a reconnect) so that nothing is lost or repeated;
//! - [`features`]: feature bits (numbers from `virtio-bindings`) and what a negotiated set
//!   means;
//! - `mock` (feature `test-utils`): a driver-side mock guest and its rings, for this crate's
//!   tests and other crates'.
//!
//! This is the hot path's own ring accessor. rust-vmm's `virtio-queue` is the reference it is
//! tested against (same rings in, same chains out), not what a polling loop calls. Nothing here
//! knows about ports, eventfds or the switch: those live in the crates above this one.
#![deny(missing_docs)]

pub mod chain;
pub mod features;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod packed;
pub mod ring;
pub mod rings;
pub mod state;

pub use chain::{walk_chain, Chain, ChainError, Descs, MAX_SEGS};
pub use features::Negotiated;
pub use packed::PackedRing;
pub use ring::{Desc, RingAddrs, RingError, SplitRing, MAX_RING_SIZE};
pub use rings::{AvailView, Ring};
pub use state::{RingHandoff, RingState};
