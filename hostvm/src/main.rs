//! `hostvm`: run a VM whose NICs are vhost-user ports of the switch.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use hostvm::info::{self, MmuMode};
use hostvm::linux::LinuxConfig;
use hostvm::net::{parse_mac, Mac, NetSpec};
use hostvm::payload::{self, abi, PayloadConfig, Role};
use hostvm::vm::{Boot, ExitReason, Report, SerialOut, Vm, VmConfig};

/// A lightweight KVM host whose guests' NICs are vhost-user ports of the switch.
#[derive(Parser)]
#[command(name = "hostvm", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log filter (error, warn, info, debug, trace or a tracing directive).
    #[arg(long, global = true, default_value = "warn", env = "HOSTVM_LOG")]
    log: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a VM: a Linux kernel (--kernel) or the built-in payload (--payload).
    Run(Box<RunArgs>),
    /// What this host's KVM offers: MMU virtualization mode, capabilities, huge pages.
    Info,
}

#[derive(Args)]
struct RunArgs {
    /// Guest memory (bytes, or with a K, M or G suffix).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    mem: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Back guest memory with 2 MiB huge pages (reserve them first).
    #[arg(long)]
    hugepages: bool,
    /// Kernel: a PVH vmlinux or a bzImage.
    #[arg(long, conflicts_with = "payload")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=-1")]
    cmdline: String,
    /// Run the built-in guest payload in this role: echo, forward, sink or send.
    #[arg(long, value_parser = |s: &str| s.parse::<Role>())]
    payload: Option<Role>,
    /// Payload: frames to send (send), or to receive before finishing (sink; 0 = until stopped).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Payload send: frame length in bytes (60-1514).
    #[arg(long, default_value_t = 64)]
    frame_len: u32,
    /// Payload send: destination MAC.
    #[arg(long, default_value = "ff:ff:ff:ff:ff:ff", value_parser = parse_dst_mac)]
    dst_mac: [u8; 6],
    /// Payload: poll continuously, never idle (benchmarks; costs a core).
    #[arg(long)]
    busy_poll: bool,
    /// Payload send: frames per second (0: as fast as the rings allow).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Payload: descriptors per queue (power of two, 2-256).
    #[arg(long, default_value_t = 256)]
    queue_size: u32,
    /// A NIC: socket=PATH,mac=MAC[,server] (repeat for more NICs).
    #[arg(long = "net", value_parser = |s: &str| s.parse::<NetSpec>())]
    nets: Vec<NetSpec>,
    /// Serial console: stdout, file:PATH or null.
    #[arg(long, default_value = "stdout", value_parser = parse_serial)]
    serial: SerialOut,
    /// Seconds to wait for each NIC's switch port at start.
    #[arg(long, default_value_t = 30)]
    net_wait: u64,
    /// Payload: print its counters every this many seconds (0: only at the end).
    #[arg(long, default_value_t = 1.0)]
    stats_interval: f64,
    /// Live migration: wait on this socket for a source hostvm's guest instead of starting
    /// one (same --mem and --net MACs; its NICs on their own switch ports).
    #[arg(long, conflicts_with = "kernel")]
    incoming: Option<PathBuf>,
    /// Seconds --incoming waits for the source.
    #[arg(long, default_value_t = 60)]
    incoming_wait: u64,
    /// Live migration: on SIGUSR1, migrate the guest to the hostvm waiting with --incoming on
    /// this socket.
    #[arg(long, conflicts_with = "kernel")]
    migrate_to: Option<PathBuf>,
    /// With --migrate-to: send a digest of all guest memory for the destination to check
    /// before it takes the guest (costs downtime: one pass over RAM on each side).
    #[arg(long, requires = "migrate_to")]
    migrate_verify: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("bad size `{s}`: use a K, M or G suffix")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad size `{s}`: expected a number like 512M"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size `{s}` is too large"))
}

