//! Boot to ping: two Debian-kernel guests under hostvm (the guest kit's PVH `vmlinux` and
//! busybox /init), each with a virtio-mmio NIC that is a port of an in-process switch. The
//! kernel finds the NIC in hostvm's DSDT (`LNRO0005`), its `virtio_mmio` and `virtio_net`
//! drivers bring it up through hostvm's register file, the switch moves the frames between the
//! two guests' memories over vhost-user with the kernel's irqfd/ioeventfd doing the signalling,
//! and each guest powers off through the FADT's PM port when its test is done.
//!
//! This needs hardware-assisted virtualization (VT-x/AMD-V with EPT/NPT). On a PVM host (this
//! project's CI machine: guest ring 0 is emulated and a stock kernel dies in its allocator's
//! `cmpxchg16b` within a minute) it is skipped and says so; there, `linux_boot.rs` checks the
//! same kernel as far as it gets (banner, memory map, ACPI tables, MADT) and
//! `acpi_tables.rs` checks the DSDT's NICs with ACPICA's decoder.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::linux::{real_kvm, GuestResult, Kit};
use e2e_tests::{assert_one_copy_each, find, sock, start_switch, Proc, Scratch};

const IP_A: &str = "10.78.0.1";
const IP_B: &str = "10.78.0.2";
/// The guests' own watchdog; hostvm is stopped 20 s after it.
const GUEST_TIMEOUT_S: u64 = 120;

struct LinuxVm {
    proc: Proc,
    console: std::path::PathBuf,
    name: &'static str,
}

impl LinuxVm {
    fn start(kit: &Kit, dir: &Scratch, name: &'static str, mac: &str, words: &[String]) -> LinuxVm {
        let console = dir.path(&format!("{name}.console"));
        let mut cmdline = vec![
            "console=ttyS0".to_string(),
            "panic=-1".into(),
            format!("kit.name={name}"),
            format!("kit.timeout={GUEST_TIMEOUT_S}"),
        ];
        cmdline.extend(words.iter().map(|w| format!("kit.{w}")));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostvm"));
        cmd.args(["run", "--mem", "384M", "--cpus", "2", "--net-wait", "10"]);
        cmd.arg("--kernel").arg(&kit.kernel).arg("--initrd").arg(&kit.initrd);
        cmd.arg("--cmdline").arg(cmdline.join(" "));
        cmd.arg("--net").arg(format!("socket={},mac={mac}", sock(dir, name).display()));
        cmd.arg("--serial").arg(format!("file:{}", console.display()));
        LinuxVm { proc: Proc::spawn(cmd, &dir.path(&format!("{name}.hostvm.log"))), console, name }
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).replace('\r', "")
    }

    fn result(&self) -> Option<GuestResult> {
        GuestResult::parse(&self.console())
    }

    fn report(&self) -> String {
        e2e_tests::linux::report(self.name, &self.console(), "hostvm", &self.proc.log_text())
    }
}

/// `HOSTVM_LINUX_NET=force` runs the test anyway, to see how far a guest gets on this host.
fn skip_reason() -> Option<String> {
    if real_kvm() || std::env::var("HOSTVM_LINUX_NET").is_ok_and(|v| v == "force") {
        return None;
    }
    let why = if Path::new("/sys/module/kvm_pvm").exists() {
        "this host's KVM is PVM (kvm_pvm: guest ring 0 is emulated, and a stock kernel dies in \
         cmpxchg16b before userspace)"
    } else {
        "/dev/kvm is missing or not usable by this user"
    };
    Some(format!(
        "{why}; it needs VT-x/AMD-V with EPT/NPT (HOSTVM_LINUX_NET=force runs it anyway). \
         linux_boot.rs and acpi_tables.rs cover what can be checked here"
    ))
}

#[test]
fn two_linux_guests_under_hostvm_boot_and_ping_each_other_through_the_switch() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED boot-to-ping under hostvm: {why}");
        return;
    }
    let kit = Kit::get();
    let dir = Scratch::new("hostvm-linux-net");
    let sw = start_switch(&dir, &["a", "b"]);
    let server = LinuxVm::start(
        &kit,
        &dir,
        "b",
        "52:54:00:4c:00:02",
        &["role=server".into(), format!("ip={IP_B}/24"), format!("peer={IP_A}"), "tests=ping".into()],
    );
    let client = LinuxVm::start(
        &kit,
        &dir,
        "a",
        "52:54:00:4c:00:01",
        &[
            "role=client".into(),
            format!("ip={IP_A}/24"),
            format!("peer={IP_B}"),
            "tests=ping".into(),
            "ping_n=20".into(),
        ],
    );
    let mut vms = [client, server];
    let t = Instant::now();
    let deadline = Duration::from_secs(GUEST_TIMEOUT_S + 20);
    // The switch forgets a port's counters when its guest disconnects: watch them while the
    // guests run, and check the one-copy rule on every look.
    let mut seen = [(0u64, 0u64); 2];
    while vms.iter().any(|v| v.result().is_none())
        && vms.iter_mut().any(|v| v.proc.running())
        && t.elapsed() < deadline
    {
        if let Ok(stats) = sw.stats() {
            assert_one_copy_each(&stats);
            for (i, name) in ["a", "b"].iter().enumerate() {
                let p = find(&stats, name);
                seen[i] = (seen[i].0.max(p.rx.packets), seen[i].1.max(p.tx.packets));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let results: Vec<Option<GuestResult>> = vms.iter().map(LinuxVm::result).collect();
    let report = || vms.iter().map(LinuxVm::report).collect::<Vec<_>>().join("\n");
    let (Some(ra), Some(rb)) = (&results[0], &results[1]) else {
        panic!("no result from both guests after {:?}\n{}", t.elapsed(), report());
    };
    println!("client: {}\nserver: {}", ra.line, rb.line);
    assert!(ra.pass && rb.pass, "guest test failed\n{}\n{}\n{}", ra.line, rb.line, report());
    assert_eq!(ra.get("ping_loss"), "0%", "{}", ra.line);

    // Both guests power off through the PM port: hostvm exits 0 by itself.
    for v in &mut vms {
        let st = v.proc.wait_exit(Duration::from_secs(20));
        assert!(
            st.is_some_and(|s| s.success()),
            "hostvm {} did not power off cleanly ({st:?})\n{}",
            v.name,
            v.report()
        );
    }
    // The pings went through the switch.
    for (name, (rx, tx)) in ["a", "b"].iter().zip(seen) {
        assert!(rx >= 20 && tx >= 20, "port {name} moved rx {rx} / tx {tx} packets");
    }
}
