//! hostvm's ACPI tables, read back by ACPICA's own disassembler (`iasl -d`, the reference
//! implementation Linux's ACPI code comes from): every table must decode without a checksum
//! warning, and the DSDT must describe the NICs where hostvm puts them.
//!
//! Under this CI host's PVM a Linux guest never gets far enough to bind its drivers, so this is
//! where the DSDT's content is checked; the boot test checks that Linux finds the tables.

use std::process::Command;

use e2e_tests::Scratch;
use hostvm::acpi;
use hostvm::layout::{nic_mmio, VIRTIO_IRQ_BASE};

/// Disassembles each table (not the RSDP, which is not a table) and returns their text.
fn disassemble(t: &acpi::Tables, dir: &Scratch) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (addr, bytes) in &t.tables[1..] {
        let sig = String::from_utf8_lossy(&bytes[..4]).into_owned();
        let dat = dir.path(&format!("{sig}.dat"));
        std::fs::write(&dat, bytes).unwrap();
        let run = Command::new("iasl").arg("-d").arg(&dat).current_dir(dir.path("")).output();
        let run = run.unwrap_or_else(|e| {
            panic!("cannot run iasl ({e}): scripts/install-test-deps.sh installs acpica-tools")
        });
        let log = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
        assert!(run.status.success(), "iasl -d {sig} (at {addr:#x}) failed:\n{log}");
        assert!(!log.contains("Incorrect checksum") && !log.contains("Error"), "iasl on {sig}:\n{log}");
        let dsl = std::fs::read_to_string(dir.path(&format!("{sig}.dsl"))).unwrap();
        out.push((sig, dsl));
    }
    out
}

#[test]
fn iasl_decodes_the_tables_and_finds_every_nic_cpu_and_the_pm_port() {
    let dir = Scratch::new("hostvm-acpi");
    let (cpus, nics) = (3u8, 4usize);
    let t = acpi::build(cpus, nics).unwrap();
    let tables = disassemble(&t, &dir);
    let sigs: Vec<&str> = tables.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(sigs, ["XSDT", "FACP", "APIC", "DSDT"]);
    let get = |s: &str| &tables.iter().find(|(sig, _)| sig == s).unwrap().1;

    // The XSDT points at the FADT and the MADT where they are.
    let xsdt = get("XSDT");
    for (addr, _) in &t.tables[2..4] {
        assert!(xsdt.contains(&format!("{addr:016X}")), "XSDT lacks {addr:#x}:\n{xsdt}");
    }

    // FADT: hardware-reduced, DSDT address, reset and sleep registers on the PM port.
    let fadt = get("FACP");
    for want in [
        "Hardware Reduced (V5) : 1".to_string(),
        "Reset Register Supported (V2) : 1".into(),
        format!("DSDT Address : {:016X}", t.tables[4].0),
        format!("Address : {:016X}", acpi::PM_PORT),
        format!("Value to cause reset : {:02X}", acpi::RESET_VALUE),
    ] {
        assert!(fadt.contains(&want), "FADT lacks {want:?}:\n{fadt}");
    }
    for reg in ["Reset Register", "Sleep Control Register", "Sleep Status Register"] {
        let at =
            fadt.find(&format!("{reg} : [Generic Address Structure]")).unwrap_or_else(|| panic!("{reg}"));
        let next: Vec<&str> = fadt[at..].lines().take(6).collect();
        assert!(next.iter().any(|l| l.contains("[SystemIO]")), "{reg} not on an I/O port: {next:?}");
    }

    // MADT: one enabled local APIC per vCPU with APIC id = vCPU index, and the I/O APIC.
    let madt = get("APIC");
    assert_eq!(madt.matches("[Processor Local APIC]").count(), cpus as usize, "{madt}");
    for id in 0..cpus {
        assert!(madt.contains(&format!("Local Apic ID : {id:02X}")), "{madt}");
    }
    assert!(madt.contains("[I/O APIC]") && madt.contains("Address : FEC00000"), "{madt}");

    // DSDT: COM1, a virtio-mmio device per NIC with its window and GSI, and \_S5.
    let dsdt = get("DSDT");
    assert!(dsdt.contains("EisaId (\"PNP0501\")") && dsdt.contains("0x03F8"), "{dsdt}");
    assert_eq!(dsdt.matches("Name (_HID, \"LNRO0005\")").count(), nics, "{dsdt}");
    for i in 0..nics {
        let dev = &dsdt[dsdt.find(&format!("Device (\\_SB.V{i:03})")).unwrap_or_else(|| panic!("V{i:03}"))..];
        let dev = &dev[..dev.find("})").unwrap()];
        assert!(dev.contains(&format!("0x{:08X},         // Address Base", nic_mmio(i))), "{dev}");
        assert!(dev.contains("Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive"), "{dev}");
        assert!(dev.contains(&format!("0x{:08X},", VIRTIO_IRQ_BASE + i as u32)), "{dev}");
    }
    assert!(dsdt.contains("Name (\\_S5, Package"), "{dsdt}");
}
