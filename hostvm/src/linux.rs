//! Linux boot: a PVH `vmlinux` (ELF with the Xen PVH entry note) or a bzImage through the
//! 64-bit boot protocol, with the command line, an initrd and the memory map.
//!
//! Guest-physical placement (low RAM):
//! `0x6000` hvm_start_info, `0x6040` memory map, `0x6800` module list (PVH);
//! `0x7000` zero page (bzImage); `0x2_0000` command line; kernel at its ELF physical
//! address or 1 MiB; initrd at the top of low RAM, 2 MiB-aligned.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{ram_ranges, HIGH_RAM_START};
use crate::memory::GuestRam;
use crate::vcpu::Start;
use crate::{Error, Result};

const START_INFO: u64 = 0x6000;
const MEMMAP: u64 = 0x6040;
const MODLIST: u64 = 0x6800;
const ZERO_PAGE: u64 = 0x7000;
const CMDLINE: u64 = 0x2_0000;
const CMDLINE_MAX: usize = 4096;
const KERNEL_START: u64 = 0x10_0000;
const EBDA_START: u64 = 0x9_fc00;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// What to boot.
#[derive(Clone, Debug)]
pub struct LinuxConfig {
    /// `vmlinux` (PVH) or `bzImage`.
    pub kernel: std::path::PathBuf,
    /// Optional initrd.
    pub initrd: Option<std::path::PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// The memory map: RAM below the EBDA, reserved up to 1 MiB, RAM to the hole, RAM above 4 GiB.
fn memory_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM), (EBDA_START, KERNEL_START - EBDA_START, E820_RESERVED)];
    for (start, len) in ram_ranges(ram.size()) {
        if start == 0 {
            map.push((KERNEL_START, len - KERNEL_START, E820_RAM));
        } else {
            map.push((start, len, E820_RAM));
        }
    }
    debug_assert!(map.iter().all(|&(s, l, _)| s + l <= HIGH_RAM_START || s >= HIGH_RAM_START));
    map
}

