//! The virtio side of a port: split virtqueues over pre-translated guest memory, descriptor
//! chains walked with every check the guest could try to dodge, and virtio-net constants.
//!
//! This is the hot path's own ring accessor. rust-vmm's `virtio-queue` is the reference it is
//! tested against (same rings in, same chains out), not what the polling loop calls.

pub mod chain;
pub mod features;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod queue;
pub mod ring;

pub use chain::{walk_chain, ChainError, MAX_SEGS};
pub use queue::{QueueStats, VirtQueue};
pub use ring::{RingAddrs, RingError, RingState, SplitRing};
