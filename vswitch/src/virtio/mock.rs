//! The switch's half of the mock guest: [`virtq::mock`]'s guest and rings (re-exported here),
//! plus a running [`VirtQueue`] over a mock ring, split or packed ([`MockQueue`]).

pub use virtq::mock::*;

use super::queue::QueueSetup;
use super::VirtQueue;
use crate::offload::Caps;

/// Builds the switch's queue over a [`MockRing`] or a [`MockPackedRing`].
pub trait MockQueue {
    /// A running device-side queue over this ring.
    fn queue(&self, g: &MockGuest, mrg_rxbuf: bool) -> VirtQueue {
        self.queue_with(g, mrg_rxbuf, Default::default())
    }

    /// A running queue whose guest negotiated the offloads `caps`.
    fn queue_with(&self, g: &MockGuest, mrg_rxbuf: bool, caps: Caps) -> VirtQueue;
}

impl MockQueue for MockRing {
    fn queue_with(&self, g: &MockGuest, mrg_rxbuf: bool, caps: Caps) -> VirtQueue {
        let s = QueueSetup {
            addrs: self.addrs(),
            size: self.size as u32,
            last_avail: 0,
            event_idx: false,
            hdr_len: 12,
            mrg_rxbuf,
            indirect: true,
            caps,
            packed: false,
        };
        VirtQueue::new(g.dma(), &s, None, None).unwrap()
    }
}

impl MockQueue for MockPackedRing {
    fn queue_with(&self, g: &MockGuest, mrg_rxbuf: bool, caps: Caps) -> VirtQueue {
        let s = QueueSetup {
            addrs: self.addrs(),
            size: self.size as u32,
            last_avail: packed_start(),
            event_idx: false,
            hdr_len: 12,
            mrg_rxbuf,
            indirect: true,
            caps,
            packed: true,
        };
        VirtQueue::new(g.dma(), &s, None, None).unwrap()
    }
}

/// Where a fresh packed ring starts: slot 0, wrap counter 1.
pub fn packed_start() -> u16 {
    virtq::packed::WRAP_BIT
}
