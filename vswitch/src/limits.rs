//! Sizes the whole switch agrees on: one home, so the rings, the burst and the uplinks do not
//! import them from each other.

/// Most packets taken from one source queue at once.
pub const BURST: usize = 32;
/// Largest frame accepted without segmentation offload (jumbo 9216 plus a tag), without the
/// virtio-net header.
pub const MAX_FRAME: u32 = 9220;
