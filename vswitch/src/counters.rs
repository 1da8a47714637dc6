//! Counters: one list per kind, from which the live atomics, the snapshot `ctl` and the
//! harness read, and its sum over queues are all made (a counter added here appears in every
//! one of them).

use std::sync::atomic::{AtomicU64, Ordering};

/// Single-writer add: a plain load and store, no locked instruction.
#[inline(always)]
pub fn bump(c: &AtomicU64, n: u64) {
    if n != 0 {
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }
}

/// Why a packet was dropped: each reason is one counter of a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The destination had no (or too few) buffers, its device queue was full, or it is down.
    NoBuffer,
    /// Malformed: a bad chain, a runt, a refused offload request, a frame the kernel refused.
    Malformed,
    /// The port's VLAN rule does not allow it.
    Filtered,
    /// Nowhere to go (only the source, or an empty VLAN).
    NoRoute,
    /// The port's policy: anti-spoofing, the policer, the shaper's full queue.
    Policy,
}

impl DropReason {
    /// Every reason, in the order `ctl stats` shows them.
    pub const ALL: [DropReason; 5] = [
        DropReason::NoBuffer,
        DropReason::Malformed,
        DropReason::Filtered,
        DropReason::NoRoute,
        DropReason::Policy,
    ];

    /// Its name in `ctl stats` and the JSON counters (`drop_` + name).
    pub fn name(self) -> &'static str {
        match self {
            DropReason::NoBuffer => "no_buffer",
            DropReason::Malformed => "malformed",
            DropReason::Filtered => "filtered",
            DropReason::NoRoute => "no_route",
            DropReason::Policy => "policy",
        }
    }
}

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
    /// Packets a NIC model's DMA engine wrote into this queue's buffers (Level 1: the device
    /// steered them from the wire; no CPU copy).
    device_dma,
    /// Interrupts sent to the guest.
    interrupts,
    /// TCP frames of up to 64 KiB delivered whole (the receiver negotiated TSO).
    gso_whole,
    /// TCP frames of up to 64 KiB cut into segments in software for this receiver.
    gso_segmented,
    /// Checksums completed in software for this receiver.
    csum_completed,
}

impl QueueStats {
    /// The counter of drops for `why`.
    #[inline(always)]
    pub fn drops(&self, why: DropReason) -> &AtomicU64 {
        match why {
            DropReason::NoBuffer => &self.drop_no_buffer,
            DropReason::Malformed => &self.drop_malformed,
            DropReason::Filtered => &self.drop_filtered,
            DropReason::NoRoute => &self.drop_no_route,
            DropReason::Policy => &self.drop_policy,
        }
    }

    /// Counts `n` drops for `why` (single writer: the queue's holder).
    #[inline(always)]
    pub fn drop(&self, why: DropReason, n: u64) {
        bump(self.drops(why), n);
    }
}

impl QueueCounters {
    /// Drops for `why`.
    pub fn drops(&self, why: DropReason) -> u64 {
        match why {
            DropReason::NoBuffer => self.drop_no_buffer,
            DropReason::Malformed => self.drop_malformed,
            DropReason::Filtered => self.drop_filtered,
            DropReason::NoRoute => self.drop_no_route,
            DropReason::Policy => self.drop_policy,
        }
    }

    /// Drops for every reason.
    pub fn dropped(&self) -> u64 {
        DropReason::ALL.iter().map(|&r| self.drops(r)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_each_drop_reason_has_its_own_counter_under_its_name() {
        let s = QueueStats::default();
        for (k, r) in DropReason::ALL.iter().enumerate() {
            s.drop(*r, k as u64 + 1);
        }
        let c = s.snapshot();
        let json = serde_json::to_value(c).expect("serialises");
        for (k, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(c.drops(*r), k as u64 + 1);
            assert_eq!(json[format!("drop_{}", r.name())], k as u64 + 1, "{r:?}");
        }
        assert_eq!(c.dropped(), 15);
    }
}