/// Loads kernel, initrd and command line; writes the boot structures; returns how the boot
/// vCPU starts.
/// `rsdp` is the ACPI root pointer's address, passed on in the boot structures.
pub(crate) fn load(ram: &GuestRam, cfg: &LinuxConfig, rsdp: u64) -> Result<Start> {
    let kerr = |reason: String| Error::Load { what: "kernel", path: cfg.kernel.clone(), reason };
    let mut file = File::open(&cfg.kernel).map_err(|e| kerr(e.to_string()))?;
    let mem = ram.mem();

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| kerr(format!("command line: {e}")))?;
    if !cfg.cmdline.is_empty() {
        cmdline.insert_str(&cfg.cmdline).map_err(|e| kerr(format!("command line: {e}")))?;
    }
    let cmdline_len = cmdline.as_cstring().map_err(|e| kerr(format!("command line: {e}")))?.as_bytes().len();
    load_cmdline(mem, GuestAddress(CMDLINE), &cmdline).map_err(|e| kerr(format!("command line: {e}")))?;

    // ELF first (PVH), then bzImage.
    let elf = Elf::load(mem, None, &mut file, Some(GuestAddress(KERNEL_START)));
    let (res, pvh_entry) = match elf {
        Ok(res) => match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => (res, Some(entry.0)),
            _ => {
                return Err(kerr(
                    "this ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build it with \
                     CONFIG_PVH=y or boot its bzImage"
                        .into(),
                ))
            }
        },
        Err(linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::InvalidElfMagicNumber)) => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(KERNEL_START)))
                .map_err(|e| kerr(format!("neither a PVH vmlinux nor a bzImage: {e}")))?;
            (r, None)
        }
        Err(e) => return Err(kerr(e.to_string())),
    };

    // Both loaders give the kernel's end as a guest address.
    let initrd = match &cfg.initrd {
        Some(p) => Some(load_initrd(ram, p, res.kernel_end)?),
        None => None,
    };
    let map = memory_map(ram);

    if let Some(entry) = pvh_entry {
        let memmap: Vec<hvm_memmap_table_entry> = map
            .iter()
            .map(|&(addr, size, type_)| hvm_memmap_table_entry { addr, size, type_, reserved: 0 })
            .collect();
        let modules: Vec<hvm_modlist_entry> = initrd
            .iter()
            .map(|&(paddr, size)| hvm_modlist_entry { paddr, size, cmdline_paddr: 0, reserved: 0 })
            .collect();
        let info = hvm_start_info {
            magic: XEN_HVM_START_MAGIC,
            version: 1,
            cmdline_paddr: CMDLINE,
            memmap_paddr: MEMMAP,
            memmap_entries: memmap.len() as u32,
            nr_modules: modules.len() as u32,
            modlist_paddr: if modules.is_empty() { 0 } else { MODLIST },
            rsdp_paddr: rsdp,
            ..Default::default()
        };
        let mut bp = BootParams::new::<hvm_start_info>(&info, GuestAddress(START_INFO));
        bp.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(MEMMAP));
        if !modules.is_empty() {
            bp.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(MODLIST));
        }
        PvhBootConfigurator::write_bootparams(&bp, mem).map_err(|e| kerr(format!("PVH start info: {e}")))?;
        return Ok(Start::Pvh { entry, start_info: START_INFO });
    }

    let hdr = res.setup_header.ok_or_else(|| kerr("bzImage without a setup header".into()))?;
    let mut params = boot_params { hdr, ..Default::default() };
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x100_0000;
    params.acpi_rsdp_addr = rsdp;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr, size, r#type: type_ };
    }
    params.e820_entries = map.len() as u8;
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE));
    LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(|e| kerr(format!("zero page: {e}")))?;
    // The 64-bit entry point is 0x200 past the protected-mode kernel.
    Ok(Start::Long64 { entry: res.kernel_load.0 + 0x200, zero_page: ZERO_PAGE })
}

/// Places the initrd at the top of low RAM (2 MiB-aligned) above the kernel.
fn load_initrd(ram: &GuestRam, path: &Path, kernel_end: u64) -> Result<(u64, u64)> {
    let ierr = |reason: String| Error::Load { what: "initrd", path: path.to_owned(), reason };
    let data = std::fs::read(path).map_err(|e| ierr(e.to_string()))?;
    let size = data.len() as u64;
    let top = ram.low_end().min(0xc000_0000);
    let addr = top.checked_sub(size).map(|a| a & !((2 << 20) - 1)).unwrap_or(0);
    if addr <= kernel_end {
        return Err(ierr(format!(
            "{} MiB does not fit between the kernel and the end of low memory; raise --mem",
            size >> 20
        )));
    }
    ram.mem().write_slice(&data, GuestAddress(addr)).map_err(|e| ierr(e.to_string()))?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_reserves_the_bios_area_and_skips_the_hole() {
        let ram = GuestRam::new(4 << 30, false).unwrap();
        let map = memory_map(&ram);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (KERNEL_START, (3 << 30) - KERNEL_START, E820_RAM));
        assert_eq!(map[3], (4 << 30, 1 << 30, E820_RAM));
    }

    #[test]
    fn not_a_kernel_is_refused_with_its_path() {
        let ram = GuestRam::new(64 << 20, false).unwrap();
        let p = std::env::temp_dir().join(format!("hostvm-notakernel-{}", std::process::id()));
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let cfg = LinuxConfig { kernel: p.clone(), initrd: None, cmdline: "console=ttyS0".into() };
        let e = load(&ram, &cfg, 0).unwrap_err().to_string();
        let _ = std::fs::remove_file(&p);
        assert!(e.contains("hostvm-notakernel") && e.contains("bzImage"), "{e}");
    }
}
