//! Counters: one list per kind, from which the live atomics, the snapshot `ctl` and the
//! harness read, and its sum over queues are all made (a counter added here appears in every
//! one of them).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! queue_counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Counters of one queue. Written by whichever polling thread holds the queue (one at
        /// a time), with plain load+store rather than locked adds; read by anyone.
        #[derive(Debug, Default)]
        pub struct QueueStats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A snapshot of queue counters, plain numbers (see [`QueueStats`] for each).
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct QueueCounters {
            $($(#[$doc])* #[serde(default)] pub $name: u64,)*
        }

        impl QueueStats {
            /// Reads every counter.
            pub fn snapshot(&self) -> QueueCounters {
                QueueCounters { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl std::ops::AddAssign for QueueCounters {
            fn add_assign(&mut self, o: Self) {
                $(self.$name += o.$name;)*
            }
        }
    };
}

queue_counters! {
    /// Packets moved: taken from the queue if it is a source (a guest's transmit queue, frames
    /// from an uplink), put into it if it is a sink.
    packets,
    /// Frame bytes moved (without the virtio-net header).
    bytes,
    /// Packets dropped because the destination had no (or too few) buffers, or its device
    /// queue was full.
    drop_no_buffer,
    /// Packets or buffers refused as malformed (bad chain, runt frame, a frame the kernel
    /// refused).
    drop_malformed,
    /// Packets dropped by policy (VLAN not allowed on the port).
    drop_filtered,
    /// Packets with nowhere to go (only destination was the source, or the VLAN is empty).
    drop_no_route,
    /// Packets dropped by the port's policy before any copy: anti-spoofing and the policer on
    /// transmit queues, the shaper's full queue on receive queues (reasons: the port's policy
    /// counters).
    drop_policy,
    /// Packet copies the switch's CPU made into this queue's buffers (one per delivered packet).
    copies,
    /// Bytes the switch's CPU copied into this queue's buffers.
    bytes_copied,
    /// Packets the kernel copied (an uplink: read into the switch's staging buffer, or written
    /// from the sender's buffers straight to the device, the switch copying nothing).
    kernel_copies,
    /// Interrupts sent to the guest.
    interrupts,
    /// TCP frames of up to 64 KiB delivered whole (the receiver negotiated TSO).
    gso_whole,
    /// TCP frames of up to 64 KiB cut into segments in software for this receiver.
    gso_segmented,
    /// Checksums completed in software for this receiver.
    csum_completed,
}
