//! A polling userspace L2 switch for virtio-net guests over vhost-user.
//!
//! Layout follows the datapath: [`virtio`] (rings and chains over guest memory), [`l2`]
//! (forwarding table, VLAN rules), [`pmd`] (the polling threads and the burst: receive →
//! describe → decide → deliver → complete), [`vhost`] (the vhost-user protocol per port),
//! [`policy`] (policers, shapers, anti-spoofing per port), [`switch`] (ports, the control
//! thread), [`control`] (the JSON control socket).
#![deny(missing_docs)]

pub mod accel;
pub mod clock;
pub mod config;
pub mod control;
pub mod counters;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod l2;
pub mod limits;
pub mod offload;
pub mod pmd;
pub mod policy;
pub mod port;
pub mod switch;
pub mod sync;
pub mod test_hooks;
pub mod uplink;
pub mod vhost;
pub mod virtio;
pub mod watchdog;

pub use config::{PortConfig, SwitchConfig, UnsealedMemory};
pub use switch::{Switch, SwitchError};
