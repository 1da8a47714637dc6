//! The virtio side of a port: a running virtqueue ([`VirtQueue`]: its ring, the memory it lives
//! in, its eventfds, IOTLB link, offloads and counters) and the feature bits the switch offers.
//!
//! The rings themselves (layout, the device-side accessor, chain walking, ring state, feature
//! bits) are the `virtq` crate's; they are re-exported here so that `vswitch::virtio::ring` and
//! friends keep naming them.

pub mod features;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod queue;

pub use queue::{QueueStats, VirtQueue};
pub use virtq::{chain, ring};
pub use virtq::{walk_chain, ChainError, Ring, RingAddrs, RingError, RingState, SplitRing, MAX_SEGS};
