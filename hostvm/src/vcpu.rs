//! Initial vCPU state: descriptor tables, page tables and registers for each way hostvm
//! starts a guest.
//!
//! * [`Start::Ring3`]: the payload, straight into 64-bit mode at CPL 3 on identity page
//!   tables with the User bit set, IOPL 3 (port I/O exits to hostvm) and interrupts masked.
//!   No ring-0 code ever runs, which is what lets it run natively under PVM.
//! * [`Start::Pvh`]: the PVH entry of a Linux `vmlinux`: 32-bit flat protected mode, paging
//!   off, `ebx` = the `hvm_start_info`.
//! * [`Start::Long64`]: the 64-bit Linux boot protocol (bzImage): long mode at CPL 0 on
//!   identity page tables, `rsi` = the zero page.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, CpuId};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;
use crate::{Error, Result};

/// Where the GDT lives.
pub(crate) const GDT_ADDR: u64 = 0x1000;
/// PML4; the PDPT and four page directories follow, one page each.
pub(crate) const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = PML4_ADDR + 0x1000;
const PD_ADDR: u64 = PML4_ADDR + 0x2000;
/// End of the page-table area.
#[cfg(test)]
pub(crate) const PAGE_TABLES_END: u64 = PD_ADDR + 4 * 0x1000;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT entries (flat segments).
const GDT_NULL: u64 = 0;
const GDT_CODE32: u64 = 0x00cf_9b00_0000_ffff;
const GDT_CODE64: u64 = 0x00af_9b00_0000_ffff;
const GDT_DATA: u64 = 0x00cf_9300_0000_ffff;
const GDT_USER_CODE64: u64 = 0x00af_fb00_0000_ffff;
const GDT_USER_DATA: u64 = 0x00cf_f300_0000_ffff;
const SEL_CODE32: u16 = 0x08;
const SEL_CODE64: u16 = 0x10;
const SEL_USER_CODE: u16 = 0x1b;
const SEL_USER_DATA: u16 = 0x23;
const SEL_DATA: u16 = 0x28;
const GDT_ENTRIES: usize = 6;

/// How a vCPU starts.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Start {
    /// The payload: 64-bit ring 3 at `entry`, stack at `stack`, `rdi` = `arg`.
    Ring3 { entry: u64, stack: u64, arg: u64 },
    /// Linux PVH entry at `entry`, `ebx` = `start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol at `entry`, `rsi` = `zero_page`.
    Long64 { entry: u64, zero_page: u64 },
}

fn write<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, v: T, at: u64) -> Result<()> {
    mem.write_obj(v, GuestAddress(at))
        .map_err(|e| Error::Config(format!("guest memory too small for boot structures at {at:#x}: {e}")))
}

