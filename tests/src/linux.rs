//! Linux guests under QEMU, their NIC a vhost-user port: the kit `tests/guest/build.sh` builds
//! (Debian cloud kernel, busybox /init, iperf3; QEMU 7.2 unpacked from Debian packages).
//!
//! A guest's test is given on its kernel command line (`kit.*` words, see the /init in
//! build.sh); it prints `KIT-RESULT: PASS|FAIL key=value ...` on its serial console and powers
//! off. QEMU runs under `timeout` and is killed by PID when the [`Guest`] is dropped.
//!
//! Facts of this machine kind the options encode: `/dev/kvm` is PVM, which cannot run a stock
//! kernel at useful speed, so guests use TCG unless the host has real VT-x/AMD-V; vhost-user
//! needs the guest's RAM in a shared memfd; QEMU 7.2 under TCG segfaults when vhost-user
//! starts with MSI-X, so virtio-net-pci gets `vectors=0` (legacy interrupts) there; QEMU 7.2
//! under TCG loses guest writes in a live migration, so migration tests run QEMU 10
//! ([`Kit::with_qemu10`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{Proc, Scratch};

/// The built kit: what `kit.env` names.
#[derive(Clone, Debug)]
pub struct Kit {
    /// Kernel image (PVH `vmlinux` when it could be unpacked).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The unpacked `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Its libraries (for `LD_LIBRARY_PATH`).
    pub qemu_libs: PathBuf,
    /// Its firmware directories (`-L`).
    pub firmware: Vec<PathBuf>,
}

/// Where the kit lives: `$GUESTKIT_DIR`, else `/var/tmp/vswitch-guestkit` (kept between runs,
/// so downloads happen once per machine).
pub fn kit_dir() -> PathBuf {
    std::env::var_os("GUESTKIT_DIR").map_or_else(|| PathBuf::from("/var/tmp/vswitch-guestkit"), PathBuf::from)
}

impl Kit {
    /// Builds the kit if it is missing or stale (once per test process; build.sh locks
    /// against other processes), and reads it. Panics with the build's output if it fails.
    pub fn get() -> Kit {
        static KIT: OnceLock<Result<Kit, String>> = OnceLock::new();
        KIT.get_or_init(|| {
            run_script("build.sh", &[kit_dir().as_os_str()])?;
            Kit::read(&kit_dir().join("kit.env"), true)
        })
        .clone()
        .unwrap_or_else(|e| panic!("guest kit: {e}"))
    }

    /// This kit with QEMU 10 from bookworm-backports in place of 7.2: the QEMU that
    /// `tests/guest/igb-sriov.sh` unpacks (run here with `--build-only`, a few seconds once its
    /// kit is cached in `$IGBKIT_DIR` or `/var/tmp/vswitch-igbkit`). Panics with the script's
    /// output if it fails.
    ///
    /// For live migration under TCG: QEMU 7.2 (Debian 12's, 7.2.22) loses guest writes while
    /// migrating. Its dirty-bitmap sync clears 64 pages at a time without resetting TCG's TLB,
    /// so the guest's later stores to those pages are not logged and the destination resumes
    /// with stale pages (fixed in QEMU 9.0, "physmem: Fix migration dirty bitmap coherency with
    /// TCG memory access"; not backported to 7.2). Seen here, about one migration in nine under
    /// load, as a transfer whose bytes repeated the 4096 before them (a reader's buffer page
    /// left as it was one read earlier), a guest kernel calling a NULL RCU callback, and a
    /// receiving process that never finished; none in 29 runs on QEMU 10, nor when the switch
    /// marked every page of guest memory dirty as the rings stopped. Under KVM the bug does
    /// not apply, but one QEMU for migration keeps the tests alike.
    pub fn with_qemu10(&self) -> Kit {
        static QEMU10: OnceLock<Result<Kit, String>> = OnceLock::new();
        let q = QEMU10
            .get_or_init(|| {
                run_script("igb-sriov.sh", &["--build-only".as_ref()])?;
                let dir = std::env::var_os("IGBKIT_DIR")
                    .map_or_else(|| PathBuf::from("/var/tmp/vswitch-igbkit"), PathBuf::from);
                Kit::read(&dir.join("kit.env"), false)
            })
            .clone()
            .unwrap_or_else(|e| panic!("QEMU 10 for migration: {e}"));
        Kit { qemu: q.qemu, qemu_libs: q.qemu_libs, firmware: q.firmware, ..self.clone() }
    }

