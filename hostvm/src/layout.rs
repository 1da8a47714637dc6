//! The guest-physical address map.
//!
//! ```text
//! 0x0000_0000  RAM (low)                 boot structures, kernel or payload, initrd
//! 0xc000_0000  MMIO hole (1 GiB)         virtio-mmio NICs at 0xd000_0000 + 4 KiB * n
//! 0x1_0000_0000 RAM (high)               whatever exceeds 3 GiB
//! ```
//! Legacy devices are on I/O ports: COM1 at 0x3f8 (IRQ 4), the payload's ports at 0x501-0x503.

/// Start of the MMIO hole (end of low RAM).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the MMIO hole (start of high RAM).
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Base of the first virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of (and stride between) virtio-mmio windows.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// GSI of the first virtio-mmio device (one per device after it).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Most NICs per VM.
pub const MAX_NICS: usize = 4;

/// COM1's first port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's GSI.
pub const COM1_IRQ: u32 = 4;

/// KVM's TSS (three pages), needed on Intel before an in-kernel irqchip; in the MMIO hole.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// The virtio-mmio window of NIC `i`.
pub fn nic_mmio(i: usize) -> u64 {
    VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE * i as u64
}

/// Guest RAM ranges `(start, len)` for `size` bytes of memory.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![(0, MMIO_HOLE_START), (HIGH_RAM_START, size - MMIO_HOLE_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_ranges(5 << 30), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        assert!(nic_mmio(MAX_NICS - 1) + VIRTIO_MMIO_SIZE <= KVM_TSS_ADDR);
    }
}
