//! Uplinks: ports whose other side is the host's network stack rather than a guest.
//!
//! An uplink queue is a source (frames the kernel hands the switch) and a sink (frames the
//! switch hands the kernel) like any other queue; the burst matches its kind once per burst.
//! The one copy of a frame is the kernel's where it can be: writes go out straight from the
//! sending guest's buffers (vectored I/O over the grants the chain walk made).

pub mod afpacket;
pub mod afxdp;
pub mod bpf;
pub mod link;
pub mod nic;
pub mod soft;
pub mod tap;
pub mod tunnel;
pub mod vni_group;