/// Identity-maps the low 4 GiB with 2 MiB pages; `user` sets the User bit everywhere.
fn write_page_tables(mem: &GuestMemoryMmap, user: bool) -> Result<()> {
    let u = if user { 0x4 } else { 0 };
    write(mem, PDPT_ADDR | 0x3 | u, PML4_ADDR)?;
    for i in 0..4u64 {
        write(mem, (PD_ADDR + i * 0x1000) | 0x3 | u, PDPT_ADDR + i * 8)?;
        for j in 0..512u64 {
            let addr = (i << 30) | (j << 21);
            write(mem, addr | 0x83 | u, PD_ADDR + i * 0x1000 + j * 8)?;
        }
    }
    Ok(())
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<[u64; GDT_ENTRIES]> {
    let gdt = [GDT_NULL, GDT_CODE32, GDT_CODE64, GDT_USER_CODE64, GDT_USER_DATA, GDT_DATA];
    for (i, e) in gdt.iter().enumerate() {
        write(mem, *e, GDT_ADDR + 8 * i as u64)?;
    }
    Ok(gdt)
}

fn segment(entry: u64, selector: u16) -> kvm_segment {
    let flags = (entry >> 40) & 0xf0ff;
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Sets up `vcpu` (index `id`) to start as `start`, writing the tables it needs to `mem`.
pub(crate) fn setup(vcpu: &VcpuFd, id: u8, cpuid: &CpuId, mem: &GuestMemoryMmap, start: Start) -> Result<()> {
    set_cpuid(vcpu, id, cpuid)?;

    let gdt = write_gdt(mem)?;
    let mut sregs: kvm_sregs =
        vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS", "the vCPU was just created; check dmesg"))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (8 * GDT_ENTRIES - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    // TR stays as KVM resets it: loading our own TSS makes PVM ignore IOPL 3 and fault
    // ring-3 port I/O (measured here), and nothing in these guests uses a TSS.
    let mut regs = kvm_regs { rflags: 0x2, ..Default::default() };
    match start {
        Start::Ring3 { entry, stack, arg } => {
            write_page_tables(mem, true)?;
            sregs.cs = segment(gdt[3], SEL_USER_CODE);
            let data = segment(gdt[4], SEL_USER_DATA);
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            // IOPL 3 so `in`/`out` exit to hostvm; IF clear: the payload takes no interrupts.
            regs.rflags = 0x3002;
            regs.rip = entry;
            // As if `call`ed: the SysV ABI wants rsp ≡ 8 (mod 16) at function entry.
            regs.rsp = stack - 8;
            regs.rdi = arg;
        }
        Start::Pvh { entry, start_info } => {
            sregs.cs = segment(gdt[1], SEL_CODE32);
            let data = segment(gdt[5], SEL_DATA);
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        Start::Long64 { entry, zero_page } => {
            write_page_tables(mem, false)?;
            sregs.cs = segment(gdt[2], SEL_CODE64);
            let data = segment(gdt[5], SEL_DATA);
            (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = zero_page;
        }
    }
    vcpu.set_sregs(&sregs).map_err(Error::kvm(
        "KVM_SET_SREGS",
        "the host refused the initial segment/control registers; `hostvm info` shows its MMU mode",
    ))?;
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS", "check dmesg for KVM messages"))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU", "check dmesg for KVM messages"))?;
    tracing::debug!("vCPU {id} initial state: {}", describe(vcpu));
    Ok(())
}

/// Gives vCPU `id` the host's supported CPUID with its own APIC id (the one its in-kernel
/// LAPIC has, and the MADT lists).
pub(crate) fn set_cpuid(vcpu: &VcpuFd, id: u8, cpuid: &CpuId) -> Result<()> {
    let mut cpuid = cpuid.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            // Initial APIC id.
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(id) << 24),
            // x2APIC id in the topology leaves.
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(Error::kvm("KVM_SET_CPUID2", "the host rejected its own supported CPUID"))
}

/// A one-line summary of where a vCPU is (for errors about guest crashes).
pub(crate) fn describe(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer
        ),
        _ => "registers unavailable".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_the_descriptors_the_reference_uses() {
        let cs = segment(GDT_USER_CODE64, SEL_USER_CODE);
        assert_eq!((cs.type_, cs.dpl, cs.l, cs.db, cs.s, cs.present, cs.g), (11, 3, 1, 0, 1, 1, 1));
        let ds = segment(GDT_USER_DATA, SEL_USER_DATA);
        assert_eq!((ds.type_, ds.dpl, ds.l, ds.db, ds.s, ds.present), (3, 3, 0, 1, 1, 1));
        let c32 = segment(GDT_CODE32, SEL_CODE32);
        assert_eq!((c32.type_, c32.dpl, c32.l, c32.db), (11, 0, 0, 1));
        // Selectors index the right slots with the right RPL.
        assert_eq!(SEL_USER_CODE >> 3, 3);
        assert_eq!(SEL_USER_DATA >> 3, 4);
        assert_eq!((SEL_CODE32 >> 3, SEL_CODE64 >> 3, SEL_DATA >> 3), (1, 2, 5));
        assert_eq!(SEL_USER_CODE & 3, 3);
    }

    #[test]
    fn page_tables_identity_map_4gib_with_user_bit() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem, true).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 7);
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 3 * 0x1000 + 0x80 * 8)).unwrap();
        assert_eq!(pde, (3 << 30) | (0x80 << 21) | 0x87);
        const { assert!(PAGE_TABLES_END <= 0x10_0000) };
    }
}
