//! The vhost-user IOTLB protocol, which the `vhost` crate does not implement
//! (rust-vmm/vhost#312): `IOTLB_MSG` from the frontend (updates and invalidations), miss
//! requests to it over the backend channel (`SET_BACKEND_REQ_FD`), and what a queue keeps to
//! ask without flooding the frontend.
//!
//! Wire format (vhost-user spec, "IOTLB message"): after the 12-byte header, a
//! `struct vhost_iotlb_msg { u64 iova; u64 size; u64 uaddr; u8 perm; u8 type; }`, 32 bytes
//! with padding.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};

pub use iommu::iotlb_msg::{
    IotlbMsg, ACCESS_RO, ACCESS_RW, ACCESS_WO, IOTLB_ACCESS_FAIL, IOTLB_INVALIDATE, IOTLB_MISS,
    IOTLB_MSG_LEN, IOTLB_UPDATE,
};
/// `VHOST_USER_BACKEND_IOTLB_MSG` on the backend channel.
const BACKEND_IOTLB_MSG: u32 = 1;

/// IOTLB activity of one connection, shared by the device and its queues.
#[derive(Debug, Default)]
pub struct IotlbStats {
    /// Miss requests sent to the frontend.
    pub misses_sent: AtomicU64,
    /// Miss requests that could not be sent (no backend channel, or it was full or closed).
    pub misses_unsent: AtomicU64,
    /// Packets parked because their receive buffer's IOVA was not translated yet (delivered
    /// in order once it is).
    pub rx_parked: AtomicU64,
    /// Packets dropped waiting for a receive buffer's translation: more than
    /// [`PARK_MAX`] parked, or parked longer than [`MISS_TIMEOUT_NS`].
    pub rx_miss_drops: AtomicU64,
    /// Transmit chains given up after waiting [`MISS_TIMEOUT_NS`] for a translation.
    pub tx_miss_timeouts: AtomicU64,
}

/// Counters of a connection's IOTLB, plain numbers (for `ctl ports`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IotlbInfo {
    /// Entries held (the device's copy).
    pub entries: u64,
    /// Updates applied.
    pub updates: u64,
    /// Updates refused (outside the frontend's memory, empty, no permission).
    pub refused: u64,
    /// Invalidations applied.
    pub invalidations: u64,
    /// Entries evicted to stay within the bound.
    pub evictions: u64,
    /// See [`IotlbStats::misses_sent`].
    pub misses_sent: u64,
    /// See [`IotlbStats::misses_unsent`].
    pub misses_unsent: u64,
    /// See [`IotlbStats::rx_parked`].
    #[serde(default)]
    pub rx_parked: u64,
    /// See [`IotlbStats::rx_miss_drops`].
    pub rx_miss_drops: u64,
    /// See [`IotlbStats::tx_miss_timeouts`].
    pub tx_miss_timeouts: u64,
    /// DMA faults by reason: not mapped, permission, crossing a mapping boundary.
    pub faults_not_mapped: u64,
    /// See `faults_not_mapped`.
    pub faults_permission: u64,
    /// See `faults_not_mapped`.
    pub faults_crossing: u64,
    /// The most recent faults, as text.
    #[serde(default)]
    pub recent_faults: Vec<String>,
}

/// The backend channel: the socket the frontend gave with `SET_BACKEND_REQ_FD`. Misses are
/// sent without waiting for a reply and without blocking (a full socket loses the request; the
/// queue asks again).
#[derive(Debug)]
pub struct BackendChannel {
    sock: UnixStream,
}

impl BackendChannel {
    /// Wraps the socket.
    pub fn new(sock: UnixStream) -> Self {
        BackendChannel { sock }
    }

    /// Sends one IOTLB message (no reply asked). False if it could not be sent whole.
    pub fn send(&self, m: &IotlbMsg) -> bool {
        let mut buf = [0u8; 12 + IOTLB_MSG_LEN];
        buf[0..4].copy_from_slice(&BACKEND_IOTLB_MSG.to_le_bytes());
        buf[4..8].copy_from_slice(&1u32.to_le_bytes()); // version 1, no flags
        buf[8..12].copy_from_slice(&(IOTLB_MSG_LEN as u32).to_le_bytes());
        buf[12..].copy_from_slice(&m.encode());
        // SAFETY: sends from a local buffer on a socket we own; never blocks.
        let n = unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        n == buf.len() as isize
    }
}

/// Ask again for the same page no sooner than this.
pub const RESEND_NS: u64 = 20_000_000;
/// A transmit chain waiting this long for a translation is dropped as a fault: the frontend
/// has none to give (QEMU answers a miss it cannot translate with nothing at all).
pub const MISS_TIMEOUT_NS: u64 = 1_000_000_000;

/// What a queue in IOVA mode keeps for misses.
#[derive(Debug)]
pub struct IotlbLink {
    channel: Option<std::sync::Arc<BackendChannel>>,
    stats: std::sync::Arc<IotlbStats>,
    /// Pages asked for recently, and when (a small ring: the requests still in flight).
    asked: [(u64, u64); ASKED],
    /// Where the next request goes in `asked`.
    next_ask: usize,
    /// The transmit head waiting for a translation, and since when.
    stall: Option<(u16, u64)>,
    /// Receive queues: the ring position up to which posted buffers were looked at.
    pub rx_checked: Option<u16>,
    /// Receive queues: frames waiting for a buffer's translation, oldest first (each the
    /// frame as it will be delivered, without the virtio-net header, and when it was parked).
    pub parked: std::collections::VecDeque<(Vec<u8>, u64)>,
}

