//! A VM: KVM set-up, devices, vCPU threads and the run loop.
//!
//! I/O ports: COM1 (0x3f8), the payload's exit, idle and event ports (0x501-0x503), the
//! i8042 reset command (`out 0x64, 0xfe`); every other port reads as all-ones. MMIO: the
//! NICs' virtio-mmio windows. Queue notifications and interrupts bypass this loop entirely
//! (ioeventfd/irqfd).

use std::fs::File;
use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi;
use crate::layout::{self, COM1_IRQ, COM1_PORT, KVM_TSS_ADDR, VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE};
use crate::linux::LinuxConfig;
use crate::memory::GuestRam;
use crate::migrate::{self, Final, Hello, MigrationStats, VcpuState};
use crate::mmio::{reg, VirtioMmioNet};
use crate::net::{Link, NetSpec, QUEUES};
use crate::payload::{self, abi, PayloadConfig};
use crate::serial::{Com1, IrqLine};
use crate::vcpu::{self, Start};
use crate::{Error, Result};

/// What the VM boots.
#[derive(Clone, Debug)]
pub enum Boot {
    /// The built-in payload.
    Payload(PayloadConfig),
    /// A Linux kernel.
    Linux(LinuxConfig),
}

/// Where the serial console goes.
#[derive(Clone, Debug)]
pub enum SerialOut {
    /// hostvm's stdout.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// Nowhere.
    Null,
}

/// A VM's configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub mem: u64,
    /// vCPUs.
    pub cpus: u8,
    /// Back RAM with 2 MiB huge pages.
    pub hugepages: bool,
    /// What to boot.
    pub boot: Boot,
    /// NICs.
    pub nets: Vec<NetSpec>,
    /// Serial console.
    pub serial: SerialOut,
    /// How long to wait for each NIC's switch port at start.
    pub net_wait: Duration,
}

/// Why a VM stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The payload exited with this code.
    Payload(u32),
    /// The guest halted (no irqchip: nothing could wake it).
    Halted,
    /// The guest reset (triple fault, i8042 reset, or a reset system event).
    Reset,
    /// The guest powered off (system event).
    PowerOff,
    /// hostvm was asked to stop.
    Stopped,
    /// The guest migrated to another hostvm and runs there now.
    Migrated,
}

/// A timestamped guest milestone.
#[derive(Clone, Copy, Debug)]
pub struct Milestone {
    /// What happened.
    pub what: &'static str,
    /// Since [`Vm::new`] began.
    pub at: Duration,
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct Report {
    /// Why it stopped.
    pub exit: ExitReason,
    /// Milestones, in order.
    pub milestones: Vec<Milestone>,
    /// The payload's final parameter block (payload runs only).
    pub payload: Option<abi::Params>,
    /// Connections each NIC made (1 + reconnects).
    pub connections: Vec<u64>,
}

/// Devices shared by the vCPUs.
struct Devices {
    com1: Com1,
    nics: Vec<VirtioMmioNet>,
}

struct Shared {
    ram: Arc<GuestRam>,
    devices: Mutex<Devices>,
    links: Vec<Arc<Link>>,
    stop: AtomicBool,
    stop_evt: EventFd,
    exit: Mutex<Option<ExitReason>>,
    milestones: Mutex<Vec<Milestone>>,
    t0: Instant,
    payload: bool,
    vm: VmFd,
    mem: u64,
    /// Set to park the vCPU (a migration's stop-and-copy); see [`park`].
    pause: AtomicBool,
    /// Written with `pause`: wakes a vCPU idling in [`idle`] (drained when it parks).
    pause_evt: EventFd,
    park: Mutex<Park>,
    park_cv: Condvar,
    /// The vCPU threads, to kick them out of KVM_RUN.
    vcpu_threads: Mutex<Vec<libc::pthread_t>>,
}

/// A parked vCPU's state, and what it is told to do next.
#[derive(Default)]
struct Park {
    saved: Option<std::result::Result<VcpuState, String>>,
    /// `Some(true)`: the guest left (migrated); `Some(false)`: run on.
    leave: Option<bool>,
}

impl Shared {
    fn devices(&self) -> MutexGuard<'_, Devices> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn milestone(&self, what: &'static str) {
        let at = self.t0.elapsed();
        tracing::debug!("{what} at {:.3} ms", at.as_secs_f64() * 1e3);
        self.milestones.lock().unwrap_or_else(|e| e.into_inner()).push(Milestone { what, at });
    }

