//! Why a policy setting was refused: each message says what was wrong and what to write.

use super::units::UnitError;

/// A refused policy setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// burst too small
    #[error("{what} burst {burst} B is below {min} B: a full-size frame could never pass")]
    BurstTooSmall {
        /// "ingress" or "egress".
        what: &'static str,
        /// The burst asked for.
        burst: u64,
        /// The smallest allowed.
        min: u64,
    },
    /// zero rate
    #[error("{what} rate must be above 0 (remove the {what} setting for no limit)")]
    ZeroRate {
        /// "ingress" or "egress".
        what: &'static str,
    },
    /// a token bucket refused its parameters
    #[error("{what}: {source}")]
    Bucket {
        /// "ingress policer" or "egress shaper".
        what: &'static str,
        /// The bucket's reason.
        source: shaping::BucketError,
    },
    /// pps with a two-colour policer
    #[error("ingress: pps applies to the single-rate policer only (drop excess_burst/excess_rate, or pps)")]
    PpsNeedsSingleRate,
    /// shaper queue out of range
    #[error("egress queue {queue} is outside 1..{max} packets")]
    QueueRange {
        /// The queue length asked for.
        queue: u32,
        /// The longest allowed.
        max: u32,
    },
    /// bad MAC
    #[error("allowed MAC '{0}' is not of the form 52:54:00:12:34:56")]
    BadMac(String),
    /// group MAC
    #[error("allowed MAC '{0}' is a group address; a guest never sends from one")]
    GroupMac(String),
    /// bad prefix length
    #[error("'{0}': bad prefix length")]
    BadPrefixLen(String),
    /// bad address
    #[error("'{0}' is not an IPv4 or IPv6 address")]
    BadIp(String),
    /// prefix too long
    #[error("'{text}': prefix length {len} is longer than {max}")]
    PrefixTooLong {
        /// What the user wrote.
        text: String,
        /// Its prefix length.
        len: u8,
        /// The address family's bits.
        max: u8,
    },
    /// a rate or size that does not parse
    #[error(transparent)]
    Unit(#[from] UnitError),
}