/// Requests one queue remembers to ask each page once per [`RESEND_NS`].
const ASKED: usize = 32;

/// Most frames one receive queue parks while its buffers' translations are asked for.
pub const PARK_MAX: usize = 256;

impl IotlbLink {
    /// A link over `channel` (None until the frontend sets one up: misses are then counted
    /// unsent, and the queue waits for updates the frontend sends on its own).
    pub fn new(channel: Option<std::sync::Arc<BackendChannel>>, stats: std::sync::Arc<IotlbStats>) -> Self {
        IotlbLink {
            channel,
            stats,
            asked: [(u64::MAX, 0); ASKED],
            next_ask: 0,
            stall: None,
            rx_checked: None,
            parked: Default::default(),
        }
    }

    /// The shared counters.
    pub fn stats(&self) -> &IotlbStats {
        &self.stats
    }

    /// Asks the frontend for `iova`: once per [`RESEND_NS`] for each of the last pages asked
    /// for (a look-ahead over the ring and the misses of the datapath would otherwise repeat
    /// requests still in flight, and a frontend slow to answer would find its channel full of
    /// them). A request the channel had no room for is not remembered: the next miss tries
    /// again.
    pub fn miss(&mut self, iova: u64, write: bool, now: u64) {
        let page = iova >> 12;
        if self.asked.iter().any(|&(p, t)| p == page && now.wrapping_sub(t) < RESEND_NS) {
            return;
        }
        let m = IotlbMsg {
            iova,
            size: 0,
            uaddr: 0,
            perm: if write { ACCESS_RW } else { ACCESS_RO },
            kind: IOTLB_MISS,
        };
        let sent = self.channel.as_ref().is_some_and(|c| c.send(&m));
        let c = if sent { &self.stats.misses_sent } else { &self.stats.misses_unsent };
        c.fetch_add(1, Ordering::Relaxed);
        if sent {
            self.asked[self.next_ask] = (page, now);
            self.next_ask = (self.next_ask + 1) % ASKED;
        }
    }

    /// A transmit chain at `head` missed: true while it should wait, false once it has waited
    /// [`MISS_TIMEOUT_NS`] (the caller drops it as a fault).
    pub fn tx_wait(&mut self, head: u16, now: u64) -> bool {
        match self.stall {
            Some((h, since)) if h == head => {
                if now.wrapping_sub(since) < MISS_TIMEOUT_NS {
                    return true;
                }
                self.stall = None;
                self.stats.tx_miss_timeouts.fetch_add(1, Ordering::Relaxed);
                false
            }
            _ => {
                self.stall = Some((head, now));
                true
            }
        }
    }

    /// Whether a transmit chain is waiting for a translation.
    pub fn stalled(&self) -> bool {
        self.stall.is_some()
    }

    /// The transmit queue moved on.
    #[inline(always)]
    pub fn tx_moved(&mut self) {
        self.stall = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_misses_are_sent_once_per_page_and_interval() {
        let (a, b) = UnixStream::pair().unwrap();
        let stats = std::sync::Arc::new(IotlbStats::default());
        let mut l = IotlbLink::new(Some(std::sync::Arc::new(BackendChannel::new(a))), stats.clone());
        l.miss(0x5000, false, 1);
        l.miss(0x5800, false, 2); // same page, too soon
        l.miss(0x9000, true, 3);
        l.miss(0x5000, false, 4); // asked before another page: still in flight
        l.miss(0x9000, true, 3 + RESEND_NS);
        assert_eq!(stats.misses_sent.load(Ordering::Relaxed), 3);
        b.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 3 * 44 + 1];
        let n = std::io::Read::read(&mut &b, &mut buf).unwrap();
        assert_eq!(n, 3 * 44);
        assert_eq!(u32::from_le_bytes(buf[0..4].try_into().unwrap()), 1);
        let m = IotlbMsg::decode(&buf[44 + 12..88]).unwrap();
        assert_eq!((m.iova, m.kind, m.perm), (0x9000, IOTLB_MISS, ACCESS_RW));
    }

    #[test]
    fn test_tx_wait_gives_up_after_the_timeout() {
        let mut l = IotlbLink::new(None, Default::default());
        assert!(l.tx_wait(3, 0));
        assert!(l.tx_wait(3, MISS_TIMEOUT_NS - 1));
        assert!(!l.tx_wait(3, MISS_TIMEOUT_NS));
        assert!(l.tx_wait(3, MISS_TIMEOUT_NS + 1), "a new wait starts");
        l.tx_moved();
        assert!(l.tx_wait(4, 10 * MISS_TIMEOUT_NS));
        assert_eq!(l.stats().tx_miss_timeouts.load(Ordering::Relaxed), 1);
        l.miss(0, false, 0);
        assert_eq!(l.stats().misses_unsent.load(Ordering::Relaxed), 1, "no channel yet");
    }
}