    fn exit_reason(&self) -> Option<ExitReason> {
        *self.exit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the first exit reason and asks everything to stop.
    fn finish(&self, why: ExitReason) {
        let mut e = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            *e = Some(why);
        }
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.stop_evt.write(1);
    }
}

/// A built VM, ready to run.
pub struct Vm {
    shared: Arc<Shared>,
    // Kept alive for the VM's lifetime (the vCPU fds are moved into their threads).
    _kvm: Kvm,
    vcpus: Vec<VcpuFd>,
}

/// The signal that kicks vCPU threads out of KVM_RUN.
fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Vm {
    /// Creates the VM: KVM, memory, devices, NIC connections, the boot image and vCPUs.
    pub fn new(cfg: &VmConfig) -> Result<Vm> {
        let t0 = Instant::now();
        if cfg.nets.len() > layout::MAX_NICS {
            return Err(Error::Config(format!("at most {} --net NICs per VM", layout::MAX_NICS)));
        }
        if cfg.cpus == 0 {
            return Err(Error::Config("--cpus must be at least 1".into()));
        }
        if let Boot::Payload(p) = &cfg.boot {
            p.validate(cfg.nets.len())?;
        }
        let kvm = Kvm::new().map_err(|source| Error::OpenKvm { source })?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(Error::KvmApiVersion(api));
        }
        for (cap, name, why) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY", "to give the guest its RAM"),
            (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD", "so queue notifications go straight to the switch"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::MissingCap { cap: name, why });
            }
        }
        let vm = kvm.create_vm().map_err(Error::kvm(
            "KVM_CREATE_VM",
            "is another hypervisor holding VT-x/AMD-V, or are you out of memory?",
        ))?;
        let irqchip = kvm.check_extension(Cap::Irqchip) && kvm.check_extension(Cap::Irqfd);
        if irqchip {
            vm.set_tss_address(KVM_TSS_ADDR as usize)
                .map_err(Error::kvm("KVM_SET_TSS_ADDR", "the TSS address collides with guest memory"))?;
            vm.create_irq_chip().map_err(Error::kvm("KVM_CREATE_IRQCHIP", "check dmesg for KVM messages"))?;
            if kvm.check_extension(Cap::Pit2) {
                let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
                vm.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2", "check dmesg for KVM messages"))?;
            }
        } else {
            tracing::warn!("no in-kernel irqchip/irqfd: guests get no interrupts (the payload needs none)");
        }

        let ram = Arc::new(GuestRam::new(cfg.mem, cfg.hugepages)?);
        ram.register(&vm)?;

        // Serial console.
        let out: Box<dyn Write + Send> = match &cfg.serial {
            SerialOut::Stdout => Box::new(std::io::stdout()),
            SerialOut::File(p) => {
                Box::new(File::create(p).map_err(Error::io(format!("creating {}", p.display())))?)
            }
            SerialOut::Null => Box::new(std::io::sink()),
        };
        let com1_irq = if irqchip {
            let e = EventFd::new(EFD_NONBLOCK).map_err(Error::io("eventfd"))?;
            vm.register_irqfd(&e, COM1_IRQ).map_err(Error::kvm("KVM_IRQFD (serial)", "check dmesg"))?;
            Some(e)
        } else {
            None
        };
        let com1 = Com1::new(IrqLine(com1_irq), out);

        // NICs: connect to the switch first, so their features are known.
        let payload_mode = matches!(cfg.boot, Boot::Payload(_));
        let mut links = Vec::new();
        let mut nics = Vec::new();
        for (i, spec) in cfg.nets.iter().enumerate() {
            let link = Arc::new(Link::connect(i, spec.clone(), ram.clone(), cfg.net_wait)?);
            let base = layout::nic_mmio(i);
            for q in 0..QUEUES {
                vm.register_ioevent(
                    link.kick_fd(q),
                    &IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY),
                    q as u32,
                )
                .map_err(Error::kvm("KVM_IOEVENTFD", "the host lacks ioeventfd slots"))?;
                // The payload has no interrupt handler: it waits on the call fds through the
                // idle port instead.
                if irqchip && !payload_mode {
                    vm.register_irqfd(link.call_fd(q), VIRTIO_IRQ_BASE + i as u32)
                        .map_err(Error::kvm("KVM_IRQFD (virtio-net)", "check dmesg"))?;
                }
            }
            nics.push(VirtioMmioNet::new(link.clone(), spec.mac));
            links.push(link);
        }

        let ncpus = if payload_mode {
            if cfg.cpus > 1 {
                tracing::warn!("the payload runs on one vCPU; --cpus {} ignored", cfg.cpus);
            }
            1
        } else {
            cfg.cpus
        };
        let mut vcpus = Vec::new();
        for id in 0..ncpus {
            vcpus.push(
                vm.create_vcpu(u64::from(id)).map_err(Error::kvm(
                    "KVM_CREATE_VCPU",
                    "check --cpus against `hostvm info` (max vCPUs)",
                ))?,
            );
        }
        let start = match &cfg.boot {
            Boot::Payload(p) => {
                let placed: Vec<(u64, [u8; 6])> =
                    cfg.nets.iter().enumerate().map(|(i, n)| (layout::nic_mmio(i), n.mac)).collect();
                let tsc_khz = vcpus[0].get_tsc_khz().unwrap_or(0);
                let entry = payload::load(&ram, p, &placed, u64::from(tsc_khz))?;
                Start::Ring3 { entry, stack: payload::STACK_TOP, arg: abi::PARAMS_GPA }
            }
            Boot::Linux(l) => {
                let tables = acpi::build(ncpus, cfg.nets.len())?;
                tables.write(ram.mem())?;
                crate::linux::load(&ram, l, tables.rsdp())?
            }
        };
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID", "check dmesg for KVM messages"))?;
        for (id, fd) in vcpus.iter().enumerate() {
            if id == 0 {
                vcpu::setup(fd, 0, &cpuid, ram.mem(), start)?;
            } else {
                // Application processors wait for the boot CPU's INIT/SIPI (in-kernel LAPIC).
                vcpu::set_cpuid(fd, id as u8, &cpuid)?;
            }
        }
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| Error::Io { what: "installing the vCPU kick signal".into(), source: e.into() })?;

        let shared = Arc::new(Shared {
            ram,
            devices: Mutex::new(Devices { com1, nics }),
            links,
            stop: AtomicBool::new(false),
            stop_evt: EventFd::new(EFD_NONBLOCK).map_err(Error::io("eventfd"))?,
            exit: Mutex::new(None),
            milestones: Mutex::new(Vec::new()),
            t0,
            payload: payload_mode,
            vm,
            mem: cfg.mem,
            pause: AtomicBool::new(false),
            pause_evt: EventFd::new(EFD_NONBLOCK).map_err(Error::io("eventfd"))?,
            park: Mutex::new(Park::default()),
            park_cv: Condvar::new(),
            vcpu_threads: Mutex::new(Vec::new()),
        });
        shared.milestone("VM set up");
        Ok(Vm { shared, _kvm: kvm, vcpus })
    }

    /// The guest's RAM (to read the payload's counters while it runs).
    pub fn ram(&self) -> Arc<GuestRam> {
        self.shared.ram.clone()
    }

    /// A handle to watch and stop the VM from another thread.
    pub fn handle(&self) -> Handle {
        Handle(self.shared.clone())
    }

    /// Runs until the guest stops or [`Handle::stop`] is called.
    pub fn run(mut self) -> Result<Report> {
        let mut threads: Vec<JoinHandle<Result<()>>> = Vec::new();
        for (i, fd) in self.vcpus.drain(..).enumerate() {
            let sh = self.shared.clone();
            let h = thread::Builder::new()
                .name(format!("hostvm-vcpu{i}"))
                .spawn(move || run_vcpu(&sh, fd, i == 0))
                .map_err(Error::io("starting a vCPU thread"))?;
            lock(&self.shared.vcpu_threads).push(h.as_pthread_t());
            threads.push(h);
        }
        // Wait for a stop, then for the vCPUs.
        while !self.shared.stop.load(Ordering::SeqCst) && threads.iter().any(|t| !t.is_finished()) {
            let mut pfd = libc::pollfd { fd: stop_fd(&self.shared), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
        }
        // From here on the vCPU threads may end: nobody may signal them by id any more
        // (`pause` kicks them under this lock).
        lock(&self.shared.vcpu_threads).clear();
        if self.shared.payload && self.shared.exit_reason().is_none() {
            // Let the payload finish its loop and exit through its port.
            payload::request_stop(&self.shared.ram);
            let deadline = Instant::now() + Duration::from_secs(1);
            while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
        }
        self.shared.finish(ExitReason::Stopped);
        let mut first_err = None;
        for t in threads {
            while !t.is_finished() {
                // SAFETY: the thread is alive (not finished) and owned by us; the signal has a
                // no-op handler, it only interrupts KVM_RUN.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
                thread::sleep(Duration::from_millis(5));
            }
            match t.join() {
                Ok(Err(e)) if first_err.is_none() => first_err = Some(e),
                Ok(_) => {}
                Err(_) => {
                    first_err.get_or_insert(Error::Config("a vCPU thread panicked".into()));
                }
            }
        }
        for l in &self.shared.links {
            l.shutdown();
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let sh = &self.shared;
        Ok(Report {
            exit: sh.exit_reason().unwrap_or(ExitReason::Stopped),
            milestones: sh.milestones.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            payload: if sh.payload { payload::read_params(&sh.ram) } else { None },
            connections: sh.links.iter().map(|l| l.connections()).collect(),
        })
    }
}

fn stop_fd(sh: &Shared) -> i32 {
    use std::os::fd::AsRawFd;
    sh.stop_evt.as_raw_fd()
}

/// Watches and stops a running VM.
#[derive(Clone)]
pub struct Handle(Arc<Shared>);

impl Handle {
    /// Asks the VM to stop (the payload finishes its loop; other guests are stopped).
    pub fn stop(&self) {
        let _ = self.0.stop_evt.write(1);
        self.0.stop.store(true, Ordering::SeqCst);
    }

    /// Milestones so far.
    pub fn milestones(&self) -> Vec<Milestone> {
        self.0.milestones.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Migrates the running guest to the hostvm waiting with `--incoming` on `path` (see
    /// [`migrate`]). On success the guest runs there and this VM's run ends with
    /// [`ExitReason::Migrated`]; on failure it runs on here and the error says why. `verify`
    /// sends a digest of all of RAM for the destination to check before it takes the guest.
    pub fn migrate(&self, path: &Path, verify: bool) -> Result<MigrationStats> {
        let sh = &*self.0;
        if !sh.payload {
            return Err(Error::Config(
                "only payload VMs migrate: a Linux guest's interrupt controllers are not carried".into(),
            ));
        }
        if lock(&sh.vcpu_threads).is_empty() || sh.stop.load(Ordering::SeqCst) {
            return Err(Error::Config("the VM is not running".into()));
        }
        let t0 = Instant::now();
        let mut tx = migrate::Sender::connect(path, &sh.ram, &hello(sh, verify))?;
        let logs = match sh.ram.log_dirty(&sh.vm, true).and_then(|()| start_logs(sh)) {
            Ok(l) => l,
            Err(e) => {
                abandon(sh, false);
                return Err(e);
            }
        };
        match precopy_and_switch(sh, &mut tx, &logs, verify, t0) {
            Ok(stats) => {
                sh.milestone("migrated out");
                sh.finish(ExitReason::Migrated);
                release(sh, true);
                Ok(stats)
            }
            Err((e, rings_stopped)) => {
                tracing::warn!("migration failed, the guest runs on here: {e}");
                abandon(sh, rings_stopped);
                release(sh, false);
                Err(e)
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn hello(sh: &Shared, verify: bool) -> Hello {
    Hello {
        version: migrate::version(),
        mem: sh.mem,
        macs: sh.devices().nics.iter().map(|n| n.mac()).collect(),
        verify,
    }
}

/// One dirty log per NIC, each handed to its switch port.
fn start_logs(sh: &Shared) -> Result<Vec<netfront::migration::DirtyLog>> {
    let covering = sh.ram.all_pages().last().map_or(0, |p| (p + 1) * migrate::PAGE);
    let mut logs = Vec::new();
    for l in &sh.links {
        let log =
            netfront::migration::DirtyLog::new(covering).map_err(Error::io("creating a dirty-log memfd"))?;
        l.start_log(&log)?;
        logs.push(log);
    }
    Ok(logs)
}

/// Pages written since the last call, by the vCPU (KVM's log) or the switch (the ports' logs);
/// also how many only the switch had.
fn dirty(sh: &Shared, logs: &[netfront::migration::DirtyLog]) -> Result<(Vec<u64>, u64)> {
    let vcpu = sh.ram.kvm_dirty_pages(&sh.vm)?;
    let switch: Vec<u64> = logs.iter().flat_map(|l| l.take_dirty_pages()).collect();
    Ok(migrate::union(vcpu, &switch))
}

/// The pre-copy rounds, the stop-and-copy and the destination's answer. An error says whether
/// the rings were already stopped.
fn precopy_and_switch(
    sh: &Shared,
    tx: &mut migrate::Sender<'_>,
    logs: &[netfront::migration::DirtyLog],
    verify: bool,
    t0: Instant,
) -> std::result::Result<MigrationStats, (Error, bool)> {
    let early = |e: Error| (e, false);
    // Clear what was logged before the full copy: the full copy sends it anyway.
    dirty(sh, logs).map_err(early)?;
    tx.send_pages(&sh.ram.all_pages()).map_err(early)?;
    let mut last = usize::MAX;
    loop {
        let (pages, only) = dirty(sh, logs).map_err(early)?;
        tx.stats.switch_only += only;
        tx.stats.dirty.push(pages.len());
        tx.send_pages(&pages).map_err(early)?;
        tx.stats.rounds += 1;
        let n = pages.len();
        if n <= migrate::SMALL_ROUND || n >= last || tx.stats.rounds >= migrate::MAX_ROUNDS {
            break;
        }
        last = n;
    }
    // Stop and copy.
    let down = Instant::now();
    let vcpu = pause(sh).map_err(early)?;
    tracing::debug!("vCPU parked after {:?}", down.elapsed());
    let stopped = |e: Error| (e, true);
    for l in &sh.links {
        l.stop_rings().map_err(stopped)?;
    }
    tracing::debug!("rings stopped after {:?}", down.elapsed());
    let nics = sh.devices().nics.iter().map(|n| n.snapshot()).collect();
    let (pages, only) = dirty(sh, logs).map_err(stopped)?;
    tx.stats.switch_only += only;
    tx.stats.dirty.push(pages.len());
    tx.send_pages(&pages).map_err(stopped)?;
    let digest = verify.then(|| migrate::digest(&sh.ram));
    tracing::debug!("last pages sent after {:?}", down.elapsed());
    tx.finish(&Final { vcpu, nics, digest }).map_err(stopped)?;
    tx.stats.downtime = down.elapsed();
    tx.stats.total = t0.elapsed();
    Ok(std::mem::take(&mut tx.stats))
}

/// A failed migration: logging off (KVM's and the switch's), the rings back to the switch.
fn abandon(sh: &Shared, rings_stopped: bool) {
    if let Err(e) = sh.ram.log_dirty(&sh.vm, false) {
        tracing::warn!("turning KVM's dirty log off: {e}");
    }
    for l in &sh.links {
        if let Err(e) = l.stop_log() {
            tracing::warn!("turning the switch's dirty log off: {e}");
        }
        if rings_stopped {
            if let Err(e) = l.restart() {
                tracing::error!("giving the rings back to the switch: {e}");
            }
        }
    }
}

/// Parks the vCPU and returns its state. Kicks it out of KVM_RUN until it is parked.
fn pause(sh: &Shared) -> Result<VcpuState> {
    let mut p = lock(&sh.park);
    p.saved = None;
    sh.pause.store(true, Ordering::SeqCst);
    // A vCPU idling for the payload (up to 100 ms) comes out at once.
    let _ = sh.pause_evt.write(1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(saved) = p.saved.take() {
            return saved.map_err(|e| {
                // The vCPU waits for a verdict even when its state could not be read.
                Error::Config(format!("reading the vCPU's state: {e}"))
            });
        }
        if sh.stop.load(Ordering::SeqCst) {
            sh.pause.store(false, Ordering::SeqCst);
            let _ = sh.pause_evt.read();
            return Err(Error::Config("the VM stopped while the migration was parking its vCPU".into()));
        }
        if Instant::now() >= deadline {
            sh.pause.store(false, Ordering::SeqCst);
            let _ = sh.pause_evt.read();
            return Err(Error::Config("the vCPU did not stop within 5 s".into()));
        }
        for &t in lock(&sh.vcpu_threads).iter() {
            // SAFETY: the vCPU threads outlive the run, which is going on (checked by the
            // caller); the signal's handler does nothing, it only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
        p = sh
            .park_cv
            .wait_timeout(p, Duration::from_millis(2))
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

/// Tells a parked vCPU to leave (the guest migrated) or run on.
fn release(sh: &Shared, leave: bool) {
    let mut p = lock(&sh.park);
    p.leave = Some(leave);
    sh.pause.store(false, Ordering::SeqCst);
    sh.park_cv.notify_all();
}

/// On the vCPU thread: completes any I/O KVM has pending (so the saved registers are after
/// the instruction), saves the state and waits for the verdict. True if the guest left.
fn park(sh: &Shared, fd: &mut VcpuFd) -> bool {
    let _ = sh.pause_evt.read();
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
    let saved = VcpuState::save(fd).map_err(|e| e.to_string());
    let mut p = lock(&sh.park);
    p.leave = None;
    p.saved = Some(saved);
    sh.park_cv.notify_all();
    loop {
        if let Some(leave) = p.leave.take() {
            return leave;
        }
        // No verdict but no longer wanted (the migration gave up waiting for this vCPU).
        if !sh.pause.load(Ordering::SeqCst) {
            return false;
        }
        if sh.stop.load(Ordering::SeqCst) {
            return true;
        }
        p = sh
            .park_cv
            .wait_timeout(p, Duration::from_millis(100))
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0);
    }
}

impl Vm {
    /// Waits up to `wait` for a migration source on `path` and takes its guest: memory, vCPU,
    /// NICs (the switch resumes the rings and announces the MAC from this VM's ports). Call
    /// before [`Vm::run`]; the guest then continues where it was.
    pub fn incoming(&mut self, path: &Path, wait: Duration) -> Result<()> {
        let sh = self.shared.clone();
        if !sh.payload {
            return Err(Error::Config(
                "only payload VMs migrate: a Linux guest's interrupt controllers are not carried".into(),
            ));
        }
        let mut rx = migrate::Receiver::accept(path, wait)?;
        rx.hello(&hello(&sh, false))?;
        let res = (|| {
            let fin = rx.receive(&sh.ram)?;
            let t = Instant::now();
            if let Some(theirs) = &fin.digest {
                let bad = migrate::digest_mismatch(&sh.ram, theirs);
                if !bad.is_empty() {
                    return Err(Error::Config(format!(
                        "guest memory differs from the source's in {} MiB chunk(s) (first at {:#x}): a \
                         dirty page was missed",
                        bad.len(),
                        bad[0] << 20
                    )));
                }
            }
            let vcpu = self.vcpus.first().ok_or_else(|| Error::Config("no vCPU".into()))?;
            fin.vcpu.load(vcpu)?;
            let mut d = sh.devices();
            if fin.nics.len() != d.nics.len() {
                return Err(Error::Config("the source sent state for a different number of NICs".into()));
            }
            tracing::debug!("vCPU loaded {:?} after the last record", t.elapsed());
            for (n, st) in d.nics.iter_mut().zip(&fin.nics) {
                n.restore(st).map_err(Error::Config)?;
            }
            tracing::debug!("NICs resumed {:?} after the last record", t.elapsed());
            Ok(())
        })();
        match res {
            Ok(()) => {
                rx.answer(None)?;
                sh.milestone("migrated in");
                Ok(())
            }
            Err(e) => {
                let _ = rx.answer(Some(e.to_string()));
                Err(e)
            }
        }
    }
}

fn run_vcpu(sh: &Shared, mut fd: VcpuFd, boot: bool) -> Result<()> {
    if boot {
        sh.milestone("first KVM_RUN");
    }
    loop {
        if sh.stop.load(Ordering::SeqCst) && sh.exit_reason().is_some() {
            return Ok(());
        }
        if sh.pause.load(Ordering::SeqCst) {
            if park(sh, &mut fd) {
                return Ok(());
            }
            continue;
        }
        let exit = match fd.run() {
            Ok(e) => e,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => {
                sh.finish(ExitReason::Stopped);
                return Err(Error::Kvm { op: "KVM_RUN", source: e, hint: "check dmesg for KVM messages" });
            }
        };
        match exit {
            VcpuExit::IoOut(port, data) => pio_write(sh, port, data),
            VcpuExit::IoIn(port, data) => pio_read(sh, port, data),
            VcpuExit::MmioRead(addr, data) => {
                if !mmio(sh, addr, |n, off| n.read(off, data)) {
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                mmio(sh, addr, |n, off| n.write(off, data));
            }
            VcpuExit::Hlt => {
                sh.finish(ExitReason::Halted);
                return Ok(());
            }
            VcpuExit::Shutdown => {
                tracing::info!("guest reset (triple fault or reset request): {}", vcpu::describe(&fd));
                sh.finish(ExitReason::Reset);
                return Ok(());
            }
            VcpuExit::SystemEvent(kind, _) => {
                let why = if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET {
                    ExitReason::Reset
                } else {
                    ExitReason::PowerOff
                };
                sh.finish(why);
                return Ok(());
            }
            VcpuExit::InternalError => {
                sh.finish(ExitReason::Stopped);
                return Err(Error::Config(
                    "KVM internal error (the host could not emulate a guest instruction; on PVM hosts \
                     guest ring-0 code is emulated and stock kernels hit this)"
                        .into(),
                ));
            }
            VcpuExit::FailEntry(reason, cpu) => {
                sh.finish(ExitReason::Stopped);
                return Err(Error::Config(format!(
                    "KVM refused to enter the guest on CPU {cpu} (hardware reason {reason:#x}): the \
                     initial vCPU state is invalid for this host"
                )));
            }
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
            other => {
                sh.finish(ExitReason::Stopped);
                return Err(Error::Config(format!("unexpected vCPU exit: {other:?}")));
            }
        }
    }
}

/// Routes an MMIO access to its NIC; false if nothing is mapped there.
fn mmio(sh: &Shared, addr: u64, f: impl FnOnce(&mut VirtioMmioNet, u64)) -> bool {
    let base = layout::VIRTIO_MMIO_BASE;
    if addr >= base {
        let i = ((addr - base) / VIRTIO_MMIO_SIZE) as usize;
        let mut d = sh.devices();
        if let Some(n) = d.nics.get_mut(i) {
            f(n, (addr - base) % VIRTIO_MMIO_SIZE);
            return true;
        }
    }
    tracing::debug!("MMIO access to unmapped {addr:#x}");
    false
}

fn pio_write(sh: &Shared, port: u16, data: &[u8]) {
    let v = data.iter().rev().fold(0u32, |a, &b| (a << 8) | u32::from(b));
    match port {
        p if (COM1_PORT..COM1_PORT + 8).contains(&p) => {
            sh.devices().com1.write((p - COM1_PORT) as u8, data[0]);
        }
        abi::PORT_EXIT if sh.payload => sh.finish(ExitReason::Payload(v)),
        abi::PORT_IDLE if sh.payload => idle(sh, Duration::from_micros(u64::from(v).min(100_000))),
        abi::PORT_EVENT if sh.payload => {
            let what = match v {
                abi::event::STARTED => "first guest instruction",
                abi::event::NICS_READY => "payload NICs ready",
                abi::event::FIRST_RX => "first frame received",
                abi::event::FIRST_TX => "first frame sent",
                _ => "unknown payload event",
            };
            sh.milestone(what);
        }
        0x64 if data[0] == 0xfe => sh.finish(ExitReason::Reset),
        acpi::PM_PORT if !sh.payload => match acpi::pm_write(data[0]) {
            Some(acpi::PmRequest::PowerOff) => sh.finish(ExitReason::PowerOff),
            Some(acpi::PmRequest::Reset) => sh.finish(ExitReason::Reset),
            None => {}
        },
        _ => {}
    }
}

fn pio_read(sh: &Shared, port: u16, data: &mut [u8]) {
    match port {
        p if (COM1_PORT..COM1_PORT + 8).contains(&p) => {
            data[0] = sh.devices().com1.read((p - COM1_PORT) as u8);
        }
        _ => data.fill(0xff),
    }
}

/// The payload is idle: wait until a NIC is notified (its call eventfds), a stop, a migration
/// parking the vCPU, or `max`.
fn idle(sh: &Shared, max: Duration) {
    use std::os::fd::AsRawFd;
    let mut fds: Vec<libc::pollfd> = sh
        .links
        .iter()
        .flat_map(|l| (0..QUEUES).map(move |q| l.call_fd(q).as_raw_fd()))
        .chain([sh.stop_evt.as_raw_fd(), sh.pause_evt.as_raw_fd()])
        .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
        .collect();
    let ms = max.as_millis().max(1) as i32;
    // SAFETY: `fds` is a valid array of pollfds for the duration of the call.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    for l in &sh.links {
        for q in 0..QUEUES {
            let _ = l.call_fd(q).read();
        }
    }
}
