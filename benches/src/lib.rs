//! Test driver, demo and benchmark harness for the vhost-user L2 switch.
//!
//! * [`frontend`]: the guest side of a virtio-net device over vhost-user (the `netfront`
//!   crate, re-exported under its old path).
//! * [`demo`]: the switch with a built-in topology of frontends, printing live rates.
//! * [`frame`]: synthetic Ethernet/IPv4/UDP frames with sequence numbers.
//! * [`tiers`]: the co-design table, tier 0 against the NIC models' Levels 0 and 1.

pub mod demo;
pub mod frame;
pub mod harness;
pub mod tiers;

pub use netfront as frontend;