fn parse_dst_mac(s: &str) -> Result<[u8; 6], String> {
    if s.eq_ignore_ascii_case("ff:ff:ff:ff:ff:ff") {
        return Ok([0xff; 6]);
    }
    parse_mac(s).map_err(|e| e.to_string())
}

fn parse_serial(s: &str) -> Result<SerialOut, String> {
    match s {
        "stdout" => Ok(SerialOut::Stdout),
        "null" => Ok(SerialOut::Null),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialOut::File(p.into())),
            _ => Err(format!("bad --serial `{s}`: expected stdout, file:PATH or null")),
        },
    }
}

static STOP: AtomicBool = AtomicBool::new(false);
static MIGRATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_migrate(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    MIGRATE.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(format!("hostvm={}", cli.log))
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let res = match cli.cmd {
        Cmd::Info => info::report().map(|r| {
            print!("{r}");
            ExitCode::SUCCESS
        }),
        Cmd::Run(args) => run(*args),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hostvm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: RunArgs) -> hostvm::Result<ExitCode> {
    let boot = match (&a.kernel, a.payload) {
        (Some(k), None) => Boot::Linux(LinuxConfig {
            kernel: k.clone(),
            initrd: a.initrd.clone(),
            cmdline: a.cmdline.clone(),
        }),
        (None, Some(role)) => Boot::Payload(PayloadConfig {
            role,
            count: a.count,
            frame_len: a.frame_len,
            dst_mac: a.dst_mac,
            busy_poll: a.busy_poll,
            queue_size: a.queue_size,
            rate_pps: a.rate,
        }),
        _ => {
            return Err(hostvm::Error::Config(
                "say what to boot: --kernel PATH (Linux) or --payload echo|forward|sink|send".into(),
            ))
        }
    };
    let mode = MmuMode::detect();
    eprintln!("hostvm: MMU virtualization: {mode}");
    eprintln!("hostvm:   {}", mode.advice());
    if mode.is_hap() && !a.hugepages {
        eprintln!("hostvm:   tip: --hugepages backs this guest with 2 MiB pages");
    }
    if matches!(boot, Boot::Linux(_)) && !mode.runs_linux() {
        eprintln!(
            "hostvm:   this host cannot run a Linux kernel at useful speed; expect only its first lines"
        );
    }
    let payload_run = matches!(boot, Boot::Payload(_));
    let cfg = VmConfig {
        mem: a.mem,
        cpus: a.cpus,
        hugepages: a.hugepages,
        boot,
        nets: a.nets.clone(),
        serial: a.serial.clone(),
        net_wait: Duration::from_secs(a.net_wait),
    };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal)
            .map_err(|e| hostvm::Error::Io { what: "installing signal handlers".into(), source: e.into() })?;
    }
    if a.migrate_to.is_some() {
        vmm_sys_util::signal::register_signal_handler(libc::SIGUSR1, on_migrate)
            .map_err(|e| hostvm::Error::Io { what: "installing signal handlers".into(), source: e.into() })?;
    }
    let mut vm = Vm::new(&cfg)?;
    if let Some(p) = &a.incoming {
        eprintln!("hostvm: waiting for a migrating guest on {}", p.display());
        vm.incoming(p, Duration::from_secs(a.incoming_wait))?;
        eprintln!("hostvm: guest migrated in; running it");
    }
    for (i, n) in a.nets.iter().enumerate() {
        eprintln!(
            "hostvm: nic{i} {} on {}{}",
            Mac(n.mac),
            n.socket.display(),
            if n.server { " (server)" } else { "" }
        );
    }
    let ram = vm.ram();
    eprintln!(
        "hostvm: guest memory {} MiB on {}",
        ram.size() >> 20,
        if ram.hugepages() { "2 MiB huge pages" } else { "4 KiB pages (memfd)" }
    );
    let handle = vm.handle();
    let runner = thread::Builder::new()
        .name("hostvm-run".into())
        .spawn(move || vm.run())
        .map_err(|e| hostvm::Error::Io { what: "starting the VM thread".into(), source: e })?;
    let nics = a.nets.len();
    let mut last = (Instant::now(), vec![abi::NicStats::default(); nics]);
    let mut shown = 0;
    while !runner.is_finished() {
        let ms = handle.milestones();
        for m in &ms[shown..] {
            eprintln!("hostvm: {:>10.3} ms  {}", m.at.as_secs_f64() * 1e3, m.what);
        }
        shown = ms.len();
        if STOP.swap(false, Ordering::SeqCst) {
            handle.stop();
        }
        if let (true, Some(to)) = (MIGRATE.swap(false, Ordering::SeqCst), &a.migrate_to) {
            eprintln!("hostvm: migrating to {}", to.display());
            match handle.migrate(to, a.migrate_verify) {
                Ok(s) => eprintln!(
                    "hostvm: migrated: total {:.1} ms, downtime {:.1} ms, {} rounds (dirty pages {:?}), \
                     {} pages sent, {} zero, {} dirtied only by the switch",
                    s.total.as_secs_f64() * 1e3,
                    s.downtime.as_secs_f64() * 1e3,
                    s.rounds,
                    s.dirty,
                    s.pages_sent,
                    s.zero_pages,
                    s.switch_only
                ),
                Err(e) => eprintln!("hostvm: migration failed, the guest runs on here: {e}"),
            }
        }
        thread::sleep(Duration::from_millis(50));
        if payload_run && a.stats_interval > 0.0 && last.0.elapsed().as_secs_f64() >= a.stats_interval {
            if let Some(p) = payload::read_params(&ram) {
                let dt = last.0.elapsed().as_secs_f64();
                for i in 0..nics {
                    let (s, o) = (p.stats[i], last.1[i]);
                    eprintln!(
                        "hostvm: nic{i} rx {} ({:.3} Mpps) tx {} ({:.3} Mpps)",
                        s.rx_frames,
                        (s.rx_frames - o.rx_frames) as f64 / dt / 1e6,
                        s.tx_frames,
                        (s.tx_frames - o.tx_frames) as f64 / dt / 1e6,
                    );
                    last.1[i] = s;
                }
                last.0 = Instant::now();
            }
        }
    }
    let report = runner.join().map_err(|_| hostvm::Error::Config("the VM thread panicked".into()))??;
    print_report(&report, shown);
    Ok(match report.exit {
        ExitReason::Payload(0)
        | ExitReason::Stopped
        | ExitReason::PowerOff
        | ExitReason::Halted
        | ExitReason::Migrated => ExitCode::SUCCESS,
        ExitReason::Payload(c) => ExitCode::from(c.clamp(1, 255) as u8),
        ExitReason::Reset => ExitCode::from(2),
    })
}

fn print_report(r: &Report, shown: usize) {
    for m in r.milestones.iter().skip(shown) {
        eprintln!("hostvm: {:>10.3} ms  {}", m.at.as_secs_f64() * 1e3, m.what);
    }
    if let Some(p) = &r.payload {
        let state = match p.state {
            abi::state::RUNNING => "running",
            abi::state::DONE => "done",
            abi::state::FAILED => "failed",
            _ => "initialising",
        };
        eprintln!("hostvm: payload {state} (error {})", p.error);
        for i in 0..(p.nics as usize).min(abi::MAX_NICS) {
            let s = p.stats[i];
            eprintln!(
                "hostvm: nic{i} rx_frames={} rx_bytes={} tx_frames={} tx_bytes={} tx_full={} bad_used={} idles={}",
                s.rx_frames, s.rx_bytes, s.tx_frames, s.tx_bytes, s.tx_full, s.bad_used, s.idles
            );
        }
    }
    for (i, c) in r.connections.iter().enumerate() {
        if *c > 1 {
            eprintln!("hostvm: nic{i} reconnected {} times", c - 1);
        }
    }
    eprintln!("hostvm: exit: {:?}", r.exit);
}
