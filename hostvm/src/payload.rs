//! The built-in guest payload: hostvm's "application-specific OS".
//!
//! A `no_std` Rust program (`hostvm/payload/main.rs`) embedded in hostvm, started directly in
//! 64-bit ring 3. It drives its NICs with a polling virtio-net driver over virtio-mmio and
//! plays one [`Role`]. Its parameter block ([`abi::Params`]) is both its orders and its
//! report: hostvm reads the counters out of guest memory while it runs.

use std::fmt;
use std::io::Cursor;
use std::str::FromStr;

use linux_loader::loader::{elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestRam;
use crate::{Error, Result};

/// The payload ABI shared with the guest program.
#[path = "../payload/abi.rs"]
pub mod abi;

/// The payload ELF, built by `build.rs`.
pub static ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/payload.elf"));

/// Top of the payload's stack (it grows down towards the image at 1 MiB).
pub const STACK_TOP: u64 = 0x80_0000;
/// Start of the memory the payload may use for rings and buffers.
pub const HEAP_START: u64 = 0x100_0000;

/// What the payload does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Send each frame back with MACs swapped.
    Echo,
    /// NIC 0 ↔ NIC 1, unchanged.
    Forward,
    /// Count frames.
    Sink,
    /// Send `count` test frames.
    Send,
}

impl Role {
    fn code(self) -> u32 {
        match self {
            Role::Echo => abi::role::ECHO,
            Role::Forward => abi::role::FORWARD,
            Role::Sink => abi::role::SINK,
            Role::Send => abi::role::SEND,
        }
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Role, String> {
        match s {
            "echo" => Ok(Role::Echo),
            "forward" => Ok(Role::Forward),
            "sink" => Ok(Role::Sink),
            "send" => Ok(Role::Send),
            _ => Err(format!("unknown payload `{s}`: expected echo, forward, sink or send")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Echo => "echo",
            Role::Forward => "forward",
            Role::Sink => "sink",
            Role::Send => "send",
        })
    }
}

/// The payload's orders.
#[derive(Clone, Debug)]
pub struct PayloadConfig {
    /// Its role.
    pub role: Role,
    /// Frames to send (send) or to receive before finishing (sink; 0 = run until stopped).
    pub count: u64,
    /// Frame length for send.
    pub frame_len: u32,
    /// Destination MAC for send.
    pub dst_mac: [u8; 6],
    /// Never idle (benchmarks).
    pub busy_poll: bool,
    /// Descriptors per queue (power of two, 2-256).
    pub queue_size: u32,
    /// Frames per second for send (0: as fast as the ring allows).
    pub rate_pps: u64,
}

impl Default for PayloadConfig {
    fn default() -> Self {
        PayloadConfig {
            role: Role::Echo,
            count: 0,
            frame_len: 64,
            dst_mac: [0xff; 6],
            busy_poll: false,
            queue_size: 256,
            rate_pps: 0,
        }
    }
}

impl PayloadConfig {
    /// Checks the orders against `nics` NICs.
    pub fn validate(&self, nics: usize) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if nics == 0 || nics > abi::MAX_NICS {
            return bad(format!("the payload drives 1 to {} NICs (--net), not {nics}", abi::MAX_NICS));
        }
        if self.role == Role::Forward && nics < 2 {
            return bad("--payload forward needs two --net NICs (it forwards NIC 0 <-> NIC 1)".into());
        }
        if self.role == Role::Send && !(60..=1514).contains(&self.frame_len) {
            return bad(format!("--frame-len {} is outside 60..=1514", self.frame_len));
        }
        if !(2..=256).contains(&self.queue_size) || !self.queue_size.is_power_of_two() {
            return bad(format!("--queue-size {} must be a power of two from 2 to 256", self.queue_size));
        }
        Ok(())
    }
}

