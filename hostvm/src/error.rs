//! Errors a user of hostvm can act on: each says what failed and what to check.

use std::io;
use std::path::PathBuf;

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can stop a VM from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error(
        "cannot open /dev/kvm: {source}. Check that a KVM module is loaded (kvm_intel, kvm_amd or \
         kvm_pvm) and that this user may read and write /dev/kvm (usually: member of group kvm)"
    )]
    OpenKvm {
        /// The errno.
        source: kvm_ioctls::Error,
    },
    /// The KVM API version is not the stable one.
    #[error("KVM API version {0} is not supported (hostvm needs version 12)")]
    KvmApiVersion(i32),
    /// A capability hostvm cannot do without.
    #[error("this host's KVM lacks {cap}, which hostvm needs {why}")]
    MissingCap {
        /// Capability name.
        cap: &'static str,
        /// What for.
        why: &'static str,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}. {hint}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The errno.
        source: kvm_ioctls::Error,
        /// What to check.
        hint: &'static str,
    },
    /// Guest memory could not be created or mapped.
    #[error("guest memory: {what}: {source}{hint}")]
    Memory {
        /// The step that failed.
        what: String,
        /// The OS error.
        source: io::Error,
        /// What to check (may be empty).
        hint: &'static str,
    },
    /// A bad command-line value or combination.
    #[error("{0}")]
    Config(String),
    /// A kernel or initrd could not be loaded.
    #[error("cannot load {what} {path}: {reason}")]
    Load {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A NIC's vhost-user connection failed.
    #[error("NIC {nic} ({path}): {source}")]
    Net {
        /// NIC index.
        nic: usize,
        /// Its socket.
        path: PathBuf,
        /// What went wrong.
        source: crate::net::NetError,
    },
    /// Another OS call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
}

impl Error {
    /// A [`Error::Kvm`] for `op`, with a hint.
    pub(crate) fn kvm(op: &'static str, hint: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source, hint }
    }

    /// An [`Error::Io`] saying what was being done.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}
