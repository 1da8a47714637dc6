//! Faults a test build injects on purpose, so that a test can show it fails without the
//! mechanism it covers (feature `test-hooks`; the e2e tests enable it). Without the feature
//! every hook is a constant `false` and costs nothing.

#[cfg(feature = "test-hooks")]
static SKIP_RX_LOG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the receive path leaves the frames it copies into a migrating guest out of the
/// dirty log (a broken log: the destination keeps stale pages).
#[inline(always)]
pub fn skip_rx_log() -> bool {
    #[cfg(feature = "test-hooks")]
    return SKIP_RX_LOG.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(feature = "test-hooks"))]
    false
}

/// Breaks (or mends) the dirty log of received frames, process-wide.
#[cfg(feature = "test-hooks")]
pub fn set_skip_rx_log(on: bool) {
    SKIP_RX_LOG.store(on, std::sync::atomic::Ordering::Relaxed);
}