/// Loads the payload into `ram` and writes its parameter block; returns the entry point.
/// `tsc_khz` is the guest's TSC frequency (for pacing; 0 if unknown).
pub fn load(ram: &GuestRam, cfg: &PayloadConfig, nics: &[(u64, [u8; 6])], tsc_khz: u64) -> Result<u64> {
    cfg.validate(nics.len())?;
    if cfg.rate_pps > 0 && tsc_khz == 0 {
        return Err(Error::Config(
            "--rate needs the guest TSC frequency, which this KVM does not report".into(),
        ));
    }
    let load_err = |reason: String| Error::Load { what: "payload", path: "(built in)".into(), reason };
    let res = Elf::load(ram.mem(), None, &mut Cursor::new(ELF), None).map_err(|e| load_err(e.to_string()))?;
    if res.kernel_end > STACK_TOP - 0x1_0000 {
        return Err(load_err(format!("image ends at {:#x}, into its stack", res.kernel_end)));
    }
    let mem_end = ram.low_end();
    if mem_end < HEAP_START + (8 << 20) {
        return Err(Error::Config(format!(
            "the payload needs at least {} MiB of guest memory (--mem)",
            (HEAP_START + (8 << 20)) >> 20
        )));
    }
    let mut p = abi::Params {
        magic: abi::MAGIC,
        version: abi::VERSION,
        role: cfg.role.code(),
        nics: nics.len() as u32,
        flags: if cfg.busy_poll { abi::flags::BUSY_POLL } else { 0 },
        count: cfg.count,
        frame_len: cfg.frame_len,
        queue_size: cfg.queue_size,
        rate_pps: cfg.rate_pps,
        tsc_khz,
        mem_start: HEAP_START,
        mem_end,
        ..Default::default()
    };
    p.dst_mac[..6].copy_from_slice(&cfg.dst_mac);
    for (i, (mmio, mac)) in nics.iter().enumerate() {
        p.nic[i] = abi::NicParams { mmio: *mmio, mac: *mac, _pad: [0; 2] };
    }
    write_params(ram, &p)?;
    // The ELF entry is `_start`, placed first in .text.
    elf_entry(ELF).ok_or_else(|| load_err("no ELF entry point".into()))
}

fn elf_entry(elf: &[u8]) -> Option<u64> {
    let b = elf.get(24..32)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

fn write_params(ram: &GuestRam, p: &abi::Params) -> Result<()> {
    // SAFETY: `Params` is repr(C) plain data; viewing it as bytes is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts((p as *const abi::Params).cast::<u8>(), std::mem::size_of::<abi::Params>())
    };
    ram.mem()
        .write_slice(bytes, GuestAddress(abi::PARAMS_GPA))
        .map_err(|e| Error::Config(format!("writing the payload parameters: {e}")))
}

/// Reads the payload's parameter block (state and counters) out of guest memory.
pub fn read_params(ram: &GuestRam) -> Option<abi::Params> {
    let mut p = abi::Params::default();
    // SAFETY: `Params` is repr(C) plain data of integers and byte arrays: any bit pattern is
    // a valid value, so filling it from bytes is sound.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            (&mut p as *mut abi::Params).cast::<u8>(),
            std::mem::size_of::<abi::Params>(),
        )
    };
    ram.mem().read_slice(bytes, GuestAddress(abi::PARAMS_GPA)).ok()?;
    Some(p)
}

/// Asks the payload to stop (it finishes its loop and exits through the exit port).
pub fn request_stop(ram: &GuestRam) {
    let off = std::mem::offset_of!(abi::Params, stop) as u64;
    let _ = ram.mem().write_obj(1u32, GuestAddress(abi::PARAMS_GPA + off));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_payload_loads_at_1mib_and_params_round_trip() {
        let ram = GuestRam::new(64 << 20, false).unwrap();
        let cfg = PayloadConfig { role: Role::Send, count: 7, frame_len: 128, ..Default::default() };
        let entry = load(&ram, &cfg, &[(0xd000_0000, [2, 0, 0, 0, 0, 1])], 1_000_000).unwrap();
        assert!((0x10_0000..0x20_0000).contains(&entry), "entry {entry:#x}");
        // The entry's first bytes are code, loaded from the image.
        let mut code = [0u8; 4];
        ram.mem().read_slice(&mut code, GuestAddress(entry)).unwrap();
        assert_ne!(code, [0; 4]);
        let p = read_params(&ram).unwrap();
        assert_eq!(
            (p.magic, p.version, p.role, p.nics, p.count),
            (abi::MAGIC, abi::VERSION, abi::role::SEND, 1, 7)
        );
        assert_eq!(p.nic[0].mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(p.mem_end, 64 << 20);
        request_stop(&ram);
        assert_eq!(read_params(&ram).unwrap().stop, 1);
    }

    #[test]
    fn bad_orders_are_refused_with_the_option_to_fix() {
        let ok = PayloadConfig::default();
        assert!(ok.validate(1).is_ok());
        let e = |c: PayloadConfig, n| c.validate(n).unwrap_err().to_string();
        assert!(e(PayloadConfig { role: Role::Forward, ..ok.clone() }, 1).contains("two --net"));
        assert!(e(PayloadConfig { role: Role::Send, frame_len: 20, ..ok.clone() }, 1).contains("--frame-len"));
        assert!(e(PayloadConfig { queue_size: 100, ..ok.clone() }, 1).contains("--queue-size"));
        assert!(e(ok.clone(), 0).contains("--net"));
        assert!(e(ok, 5).contains("--net"));
        assert!("bounce".parse::<Role>().unwrap_err().contains("echo, forward, sink or send"));
    }
}