    /// `kit.env`'s QEMU and, with `guest`, its kernel and initramfs (else left empty).
    fn read(env: &Path, guest: bool) -> Result<Kit, String> {
        let text = std::fs::read_to_string(env).map_err(|e| format!("{}: {e}", env.display()))?;
        let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| vars.get(k).map(PathBuf::from).ok_or(format!("{} has no {k}", env.display()));
        let (kernel, initrd) = if guest { (get("KERNEL")?, get("INITRD")?) } else { Default::default() };
        Ok(Kit {
            kernel,
            initrd,
            qemu: get("QEMU")?,
            qemu_libs: get("QEMU_LIBS")?,
            firmware: vars
                .get("QEMU_FIRMWARE")
                .map_or_else(Vec::new, |v| v.split(':').map(PathBuf::from).collect()),
        })
    }
}

/// Runs `tests/guest/SCRIPT ARGS`; its output is the error when it fails.
fn run_script(script: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest").join(script);
    let out =
        Command::new(&path).args(args).output().map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Whether QEMU can use KVM here: `/dev/kvm` usable and not PVM (whose emulated ring 0 cannot
/// run a stock kernel).
pub fn real_kvm() -> bool {
    Path::new("/dev/kvm").exists() && !Path::new("/sys/module/kvm_pvm").exists() && {
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
    }
}

/// The host TSC rate in kHz (TCG's guest TSC runs at it; a guest without a reliable clock
/// source must be told, or it hangs calibrating), from the kernel log, else /proc/cpuinfo.
fn host_tsc_khz() -> Option<u64> {
    let dmesg = Command::new("dmesg").output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    let from_log = dmesg.ok().and_then(|t| {
        t.lines().find_map(|l| {
            let (_, rest) = l.split_once("tsc: Detected ")?;
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
    });
    let mhz = from_log.or_else(|| {
        let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
        info.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse::<f64>().ok()
    })?;
    Some((mhz * 1000.0) as u64)
}

/// A failed guest's story: the last 40 lines of its console, then its VMM's (`vmm`) output.
pub fn report(name: &str, console: &str, vmm: &str, vmm_log: &str) -> String {
    let tail: Vec<&str> = console.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    format!(
        "--- guest {name} console (last 40 lines) ---\n{}\n--- {vmm} {name} ---\n{vmm_log}",
        tail.join("\n")
    )
}

/// One guest's settings.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    /// Its name (serial log, results).
    pub name: String,
    /// The vhost-user socket of its switch port (QEMU connects as the client, unless
    /// `listen`).
    pub sock: PathBuf,
    /// QEMU listens on `sock` (`server=on,wait=off`) for a switch port in client mode; it
    /// stays in its network setup until the switch connects, and after the switch goes away
    /// it listens again and sets the NIC's link down until the next connection.
    pub listen: bool,
    /// Its MAC.
    pub mac: String,
    /// `kit.*` words (without the prefix): `role=client`, `ip=10.0.0.1/24`, ...
    pub kit: Vec<String>,
    /// Extra `virtio-net-pci` properties (`csum=off`, `mq=on`, ...).
    pub device: Vec<String>,
    /// Extra `-netdev vhost-user` properties (`queues=2`).
    pub netdev: Vec<String>,
    /// Extra kernel command-line words.
    pub append: Vec<String>,
    /// A vIOMMU (intel-iommu with device IOTLB) in front of the NIC, the guest in strict
    /// invalidation mode.
    pub viommu: bool,
    /// vCPUs.
    pub cpus: u32,
    /// RAM in MiB.
    pub mem_mb: u32,
    /// Seconds before QEMU is killed (the guest's own watchdog is set 10 s shorter).
    pub timeout_s: u64,
    /// More QEMU arguments (`-qmp ...`, `-incoming ...`).
    pub qemu_args: Vec<String>,
}

impl GuestSpec {
    /// A guest on `sock` with `kit` words and defaults for the rest.
    pub fn new(name: &str, sock: &Path, mac: &str, kit: &[&str]) -> Self {
        GuestSpec {
            name: name.into(),
            sock: sock.into(),
            listen: false,
            mac: mac.into(),
            kit: kit.iter().map(|s| s.to_string()).collect(),
            device: Vec::new(),
            netdev: Vec::new(),
            append: Vec::new(),
            viommu: false,
            cpus: 1,
            mem_mb: 384,
            timeout_s: 240,
            qemu_args: Vec::new(),
        }
    }
}

/// A guest's result line, split into its fields.
#[derive(Clone, Debug)]
pub struct GuestResult {
    /// PASS.
    pub pass: bool,
    /// `key=value` fields.
    pub fields: HashMap<String, String>,
    /// The whole line.
    pub line: String,
}

impl GuestResult {
    /// The last `KIT-RESULT:` line of a console log, if there is one.
    pub fn parse(console: &str) -> Option<GuestResult> {
        let line = console.lines().rev().find(|l| l.contains("KIT-RESULT: "))?;
        let line = line[line.find("KIT-RESULT: ")?..].trim().to_string();
        let mut words = line.split_whitespace().skip(1);
        let pass = words.next() == Some("PASS");
        let fields = words.filter_map(|w| w.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect();
        Some(GuestResult { pass, fields, line })
    }

    /// A field, or "".
    pub fn get(&self, k: &str) -> &str {
        self.fields.get(k).map_or("", String::as_str)
    }
}

/// A running QEMU guest; killed when dropped.
pub struct Guest {
    proc: Proc,
    /// Its serial console log.
    pub serial: PathBuf,
    /// Its name.
    pub name: String,
}

impl Guest {
    /// Starts QEMU for `spec`; logs go into `dir`.
    pub fn start(kit: &Kit, dir: &Scratch, spec: &GuestSpec) -> Guest {
        let serial = dir.path(&format!("{}.serial", spec.name));
        let _ = std::fs::File::create(&serial);
        let kvm = real_kvm();
        let mut append = vec!["console=ttyS0".to_string(), "quiet".into(), "panic=-1".into()];
        if !kvm {
            if let Some(khz) = host_tsc_khz() {
                append.push(format!("tsc_early_khz={khz}"));
                append.push("tsc=reliable".into());
            }
        }
        if spec.viommu {
            // Strict: every unmap is invalidated at once (lazy mode batches flushes that the
            // device must then see as whole-space invalidations).
            append.push("intel_iommu=on".into());
            append.push("iommu.strict=1".into());
        }
        append.push(format!("kit.name={}", spec.name));
        append.push(format!("kit.timeout={}", spec.timeout_s.saturating_sub(10).max(10)));
        append.extend(spec.kit.iter().map(|w| format!("kit.{w}")));
        append.extend(spec.append.iter().cloned());

        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5", &spec.timeout_s.to_string()]).arg(&kit.qemu);
        cmd.env("LD_LIBRARY_PATH", &kit.qemu_libs);
        for f in &kit.firmware {
            cmd.arg("-L").arg(f);
        }
        let machine = if spec.viommu { "q35,kernel-irqchip=split" } else { "pc" };
        let mem = spec.mem_mb;
        cmd.args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        cmd.args(["-M", &format!("{machine},memory-backend=mem")]);
        if kvm {
            cmd.args(["-accel", "kvm", "-cpu", "host"]);
        } else {
            cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]);
        }
        cmd.args(["-smp", &spec.cpus.to_string(), "-m", &format!("{mem}M")]);
        cmd.args(["-object", &format!("memory-backend-memfd,id=mem,size={mem}M,share=on")]);
        let listen = if spec.listen { ",server=on,wait=off" } else { "" };
        cmd.arg("-chardev").arg(format!("socket,id=c0,path={}{listen}", spec.sock.display()));
        let mut netdev = "vhost-user,id=n0,chardev=c0".to_string();
        for p in &spec.netdev {
            netdev.push(',');
            netdev.push_str(p);
        }
        cmd.args(["-netdev", &netdev]);
        let mut dev = format!("virtio-net-pci,netdev=n0,mac={},romfile=", spec.mac);
        if !kvm {
            dev.push_str(",vectors=0");
        }
        if spec.viommu {
            cmd.args(["-device", "intel-iommu,intremap=on,device-iotlb=on"]);
            cmd.args(["-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,slot=1"]);
            // A modern-only device behind a root port: the IOMMU platform feature needs both.
            dev.push_str(",bus=rp0,iommu_platform=on,ats=on,disable-legacy=on");
        }
        for p in &spec.device {
            dev.push(',');
            dev.push_str(p);
        }
        cmd.args(["-device", &dev]);
        cmd.arg("-serial").arg(format!("file:{}", serial.display()));
        cmd.arg("-kernel").arg(&kit.kernel).arg("-initrd").arg(&kit.initrd);
        cmd.arg("-append").arg(append.join(" "));
        cmd.args(&spec.qemu_args);
        let log = dir.path(&format!("{}.qemu.log", spec.name));
        std::fs::write(dir.path(&format!("{}.cmd", spec.name)), format!("{cmd:?}\n")).ok();
        Guest { proc: Proc::spawn(cmd, &log), serial, name: spec.name.clone() }
    }

    /// Its serial console so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// QEMU's own output so far.
    pub fn qemu_log(&self) -> String {
        self.proc.log_text()
    }

    /// The result line once printed, or `None` when QEMU ended without one or `timeout` passed.
    pub fn wait_result(&mut self, timeout: Duration) -> Option<GuestResult> {
        let t = Instant::now();
        loop {
            if let Some(r) = self.result() {
                return Some(r);
            }
            if !self.proc.running() {
                // One last look: the line may have landed as QEMU ended.
                return self.result();
            }
            if t.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The result line, if printed yet.
    pub fn result(&self) -> Option<GuestResult> {
        GuestResult::parse(&self.console())
    }

    /// What to print when a guest test fails: the console's last lines and QEMU's output.
    pub fn report(&self) -> String {
        report(&self.name, &self.console(), "qemu", &self.qemu_log())
    }

    /// Whether QEMU is still running.
    pub fn running(&mut self) -> bool {
        self.proc.running()
    }

    /// Stops QEMU: SIGTERM to `timeout`, which passes it on to QEMU (QEMU quits at once) and
    /// reaps it; if that has not ended them within 2 s, SIGKILL to the process group `timeout`
    /// made for itself and QEMU. (A SIGKILL to `timeout` alone would leave QEMU running,
    /// reparented, until its own time limit, which `timeout` no longer enforces.)
    pub fn stop(&mut self) {
        // running() reaps an exited `timeout`: signals go only to a leader that is ours and
        // unreaped, so its id (and its group's) cannot have been reused.
        if self.proc.running() {
            let pid = self.proc.pid() as i32;
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            if self.proc.wait_exit(Duration::from_secs(2)).is_none() {
                // SAFETY: as above, its process group.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
        }
        self.proc.kill();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A QMP connection to a QEMU started with `-qmp unix:PATH,server=on,wait=off`: commands and
/// their answers, events skipped.
pub struct Qmp {
    r: std::io::BufReader<std::os::unix::net::UnixStream>,
    w: std::os::unix::net::UnixStream,
}

impl Qmp {
    /// Connects (retrying until `timeout`: QEMU creates the socket as it starts) and leaves
    /// capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let t = Instant::now();
        let s = loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > timeout => return Err(format!("QMP {}: {e}", path.display())),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let w = s.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp { r: std::io::BufReader::new(s), w };
        q.line()?; // the greeting
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<serde_json::Value, String> {
        use std::io::BufRead;
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => Err("QMP: QEMU closed the connection".into()),
            Ok(_) => serde_json::from_str(&l).map_err(|e| format!("QMP: {e}: {l}")),
            Err(e) => Err(format!("QMP: {e}")),
        }
    }

    /// Runs `cmd` with `args`; its `return` value, or QEMU's error.
    pub fn execute(&mut self, cmd: &str, args: serde_json::Value) -> Result<serde_json::Value, String> {
        use std::io::Write;
        let msg = serde_json::json!({ "execute": cmd, "arguments": args });
        writeln!(self.w, "{msg}").map_err(|e| format!("QMP {cmd}: {e}"))?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {cmd}: {e}"));
            }
            // An event: not ours.
        }
    }
}
