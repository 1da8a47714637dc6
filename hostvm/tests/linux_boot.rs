//! Linux boot under hostvm: Debian's cloud kernel, as a PVH `vmlinux` from the guest kit.
//!
//! On this project's CI host KVM is PVM (guest ring 0 is emulated), so a stock kernel gets
//! only as far as its early console lines (it dies in its memory allocator's `cmpxchg16b`), and
//! that is what is checked here: the kernel's banner on hostvm's serial console proves the ELF
//! loader, the PVH start info (command line, memory map, RSDP), the initial vCPU state and the
//! 16550; its ACPI lines prove it found and checksummed hostvm's tables and took its CPUs and
//! I/O APIC from the MADT. `linux_net.rs` boots to a ping where hardware virtualization exists.

use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::linux::Kit;
use e2e_tests::{wait_until, Proc, Scratch};

#[test]
fn pvh_vmlinux_prints_its_banner_and_reads_our_memory_map_and_acpi_tables() {
    let kit = Kit::get();
    let dir = Scratch::new("hostvm-linux");
    let console = dir.path("console.log");
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1 hostvm.test=1";
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostvm"));
    cmd.args(["run", "--mem", "256M", "--cpus", "2", "--cmdline", cmdline]);
    cmd.arg("--kernel").arg(&kit.kernel).arg("--initrd").arg(&kit.initrd);
    cmd.arg("--serial").arg(format!("file:{}", console.display()));
    let t = Instant::now();
    let mut vm = Proc::spawn(cmd, &dir.path("hostvm.log"));
    let text = || std::fs::read_to_string(&console).unwrap_or_default();
    let booted = wait_until(Duration::from_secs(150), || {
        let c = text();
        c.contains("Linux version") && c.contains("smpboot: Allowing 2 CPUs")
    });
    let took = t.elapsed();
    let log = vm.stop(Duration::from_secs(5));
    let c = text().replace('\r', "");
    assert!(booted, "no kernel banner and SMP set-up after {took:?}; console:\n{c}\nhostvm:\n{log}");
    eprintln!("kernel banner and SMP set-up after {:.1} s", took.as_secs_f64());
    // Our command line and memory map, as the kernel read them.
    assert!(c.contains(&format!("Command line: {cmdline}")), "{c}");
    assert!(c.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"), "{c}");
    assert!(c.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"), "{c}");
    // hostvm's ACPI tables, found through the PVH start info's RSDP, checksums verified.
    for want in [
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 HOSTVM)",
        "ACPI: XSDT 0x00000000000E0040",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
    ] {
        assert!(c.contains(want), "console lacks {want:?}:\n{c}");
    }
    assert!(!c.contains("Incorrect checksum") && !c.contains("ACPI Error"), "{c}");
    assert!(log.contains("MMU virtualization:"), "{log}");
    assert!(!log.contains("error"), "hostvm reported an error:\n{log}");
}
