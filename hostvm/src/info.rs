//! What this host's KVM offers: how it virtualizes the guest MMU, and its capabilities.
//!
//! The MMU mode decides what guests cost here:
//! * **HAP** (Intel EPT / AMD NPT): the CPU walks guest and host page tables in hardware;
//!   every TLB miss is a nested walk (up to 24 memory references with 4 KiB pages), so big
//!   guest pages pay off: use `--hugepages`.
//! * **Shadow paging** (`ept=0`/`npt=0`): KVM keeps shadow page tables and traps guest
//!   page-table writes; page-table-heavy guests are slow, ring 3 runs natively.
//! * **PVM** (`kvm_pvm`, as nested in a cloud VM without VT-x): shadow paging with the guest
//!   kernel deprivileged; guest ring 0 is emulated instruction by instruction, ring 3 runs
//!   natively. Stock Linux kernels crawl; hostvm's ring-3 payload runs at full speed.

use std::fmt;
use std::fs;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// How KVM translates guest-physical memory on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmuMode {
    /// Intel EPT (hardware-assisted paging).
    Ept,
    /// AMD NPT (hardware-assisted paging).
    Npt,
    /// Shadow page tables on VT-x/AMD-V with HAP off; the module named.
    Shadow(&'static str),
    /// PVM: shadow paging without hardware virtualization (`kvm_pvm`).
    Pvm,
    /// No known KVM vendor module is loaded.
    Unknown,
}

impl MmuMode {
    /// Reads the KVM module parameters under `sys` (normally `/sys`).
    pub fn detect_in(sys: &Path) -> MmuMode {
        let module = |m: &str| sys.join("module").join(m);
        let param = |m: &str, p: &str| {
            fs::read_to_string(module(m).join("parameters").join(p)).ok().map(|s| s.trim().to_owned())
        };
        let on = |v: Option<String>| matches!(v.as_deref(), Some("Y" | "y" | "1"));
        if module("kvm_pvm").exists() {
            MmuMode::Pvm
        } else if module("kvm_intel").exists() {
            if on(param("kvm_intel", "ept")) {
                MmuMode::Ept
            } else {
                MmuMode::Shadow("kvm_intel")
            }
        } else if module("kvm_amd").exists() {
            if on(param("kvm_amd", "npt")) {
                MmuMode::Npt
            } else {
                MmuMode::Shadow("kvm_amd")
            }
        } else {
            MmuMode::Unknown
        }
    }

    /// [`MmuMode::detect_in`] on `/sys`.
    pub fn detect() -> MmuMode {
        MmuMode::detect_in(Path::new("/sys"))
    }

    /// Hardware-assisted paging (nested page walks in hardware).
    pub fn is_hap(self) -> bool {
        matches!(self, MmuMode::Ept | MmuMode::Npt)
    }

    /// Whether a stock Linux kernel runs at useful speed here.
    pub fn runs_linux(self) -> bool {
        !matches!(self, MmuMode::Pvm | MmuMode::Unknown)
    }

    /// One line of advice for this mode.
    pub fn advice(self) -> &'static str {
        match self {
            MmuMode::Ept | MmuMode::Npt => {
                "hardware-assisted paging: TLB misses walk two page tables, back guests with \
                 --hugepages (2 MiB pages) to cut them"
            }
            MmuMode::Shadow(_) => {
                "shadow paging: guest page-table updates trap to KVM; enable ept/npt in the KVM \
                 module if the CPU has it"
            }
            MmuMode::Pvm => {
                "PVM: guest ring 0 is emulated (Linux boots only as far as its first lines), \
                 guest ring 3 runs natively (the built-in --payload runs at full speed)"
            }
            MmuMode::Unknown => "no KVM vendor module found (kvm_intel, kvm_amd, kvm_pvm)",
        }
    }
}

impl fmt::Display for MmuMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmuMode::Ept => f.write_str("hap (Intel EPT, kvm_intel ept=Y)"),
            MmuMode::Npt => f.write_str("hap (AMD NPT, kvm_amd npt=1)"),
            MmuMode::Shadow(m) => write!(f, "shadow page tables ({m} with hardware paging off)"),
            MmuMode::Pvm => f.write_str("pvm (kvm_pvm: shadow page tables, no VT-x/AMD-V)"),
            MmuMode::Unknown => f.write_str("unknown"),
        }
    }
}

