//! DMA faults: what was refused, for whom, and why. Recorded and counted, never a panic.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The direction of an access, as the device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// The device reads guest memory (a packet to transmit).
    Read,
    /// The device writes guest memory (a received packet).
    Write,
}

/// Read and write permission of a mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Perm {
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
}

impl Perm {
    /// Read only.
    pub const RO: Perm = Perm { read: true, write: false };
    /// Write only.
    pub const WO: Perm = Perm { read: false, write: true };
    /// Read and write.
    pub const RW: Perm = Perm { read: true, write: true };

    /// Whether `access` is allowed.
    #[inline(always)]
    pub fn allows(self, access: Access) -> bool {
        match access {
            Access::Read => self.read,
            Access::Write => self.write,
        }
    }
}

/// Why an access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// Nothing is mapped at the address.
    NotMapped,
    /// Mapped, but not for this direction.
    Permission,
    /// The range starts mapped but runs past what one contiguous mapping covers.
    CrossesBoundary,
}

impl fmt::Display for FaultReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultReason::NotMapped => "not mapped",
            FaultReason::Permission => "permission denied",
            FaultReason::CrossesBoundary => "crosses a mapping boundary",
        })
    }
}

/// A refused access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The domain (guest, or device context) whose address it was.
    pub domain: u32,
    /// The address (IOVA or guest-physical) as the device gave it.
    pub addr: u64,
    /// Bytes asked for.
    pub len: u64,
    /// Direction.
    pub access: Access,
    /// Why it was refused.
    pub reason: FaultReason,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "domain {}: {:?} of {} bytes at {:#x}: {}",
            self.domain, self.access, self.len, self.addr, self.reason
        )
    }
}

/// How many recent faults a log keeps.
pub const FAULT_LOG_LEN: usize = 64;

/// Fault counters by reason and the most recent faults (a bounded log, like a hardware
/// IOMMU's fault recording registers: old entries are overwritten, the counters never are).
#[derive(Debug, Default)]
pub struct FaultLog {
    not_mapped: AtomicU64,
    permission: AtomicU64,
    crosses: AtomicU64,
    recent: Mutex<VecDeque<Fault>>,
}

impl FaultLog {
    /// Records a fault (faults are rare and already the slow path: a lock is fine).
    pub fn record(&self, f: Fault) {
        let c = match f.reason {
            FaultReason::NotMapped => &self.not_mapped,
            FaultReason::Permission => &self.permission,
            FaultReason::CrossesBoundary => &self.crosses,
        };
        c.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut r) = self.recent.lock() {
            if r.len() == FAULT_LOG_LEN {
                r.pop_front();
            }
            r.push_back(f);
        }
    }

    /// Faults so far: (not mapped, permission, crossing a boundary).
    pub fn counts(&self) -> (u64, u64, u64) {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (r(&self.not_mapped), r(&self.permission), r(&self.crosses))
    }

    /// The most recent faults, oldest first.
    pub fn recent(&self) -> Vec<Fault> {
        self.recent.lock().map(|r| r.iter().copied().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_log_keeps_counting_after_it_wraps() {
        let log = FaultLog::default();
        for i in 0..100u64 {
            let reason = if i % 2 == 0 { FaultReason::NotMapped } else { FaultReason::Permission };
            log.record(Fault { domain: 1, addr: i, len: 1, access: Access::Write, reason });
        }
        assert_eq!(log.counts(), (50, 50, 0));
        let r = log.recent();
        assert_eq!(r.len(), FAULT_LOG_LEN);
        assert_eq!(r.last().unwrap().addr, 99);
        assert!(r[0].to_string().contains("domain 1"));
    }

    #[test]
    fn test_perm_allows() {
        assert!(Perm::RO.allows(Access::Read) && !Perm::RO.allows(Access::Write));
        assert!(Perm::WO.allows(Access::Write) && !Perm::WO.allows(Access::Read));
    }
}
