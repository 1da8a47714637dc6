//! ACPI tables: how a Linux guest finds its CPUs, interrupt controllers, serial port and
//! virtio-mmio NICs, as on Firecracker and QEMU's `microvm` (Debian's kernel has no
//! `virtio_mmio.device=` command-line support, but its `virtio_mmio` driver binds `LNRO0005`
//! devices from the DSDT).
//!
//! The platform is hardware-reduced ACPI (no PM timer, GPEs or fixed buttons). Power-off and
//! reset go through one I/O port, [`PM_PORT`], named in the FADT as the sleep control, sleep
//! status and reset registers; the DSDT's `\_S5_` makes Linux use it for power-off.
//!
//! Tables are built with rust-vmm's `acpi_tables` and placed in the BIOS area at 0xE0000,
//! where the RSDP is also found by a legacy scan; PVH and bzImage boots pass its address too.

use acpi_tables::aml::{
    self, Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{nic_mmio, COM1_IRQ, COM1_PORT, VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE};
use crate::{Error, Result};

/// Where the RSDP goes (the tables follow it, up to [`TABLES_END`]).
pub const RSDP_ADDR: u64 = 0xe_0000;
/// End of the area the tables may use (the BIOS area ends at 1 MiB).
pub const TABLES_END: u64 = 0x10_0000;
/// The power-management port: write `SLP_EN | 5 << 2` to power off (S5), `RESET_VALUE` to reset.
pub const PM_PORT: u16 = 0x600;
/// The FADT's reset value.
pub const RESET_VALUE: u8 = 1;
/// The sleep-enable bit in a sleep control register write (ACPI 6.5, 4.8.3.7).
const SLP_EN: u8 = 1 << 5;
/// The S5 (soft-off) sleep type this DSDT declares.
const S5_TYPE: u8 = 5;

const OEM_ID: [u8; 6] = *b"HOSTVM";
const OEM_TABLE: [u8; 8] = *b"HOSTVM  ";
const OEM_REVISION: u32 = 1;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// IA-PC boot architecture flags: no VGA, no MSI (there is no PCI), no PS/2 controller probe.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_PRESENT: u16 = 1 << 3;
/// DSDT revision 2: 64-bit integers in AML.
const DSDT_REVISION: u8 = 2;

/// What a write to [`PM_PORT`] asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmRequest {
    /// Enter S5: power off.
    PowerOff,
    /// The FADT's reset register: reset.
    Reset,
}

/// Decodes a guest write to [`PM_PORT`]; other values (clearing the wake status, sleep
/// states this platform does not declare) are ignored.
pub fn pm_write(value: u8) -> Option<PmRequest> {
    if value & SLP_EN != 0 {
        return ((value >> 2) & 7 == S5_TYPE).then_some(PmRequest::PowerOff);
    }
    (value == RESET_VALUE).then_some(PmRequest::Reset)
}

/// The tables, each with the guest-physical address it is written at.
pub struct Tables {
    /// `(address, bytes)`, the RSDP first.
    pub tables: Vec<(u64, Vec<u8>)>,
}

impl Tables {
    /// The RSDP's address (what the boot protocols pass on).
    pub fn rsdp(&self) -> u64 {
        self.tables[0].0
    }

    /// Writes them into guest memory.
    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<()> {
        for (addr, bytes) in &self.tables {
            mem.write_slice(bytes, GuestAddress(*addr)).map_err(|e| {
                Error::Config(format!("cannot write the ACPI tables at {addr:#x} ({e}); raise --mem"))
            })?;
        }
        Ok(())
    }
}

