//! hostvm: a small KVM host whose guests' NICs are vhost-user ports of the switch.
//!
//! In the spirit of Firecracker: one process per VM, a few devices, no emulation on the data
//! path. Guest memory is a memfd (or 2 MiB hugetlbfs pages) mapped shared, registered with
//! KVM and offered to the switch in the vhost-user memory table. Each NIC is a virtio-mmio
//! device whose queues the switch serves directly: the queue-notify register is a KVM
//! ioeventfd (the switch's kick), the switch's call eventfd is a KVM irqfd, so packets never
//! pass through this process.
//!
//! * [`info`]: how this host's KVM virtualizes the MMU (EPT/NPT, shadow paging, PVM) and what
//!   it offers.
//! * [`memory`]: guest RAM and its layout.
//! * [`vm`]: VM and vCPU set-up and the run loop.
//! * [`net`]: the virtio-mmio NIC and its vhost-user connection to the switch.
//! * [`migrate`]: live migration of a payload VM to another hostvm process.
//! * [`payload`]: the built-in guest program (ring 3, polling virtio-net driver; roles echo,
//!   forward, sink, send).
//! * [`linux`]: Linux boot (PVH `vmlinux`, 64-bit bzImage).
#![deny(missing_docs)]

pub mod acpi;
pub mod error;
pub mod info;
pub mod layout;
pub mod linux;
pub mod memory;
pub mod migrate;
pub mod mmio;
pub mod net;
pub mod payload;
mod serial;
mod vcpu;
pub mod vm;

pub use error::{Error, Result};
