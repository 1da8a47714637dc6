//! Error type of the session and the polling frontend.

use std::io;
use std::path::PathBuf;

/// Errors raised while setting up or controlling the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Creating, sizing or mapping the shared memory failed.
    #[error("guest memory: {what}: {source}")]
    Memory {
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Rings and buffers do not fit into `mem_size`.
    #[error("guest memory too small: need {needed} bytes, have {have}")]
    MemoryTooSmall {
        /// Bytes required by the layout.
        needed: usize,
        /// Configured `mem_size`.
        have: usize,
    },
    /// Connecting to or accepting on the vhost-user socket failed.
    #[error("vhost-user socket {path}: {source}")]
    Socket {
        /// Socket path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The wait for a peer was cancelled.
    #[error("vhost-user socket {path}: stopped while waiting for a connection")]
    Stopped {
        /// Socket path.
        path: PathBuf,
    },
    /// The backend has fewer memory slots than there are regions to register.
    #[error("backend has {slots} memory slots, {regions} regions need registering")]
    TooFewMemSlots {
        /// GET_MAX_MEM_SLOTS.
        slots: u64,
        /// Regions to register.
        regions: usize,
    },
    /// No peer within the timeout.
    #[error("vhost-user socket {path}: no connection within {timeout_ms} ms")]
    ConnectTimeout {
        /// Socket path.
        path: PathBuf,
        /// The timeout that elapsed.
        timeout_ms: u128,
    },
    /// A vhost-user request failed (I/O error, timeout, bad reply or NACK).
    #[error("vhost-user {request} failed: {source}")]
    Protocol {
        /// The request that failed.
        request: &'static str,
        /// The error reported by the vhost crate.
        source: vhost::Error,
    },
    /// The backend did not complete a request within `control_timeout`; the
    /// control socket has been shut down.
    #[error("vhost-user {request}: no answer within {timeout_ms} ms")]
    ControlTimeout {
        /// The request that timed out.
        request: &'static str,
        /// The timeout that elapsed.
        timeout_ms: u128,
    },
    /// A vhost-user request sent without the vhost crate failed.
    #[error("vhost-user {request} failed: {source}")]
    RawProtocol {
        /// The request that failed.
        request: &'static str,
        /// The I/O error.
        source: io::Error,
    },
    /// The backend cannot provide what the configuration asks for.
    #[error("backend does not support {0}")]
    Unsupported(String),
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(io::Error),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Wraps a vhost crate error with the name of the request that failed.
pub(crate) fn proto(request: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::Protocol { request, source }
}
