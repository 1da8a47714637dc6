//! Rate control for the per-packet path: token buckets, policers, shapers and a scheduler.
//!
//! ```text
//!              bytes ─┐                      ┌─ green  → pass
//!  packet ──► [ TokenBucket(s) ] ─ Policer ──┼─ yellow → pass (may be marked)
//!                    │                       └─ red    → drop
//!                    └─ Shaper: conforming → send now; otherwise → bounded FIFO → released
//!                                as tokens come back; FIFO full → drop-tail (counted)
//!  several queues of one port ──► Drr (weights) ──► which queue sends next
//! ```
//!
//! Everything is exact integer arithmetic on nanosecond timestamps that the caller passes in,
//! so tests drive time themselves ([`ManualClock`]) and the datapath reads the real clock
//! ([`MonotonicClock`]) once per burst, not per packet. Nothing here allocates after
//! construction, locks, or makes a syscall.

#![deny(missing_docs)]

mod bucket;
mod clock;
mod drr;
mod policer;
mod shaper;

pub use bucket::{BucketError, RateLimiter, TokenBucket};
pub use clock::{Clock, ManualClock, MonotonicClock, NANOS_PER_SEC};
pub use drr::{Drr, DrrError};
pub use policer::{Colour, Policer, PolicerCounters, SrTcm, TrTcm};
pub use shaper::{Offer, Shaper, ShaperCounters};
