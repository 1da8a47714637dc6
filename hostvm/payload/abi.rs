//! The contract between hostvm and its guest payload.
//!
//! This file is compiled into both: the payload (`no_std`, ring 3 in the guest) and hostvm
//! (which fills in [`Params`] before the first instruction and reads the payload's counters
//! while it runs). Everything here is plain data with a fixed `repr(C)` layout.
//!
//! The payload talks to hostvm through three channels:
//! * [`Params`] at guest-physical [`PARAMS_GPA`]: its orders on entry; its state and
//!   counters while it runs (hostvm reads them from guest memory, no exit needed);
//! * port I/O (the payload runs with IOPL 3, so `out` exits to hostvm): the serial console
//!   at [`COM1`], and the [`PORT_EXIT`], [`PORT_IDLE`] and [`PORT_EVENT`] ports;
//! * its NICs' virtio-mmio registers at [`NicParams::mmio`].

/// Guest-physical (and virtual: the payload runs identity-mapped) address of [`Params`].
pub const PARAMS_GPA: u64 = 0x2000;
/// [`Params::magic`].
pub const MAGIC: u64 = u64::from_le_bytes(*b"HVMPAYLD");
/// [`Params::version`]; bumped on any layout change.
pub const VERSION: u32 = 2;
/// Most NICs a payload drives.
pub const MAX_NICS: usize = 4;

/// First serial port (a 16550); bytes written to its data register appear on hostvm's console.
pub const COM1: u16 = 0x3f8;
/// `out dx, eax` here ends the payload with exit code `eax` (0: success).
pub const PORT_EXIT: u16 = 0x501;
/// `out dx, eax` here: the payload is idle and has re-enabled notifications on its receive
/// queues; hostvm resumes it when one of its NICs is notified, when asked to stop, or after
/// `eax` microseconds, whichever comes first.
pub const PORT_IDLE: u16 = 0x502;
/// `out dx, eax` here reports a one-off [`event`] (hostvm timestamps it).
pub const PORT_EVENT: u16 = 0x503;

/// What the payload does with its NICs ([`Params::role`]).
pub mod role {
    /// Sends every received frame back out of the NIC it came from, MACs swapped.
    pub const ECHO: u32 = 1;
    /// NIC 0 to NIC 1 and back, frames unchanged (testpmd's io forwarding).
    pub const FORWARD: u32 = 2;
    /// Counts received frames; done after [`super::Params::count`] of them (never, if 0).
    pub const SINK: u32 = 3;
    /// Sends [`super::Params::count`] frames of [`super::Params::frame_len`] bytes to
    /// [`super::Params::dst_mac`] out of NIC 0 (the harness's test-frame format), then stops.
    pub const SEND: u32 = 4;
}

/// [`Params::flags`] bits.
pub mod flags {
    /// Never idle: poll the rings continuously (benchmarks).
    pub const BUSY_POLL: u32 = 1;
}

/// [`Params::state`] values.
pub mod state {
    /// Not started, or initialising its NICs.
    pub const INIT: u32 = 0;
    /// NICs ready, frames moving.
    pub const RUNNING: u32 = 1;
    /// Finished its task (or stopped by hostvm).
    pub const DONE: u32 = 2;
    /// Gave up; [`super::Params::error`] says why.
    pub const FAILED: u32 = 3;
}

/// Events reported on [`PORT_EVENT`].
pub mod event {
    /// The payload's first instruction ran.
    pub const STARTED: u32 = 1;
    /// Every NIC reached DRIVER_OK with its buffers posted.
    pub const NICS_READY: u32 = 2;
    /// The first frame arrived.
    pub const FIRST_RX: u32 = 3;
    /// The first frame was handed to a NIC.
    pub const FIRST_TX: u32 = 4;
}

/// [`Params::error`] values (also the exit code).
pub mod error {
    /// [`super::Params`] had the wrong magic, version or a bad field.
    pub const BAD_PARAMS: u32 = 1;
    /// A NIC's registers are not a virtio-mmio version 2 network device.
    pub const NOT_VIRTIO_NET: u32 = 2;
    /// The device refused the features or lacks VERSION_1.
    pub const FEATURES: u32 = 3;
    /// A queue is missing or smaller than the payload needs.
    pub const QUEUE: u32 = 4;
    /// Not enough memory between `mem_start` and `mem_end` for rings and buffers.
    pub const NO_MEMORY: u32 = 5;
}

/// One NIC, as hostvm placed it.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct NicParams {
    /// Guest-physical base of its virtio-mmio register window.
    pub mmio: u64,
    /// Its MAC address (also in its config space).
    pub mac: [u8; 6],
    /// Padding.
    pub _pad: [u8; 2],
}

/// Per-NIC counters, written by the payload.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct NicStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Bytes received (Ethernet frames, without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames handed to the device.
    pub tx_frames: u64,
    /// Bytes handed to the device.
    pub tx_bytes: u64,
    /// Frames not sent because the transmit ring was full.
    pub tx_full: u64,
    /// Used-ring entries the payload refused (bad id or length).
    pub bad_used: u64,
    /// Times the payload went idle through [`PORT_IDLE`] (counted on NIC 0 only).
    pub idles: u64,
    /// Padding to a round size.
    pub _reserved: u64,
}

/// The payload's orders and report, at [`PARAMS_GPA`].
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Params {
    /// [`MAGIC`].
    pub magic: u64,
    /// [`VERSION`].
    pub version: u32,
    /// A [`role`].
    pub role: u32,
    /// NICs in [`Params::nic`] (1 to [`MAX_NICS`]).
    pub nics: u32,
    /// [`flags`] bits.
    pub flags: u32,
    /// Frames to send ([`role::SEND`]) or to receive before stopping ([`role::SINK`]).
    pub count: u64,
    /// Frame length for [`role::SEND`] (60 to 1514 bytes).
    pub frame_len: u32,
    /// Queue size the payload uses (a power of two, at most 256).
    pub queue_size: u32,
    /// Frames per second for [`role::SEND`] (0: as fast as the ring allows).
    pub rate_pps: u64,
    /// The guest TSC frequency in kHz (hostvm reads it from KVM), for pacing.
    pub tsc_khz: u64,
    /// Destination MAC for [`role::SEND`] (two bytes of padding).
    pub dst_mac: [u8; 8],
    /// First free guest-physical byte for the payload's rings and buffers.
    pub mem_start: u64,
    /// End (exclusive) of that free memory.
    pub mem_end: u64,
    /// The NICs.
    pub nic: [NicParams; MAX_NICS],
    /// Set to 1 by hostvm to ask the payload to stop.
    pub stop: u32,
    /// A [`state`], written by the payload.
    pub state: u32,
    /// An [`error`] when `state` is [`state::FAILED`].
    pub error: u32,
    /// Padding.
    pub _pad: u32,
    /// Per-NIC counters, written by the payload.
    pub stats: [NicStats; MAX_NICS],
}