/// The DSDT's AML: COM1, one `LNRO0005` device per NIC, and `\_S5_`.
fn dsdt(nics: usize) -> Vec<u8> {
    let mut body = Vec::new();
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_res = ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = EISAName::new("PNP0501");
    Device::new(
        Path::new("\\_SB_.COM1"),
        vec![
            &Name::new(Path::new("_HID"), &com1_hid),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &com1_res),
        ],
    )
    .to_aml_bytes(&mut body);
    for i in 0..nics {
        let base = nic_mmio(i) as u32;
        let irq = VIRTIO_IRQ_BASE + i as u32;
        // Edge-triggered, active high: an irqfd raises the GSI once per signal.
        let window = Memory32Fixed::new(true, base, VIRTIO_MMIO_SIZE as u32);
        let line = Interrupt::new(true, true, false, false, irq);
        let res = ResourceTemplate::new(vec![&window, &line]);
        let uid = i as u8;
        let name = format!("\\_SB_.V{i:03}");
        Device::new(
            Path::new(&name),
            vec![
                &Name::new(Path::new("_HID"), &"LNRO0005"),
                &Name::new(Path::new("_UID"), &uid),
                // Cache-coherent DMA.
                &Name::new(Path::new("_CCA"), &aml::ONE),
                &Name::new(Path::new("_CRS"), &res),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    let s5 = Package::new(vec![&S5_TYPE]);
    Name::new(Path::new("\\_S5_"), &s5).to_aml_bytes(&mut body);

    let mut sdt = Sdt::new(*b"DSDT", 36, DSDT_REVISION, OEM_ID, OEM_TABLE, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let pm = GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(PM_PORT));
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // Set: no fixed power/sleep buttons.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_PRESENT).into();
    b.reset_reg = pm;
    b.reset_value = RESET_VALUE;
    b.sleep_control_reg = pm;
    b.sleep_status_reg = pm;
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut m = MADT::new(OEM_ID, OEM_TABLE, OEM_REVISION, LocalInterruptController::Address(LAPIC_ADDR));
    for id in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let mut out = Vec::new();
    m.to_aml_bytes(&mut out);
    out
}

/// Builds the tables for `cpus` vCPUs and `nics` virtio-mmio NICs.
pub fn build(cpus: u8, nics: usize) -> Result<Tables> {
    let align = |a: u64| (a + 63) & !63;
    let xsdt_addr = align(RSDP_ADDR + Rsdp::len() as u64);
    // XSDT: header plus two entries (FADT, MADT; the DSDT is reached through the FADT).
    let fadt_addr = align(xsdt_addr + 36 + 2 * 8);
    let madt_addr = align(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let madt = madt(cpus);
    let dsdt_addr = align(madt_addr + madt.len() as u64);
    let dsdt = dsdt(nics);
    if dsdt_addr + dsdt.len() as u64 > TABLES_END {
        return Err(Error::Config(format!("{cpus} vCPUs and {nics} NICs do not fit the ACPI table area")));
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    for a in [fadt_addr, madt_addr] {
        xsdt.add_entry(a);
    }
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    Ok(Tables {
        tables: vec![
            (RSDP_ADDR, rsdp),
            (xsdt_addr, xsdt_bytes),
            (fadt_addr, fadt(dsdt_addr)),
            (madt_addr, madt),
            (dsdt_addr, dsdt),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_to_zero_and_do_not_overlap() {
        let t = build(4, 4).unwrap();
        let mut end = 0;
        for (addr, bytes) in &t.tables {
            assert!(*addr >= end, "table at {addr:#x} overlaps the one before");
            end = addr + bytes.len() as u64;
            if addr == &RSDP_ADDR {
                assert_eq!(sum(&bytes[..20]), 0, "RSDP v1 checksum");
            } else {
                let len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
                assert_eq!(len, bytes.len(), "{} length field", String::from_utf8_lossy(&bytes[..4]));
            }
            assert_eq!(sum(bytes), 0, "checksum of the table at {addr:#x}");
        }
        assert!(end <= TABLES_END);
        // The XSDT names the FADT and the MADT; the FADT names the DSDT.
        let xsdt = &t.tables[1].1;
        let entries: Vec<u64> =
            xsdt[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(entries, vec![t.tables[2].0, t.tables[3].0]);
        assert_eq!(&t.tables[2].1[..4], b"FACP");
        let fadt = &t.tables[2].1;
        assert_eq!(u64::from_le_bytes(fadt[140..148].try_into().unwrap()), t.tables[4].0, "X_DSDT");
    }

    #[test]
    fn the_pm_port_decodes_poweroff_and_reset_only() {
        assert_eq!(pm_write(SLP_EN | (5 << 2)), Some(PmRequest::PowerOff));
        assert_eq!(pm_write(RESET_VALUE), Some(PmRequest::Reset));
        // Linux clears WAK_STS (0x80) on the status register first; S3 is not declared.
        assert_eq!(pm_write(0x80), None);
        assert_eq!(pm_write(SLP_EN | (3 << 2)), None);
        assert_eq!(pm_write(0), None);
    }
}