/// Capabilities hostvm uses, with whether this KVM has them.
pub fn capabilities(kvm: &Kvm) -> Vec<(&'static str, bool)> {
    [
        ("user memory", Cap::UserMemory),
        ("in-kernel irqchip", Cap::Irqchip),
        ("in-kernel PIT", Cap::Pit2),
        ("ioeventfd", Cap::Ioeventfd),
        ("irqfd", Cap::Irqfd),
        ("TSS address", Cap::SetTssAddr),
        ("extended CPUID", Cap::ExtCpuid),
        ("immediate exit", Cap::ImmediateExit),
    ]
    .into_iter()
    .map(|(n, c)| (n, kvm.check_extension(c)))
    .collect()
}

/// 2 MiB huge pages: (total, free), if the kernel has the pool.
pub fn hugepages_2m() -> Option<(u64, u64)> {
    let dir = Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB");
    let read = |f: &str| fs::read_to_string(dir.join(f)).ok()?.trim().parse().ok();
    Some((read("nr_hugepages")?, read("free_hugepages")?))
}

/// The report `hostvm info` prints.
pub fn report() -> crate::Result<String> {
    use std::fmt::Write;
    let mode = MmuMode::detect();
    let mut s = String::new();
    let _ = writeln!(s, "MMU virtualization: {mode}");
    let _ = writeln!(s, "  {}", mode.advice());
    let kvm = Kvm::new().map_err(|source| crate::Error::OpenKvm { source })?;
    let _ = writeln!(s, "KVM API version: {}", kvm.get_api_version());
    let _ = writeln!(s, "max vCPUs: {} (recommended {})", kvm.get_max_vcpus(), kvm.get_nr_vcpus());
    let _ = writeln!(s, "memory slots: {}", kvm.get_nr_memslots());
    for (name, has) in capabilities(&kvm) {
        let _ = writeln!(s, "{name}: {}", if has { "yes" } else { "no" });
    }
    match hugepages_2m() {
        Some((total, free)) => {
            let _ = writeln!(s, "2 MiB huge pages: {free} free of {total}");
        }
        None => {
            let _ = writeln!(s, "2 MiB huge pages: not available");
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sys(case: usize, files: &[(&str, &str)], dirs: &[&str]) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!("hostvm-info-{}-{case}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in dirs {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        for (f, v) in files {
            let p = root.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, v).unwrap();
        }
        root
    }

    #[test]
    fn detects_each_mode_from_module_parameters() {
        type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<&'a str>, MmuMode);
        let cases: Vec<Case> = vec![
            (vec![("module/kvm_intel/parameters/ept", "Y\n")], vec![], MmuMode::Ept),
            (vec![("module/kvm_intel/parameters/ept", "N\n")], vec![], MmuMode::Shadow("kvm_intel")),
            (vec![("module/kvm_amd/parameters/npt", "1\n")], vec![], MmuMode::Npt),
            (vec![("module/kvm_amd/parameters/npt", "0\n")], vec!["module/kvm"], MmuMode::Shadow("kvm_amd")),
            (vec![("module/kvm/parameters/tdp_mmu", "N\n")], vec!["module/kvm_pvm"], MmuMode::Pvm),
            (vec![], vec!["module/kvm", "module/x"], MmuMode::Unknown),
        ];
        for (case, (files, dirs, want)) in cases.into_iter().enumerate() {
            let root = sys(case, &files, &dirs);
            assert_eq!(MmuMode::detect_in(&root), want, "{files:?} {dirs:?}");
            let _ = fs::remove_dir_all(&root);
        }
        assert!(MmuMode::Ept.is_hap() && MmuMode::Npt.is_hap() && !MmuMode::Pvm.is_hap());
        assert!(!MmuMode::Pvm.runs_linux() && MmuMode::Shadow("kvm_amd").runs_linux());
    }
}
