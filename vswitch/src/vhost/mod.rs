//! The vhost-user protocol for one port: feature negotiation, memory tables, vring setup.
//!
//! rust-vmm's `vhost` crate parses and validates messages and calls [`VhostDevice`]'s methods;
//! this module turns them into running queues installed in the port's slots. Every change to a
//! running queue happens under that queue's slot lock, so a polling thread sees the old queue
//! or the new one, never half of each, and ring positions carry over.

mod device;
pub mod dirty_log;
pub mod eventfd;
pub mod iotlb;
pub(crate) mod wire;

pub use device::{DeviceInfo, DirtyLogInfo, MemPolicy, VhostDevice, MAX_MEM_SLOTS};
