//! Test driver, demo and benchmark harness for the vhost-user L2 switch.
//!
//! * [`frontend`]: the guest side of a virtio-net device over vhost-user (the `netfront`
//!   crate, re-exported under its old path).
//! * [`demo`]: the switch with a built-in topology of frontends, printing live rates.
//! * [`frame`]: synthetic Ethernet/IPv4/UDP frames with sequence numbers.

pub mod demo;
pub mod frame;
pub mod harness;

pub use netfront as frontend;
