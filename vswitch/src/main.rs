//! `vswitch`: run the switch, or talk to a running one.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vswitch::control::{
    request, AccelReport, NicReport, PolicyReport, PortInfo, RebalanceReport, Request, Stats,
};
use vswitch::counters::DropReason;
use vswitch::l2::FdbEntry;
use vswitch::policy::spoof::SpoofConfig;
use vswitch::policy::{BitRate, ByteSize, PolicerConfig, PolicyConfig, ShaperConfig};
use vswitch::{PortConfig, Switch, SwitchConfig, UnsealedMemory};

mod vfcli;

const DEFAULT_CONTROL: &str = "/run/vswitch.ctl";

#[derive(Parser)]
#[command(name = "vswitch", version, about = "Polling vhost-user L2 switch")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the switch until SIGINT/SIGTERM.
    Run(RunArgs),
    /// Query or change a running switch.
    Ctl {
        /// Control socket of the running switch.
        #[arg(long, env = "VSWITCH_CONTROL", default_value = DEFAULT_CONTROL)]
        control: PathBuf,
        /// Print raw JSON.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        what: CtlCmd,
    },
    /// SR-IOV VF policy in iproute2's words, on a Level 3 NIC model of the running switch or
    /// on a real PF (rtnetlink, the messages `ip link set DEV vf N ...` sends):
    /// `vf DEV N [mac MAC] [vlan VID [qos Q] [proto 802.1Q|802.1ad]] [spoofchk on|off]
    /// [trust on|off] [state auto|enable|disable] [max_tx_rate MBPS] [min_tx_rate MBPS]
    /// [query_rss on|off]`, `vf DEV show [--json]`, `vf DEV attach N PORT`, `vf DEV detach N`.
    Vf {
        /// Control socket of the running switch (DEV is looked for among its ports first).
        #[arg(long, env = "VSWITCH_CONTROL", default_value = DEFAULT_CONTROL)]
        control: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// A Level 3 NIC port of the running switch, or a Linux PF network device.
        dev: String,
        /// What to do (see above).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        words: Vec<String>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML configuration file (command-line options are added to it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// NAME=SOCKET_PATH[,client][,vlan=N|,trunk=N:M:...][,queues=N][,mac=..][,police=RATE]
    /// [,shape=RATE][,anti-spoof][,offloads=on|off][,packed=on|off][,pmd=N[:N..]]; or an
    /// uplink to the host's network stack, NAME=tap:IFNAME[,queues=N][,mtu=N][,vlan=N|,trunk=..]
    /// (creates the TAP device, or attaches to an existing one); or an existing device (a NIC,
    /// a VF, a veth) through packet sockets, NAME=afpacket:IFNAME[,queues=N][,mtu=N][,offloads=on|off], or through XDP
    /// sockets, NAME=afxdp:IFNAME[,queues=N][,mode=auto|zerocopy|copy|skb][,mtu=N]; or a
    /// tunnel, NAME=vxlan:REMOTE|geneve:REMOTE[,vni=N][,local=IP][,dstport=N]; repeatable.
    #[arg(long = "port", value_name = "SPEC")]
    ports: Vec<String>,
    /// CPUs for polling threads, e.g. 0,1 (one thread per CPU).
    #[arg(long, value_delimiter = ',')]
    pmd_cores: Vec<usize>,
    /// Poll without ever sleeping (benchmarks); default is adaptive.
    #[arg(long)]
    busy_poll: bool,
    /// Under load, leave one burst in a guest's transmit ring for up to N µs while the next
    /// queues (0 = off). Raises DPDK guests' packet rate; adds up to N µs of latency.
    #[arg(long, value_name = "N")]
    batch_wait_us: Option<u32>,
    /// With several polling threads, check every SECS seconds whether moving queues between
    /// them by their measured load would lower the busiest one's load (default 60; 0 = only
    /// on `ctl rebalance`).
    #[arg(long, value_name = "SECS")]
    rebalance_interval: Option<u32>,
    /// Rebalance by itself only while the busiest polling thread is loaded past PCT percent
    /// (default 70) ...
    #[arg(long, value_name = "PCT")]
    rebalance_load: Option<u32>,
    /// ... and the new assignment lowers its load by at least PCT percent (default 25).
    #[arg(long, value_name = "PCT")]
    rebalance_improvement: Option<u32>,
    /// Guest memory whose file could lose pages (a memfd without F_SEAL_SHRINK: DPDK
    /// virtio-user; hugetlbfs; QEMU's memory-backend-file): refuse it (default), or map it
    /// and survive a truncation by dropping only that port.
    #[arg(long, value_name = "refuse|guard")]
    unsealed_memory: Option<UnsealedMemory>,
    /// Most guest memory one port may map (default 1TiB).
    #[arg(long, value_name = "SIZE")]
    max_guest_mem: Option<ByteSize>,
    /// Slots of the forwarding table (default 65536): size it for the MACs all ports may
    /// learn together (their max-macs), with room.
    #[arg(long, value_name = "N")]
    fdb_entries: Option<u32>,
    /// Control socket path.
    #[arg(long, env = "VSWITCH_CONTROL")]
    control: Option<PathBuf>,
    /// Permission bits of the ports' socket files, in octal (default 660: the switch's user
    /// and group may connect, nobody else).
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    socket_mode: Option<u32>,
    /// Group of the ports' socket files (name or number), e.g. the group QEMU runs as.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Print port rates every N seconds (0 = never).
    #[arg(long, default_value_t = 0)]
    stats_interval: u64,
}

#[derive(Subcommand)]
enum CtlCmd {
    /// List ports and what they negotiated.
    Ports,
    /// Per-port counters and polling-thread load.
    Stats,
    /// Dump the forwarding table.
    Fdb,
    /// Empty the forwarding table.
    FdbFlush,
    /// Assign the ports' queues to polling threads again by their load over the last seconds
    /// (`stats` shows each thread's queues and loads).
    Rebalance,
    /// Poll a port's queue pair on one polling thread (pmdN, as `stats` numbers them), kept
    /// there by rebalancing; `none` lets rebalancing move it again.
    QueuePin {
        /// Port name.
        name: String,
        /// Queue pair.
        queue_pair: u16,
        /// Thread index, or `none`.
        pmd: String,
    },
    /// Add a port: NAME=SOCKET_PATH[,client][,vlan=N|,trunk=..], NAME=tap:IFNAME[,queues=N][,mtu=N]
    /// NAME=afpacket:IFNAME[,queues=N][,mtu=N], NAME=afxdp:IFNAME[,mode=..] or a tunnel
    /// (NAME=vxlan:REMOTE|geneve:REMOTE[,..]).
    PortAdd {
        /// Port spec.
        spec: String,
    },
    /// Remove a port by name.
    PortDel {
        /// Port name.
        name: String,
    },
    /// Show a port's policy and drops by reason; with options, change it (the guest stays
    /// connected; what is not mentioned is kept).
    Policy(PolicyArgs),
    /// Show a NIC model's filters, pools (the guest ports it serves) and what the device did.
    Nic {
        /// Port name (a nic: port).
        name: String,
    },
    /// Accelerator modules: give a guest port's queue pair to a NIC tier and take it back, the
    /// guest noticing nothing.
    #[command(subcommand)]
    Accel(AccelCmd),
}

#[derive(Subcommand)]
enum AccelCmd {
    /// Plug a guest port into a tier (the reason is printed if the tier refuses; the port then
    /// stays on the software path).
    Plug {
        /// Guest port name.
        name: String,
        /// The tier: l1 (the NIC's MAC/VLAN demux writes the wire's frames into the guest's
        /// posted buffers; on a nic:...,level=1 or 2 port) or l2 (direct queue pairs: the
        /// device drives the guest's own rings; on a nic:...,level=2 port).
        #[arg(long, default_value = "l2")]
        tier: String,
    },
    /// Unplug it: quiesce, drain, hand the rings back to the software path (from l1: the NIC
    /// unbinds it). It stays on the software path until plugged again.
    Unplug {
        /// Guest port name.
        name: String,
    },
    /// Tier, since when, packets the device handled, drains and refusals.
    Status {
        /// One guest port (all if left out).
        name: Option<String>,
    },
}

#[derive(clap::Args)]
struct PolicyArgs {
    /// Port name.
    name: String,
    /// Police what the guest sends at RATE (bits/s: 800k, 100M, 1.5G).
    #[arg(long, value_name = "RATE")]
    police: Option<BitRate>,
    /// Policer burst (bytes: 64KiB).
    #[arg(long, value_name = "SIZE", requires = "police")]
    police_burst: Option<ByteSize>,
    /// Stop policing.
    #[arg(long, conflicts_with = "police")]
    no_police: bool,
    /// Shape what the guest receives to RATE.
    #[arg(long, value_name = "RATE")]
    shape: Option<BitRate>,
    /// Shaper burst.
    #[arg(long, value_name = "SIZE", requires = "shape")]
    shape_burst: Option<ByteSize>,
    /// Packets the shaper may hold back (1..4096).
    #[arg(long, value_name = "N", requires = "shape")]
    shape_queue: Option<u32>,
    /// Stop shaping (held packets are delivered at once).
    #[arg(long, conflicts_with = "shape")]
    no_shape: bool,
    /// Anti-spoofing on or off.
    #[arg(long, value_name = "on|off")]
    anti_spoof: Option<OnOff>,
    /// Allowed source MAC (repeatable; replaces the list; default the port's MAC).
    #[arg(long = "allow-mac", value_name = "MAC")]
    allow_macs: Vec<String>,
    /// Allowed source IP or prefix (repeatable; replaces the list; turns IP checking on).
    #[arg(long = "allow-ip", value_name = "IP[/LEN]")]
    allow_ips: Vec<String>,
    /// Stop checking IP sources (MAC checks stay).
    #[arg(long, conflicts_with = "allow_ips")]
    no_ip_check: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

impl PolicyArgs {
    fn changes_anything(&self) -> bool {
        self.police.is_some()
            || self.no_police
            || self.shape.is_some()
            || self.no_shape
            || self.anti_spoof.is_some()
            || !self.allow_macs.is_empty()
            || !self.allow_ips.is_empty()
            || self.no_ip_check
    }

    /// `cur` with this command's changes.
    fn apply(&self, mut p: PolicyConfig) -> PolicyConfig {
        if let Some(rate) = self.police {
            p.ingress = Some(PolicerConfig {
                rate,
                burst: self.police_burst,
                excess_burst: None,
                excess_rate: None,
                pps: None,
            });
        }
        if self.no_police {
            p.ingress = None;
        }
        if let Some(rate) = self.shape {
            p.egress =
                Some(ShaperConfig { rate, burst: self.shape_burst, queue: self.shape_queue, pps: None });
        }
        if self.no_shape {
            p.egress = None;
        }
        let touches_spoof = !self.allow_macs.is_empty() || !self.allow_ips.is_empty() || self.no_ip_check;
        match self.anti_spoof {
            Some(OnOff::Off) => p.anti_spoof = None,
            Some(OnOff::On) => {
                p.anti_spoof.get_or_insert_with(SpoofConfig::default);
            }
            None if touches_spoof => {
                p.anti_spoof.get_or_insert_with(SpoofConfig::default);
            }
            None => {}
        }
        if let Some(sp) = p.anti_spoof.as_mut() {
            if !self.allow_macs.is_empty() {
                sp.macs = self.allow_macs.clone();
            }
            if !self.allow_ips.is_empty() {
                sp.ips = Some(self.allow_ips.clone());
            }
            if self.no_ip_check {
                sp.ips = None;
            }
        }
        p
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Ctl { control, json, what } => {
            // `vswitch ctl stats | head` should end quietly, as Unix tools do, not panic on
            // a closed pipe.
            // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            ctl(&control, json, what)
        }
        Cmd::Vf { control, json, dev, words } => vfcli::run(&control, json, &dev, words),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vswitch: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: RunArgs) -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VSWITCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut cfg = match &a.config {
        Some(p) => SwitchConfig::from_file(p).map_err(|e| e.to_string())?,
        None => SwitchConfig { fdb_aging_secs: 300, ..Default::default() },
    };
    for spec in &a.ports {
        cfg.ports.push(PortConfig::parse(spec).map_err(|e| e.to_string())?);
    }
    if !a.pmd_cores.is_empty() {
        cfg.pmd_cores = a.pmd_cores.clone();
    }
    cfg.busy_poll |= a.busy_poll;
    if a.socket_mode.is_some() {
        cfg.socket_mode = a.socket_mode;
    }
    if a.socket_group.is_some() {
        cfg.socket_group = a.socket_group.clone();
    }
    if a.rebalance_interval.is_some() {
        cfg.rebalance_interval_secs = a.rebalance_interval;
    }
    if a.rebalance_load.is_some() {
        cfg.rebalance_load_pct = a.rebalance_load;
    }
    if a.rebalance_improvement.is_some() {
        cfg.rebalance_improvement_pct = a.rebalance_improvement;
    }
    if let Some(us) = a.batch_wait_us {
        cfg.batch_wait_us = us;
    }
    if let Some(u) = a.unsealed_memory {
        cfg.unsealed_memory = u;
    }
    if let Some(m) = a.max_guest_mem {
        cfg.max_guest_mem = Some(m);
    }
    if let Some(n) = a.fdb_entries {
        cfg.fdb_entries = Some(n);
    }
    if a.control.is_some() || cfg.control.is_none() {
        cfg.control = Some(a.control.clone().unwrap_or_else(|| DEFAULT_CONTROL.into()));
    }
    raise_fd_limit();
    let signals = block_signals();
    let sw = Switch::start(cfg.clone()).map_err(|e| e.to_string())?;
    eprintln!(
        "vswitch: {} port(s), control socket {}; Ctrl-C to stop",
        cfg.ports.len(),
        cfg.control.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
    );
    wait_for_signal(&signals, a.stats_interval, &sw);
    drop(sw);
    Ok(())
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("'{s}' is not a file mode in octal (e.g. 660)"))
}

/// Raises the soft open-file limit to the hard one: every port holds its connection, a
/// listener and up to three eventfds per ring, and the systemd default of 1024 runs out at a
/// few dozen multi-queue ports.
fn raise_fd_limit() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                eprintln!("vswitch: cannot raise the open-file limit: {}", std::io::Error::last_os_error());
            }
        }
    }
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local; blocking SIGINT/SIGTERM before threads start so
    // every thread inherits the mask and sigtimedwait in main receives them.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn wait_for_signal(set: &libc::sigset_t, interval: u64, sw: &Switch) {
    let mut last: Option<(std::time::Instant, Stats)> = None;
    loop {
        let secs = if interval == 0 { 3600 } else { interval as i64 };
        let ts = libc::timespec { tv_sec: secs, tv_nsec: 0 };
        // SAFETY: valid sigset and timespec.
        let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
        if sig > 0 {
            return;
        }
        if interval > 0 {
            if let Ok(s) = sw.stats() {
                if let Some((t, prev)) = &last {
                    print_rates(prev, &s, t.elapsed().as_secs_f64());
                }
                last = Some((std::time::Instant::now(), s));
            }
        }
    }
}

fn print_rates(prev: &Stats, cur: &Stats, dt: f64) {
    for p in &cur.ports {
        let Some(o) = prev.ports.iter().find(|o| o.id == p.id) else { continue };
        println!(
            "{:<12} rx {:>8.3} Mpps  tx {:>8.3} Mpps  drops(no_buf {} malformed {} filtered {} no_route {})",
            p.name,
            (p.rx.packets - o.rx.packets) as f64 / dt / 1e6,
            (p.tx.packets - o.tx.packets) as f64 / dt / 1e6,
            p.tx.drop_no_buffer,
            p.rx.drop_malformed + p.tx.drop_malformed,
            p.rx.drop_filtered,
            p.rx.drop_no_route
        );
    }
}

fn ctl(path: &std::path::Path, json: bool, what: CtlCmd) -> Result<(), String> {
    let req = match what {
        CtlCmd::Ports => Request::Ports,
        CtlCmd::Stats => Request::Stats,
        CtlCmd::Fdb => Request::Fdb,
        CtlCmd::FdbFlush => Request::FdbFlush,
        CtlCmd::Rebalance => Request::Rebalance,
        CtlCmd::QueuePin { name, queue_pair, pmd } => Request::QueuePin {
            name,
            queue_pair,
            pmd: match pmd.trim_start_matches("pmd") {
                "none" => None,
                n => Some(
                    n.parse().map_err(|_| format!("{pmd}: a polling thread's index (0, 1, ..) or none"))?,
                ),
            },
        },
        CtlCmd::PortAdd { spec } => {
            Request::PortAdd { port: Box::new(PortConfig::parse(&spec).map_err(|e| e.to_string())?) }
        }
        CtlCmd::PortDel { name } => Request::PortDel { name },
        CtlCmd::Nic { name } => Request::Nic { name },
        CtlCmd::Accel(AccelCmd::Plug { name, tier }) => Request::AccelPlug { name, tier },
        CtlCmd::Accel(AccelCmd::Unplug { name }) => Request::AccelUnplug { name },
        CtlCmd::Accel(AccelCmd::Status { name }) => Request::AccelStatus { name },
        CtlCmd::Policy(a) => {
            let name = a.name.clone();
            if a.changes_anything() {
                let cur =
                    request(path, &Request::Policy { name: name.clone() }).map_err(|e| e.to_string())?;
                let cur: PolicyReport =
                    serde_json::from_value(cur).map_err(|e| format!("unexpected reply: {e}"))?;
                Request::PolicySet { name, policy: a.apply(cur.policy) }
            } else {
                Request::Policy { name }
            }
        }
    };
    let v = request(path, &req).map_err(|e| e.to_string())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let bad = |e: serde_json::Error| format!("unexpected reply: {e}");
    match req {
        Request::Ports => {
            let ports: Vec<PortInfo> = serde_json::from_value(v).map_err(bad)?;
            println!(
                "{:<4} {:<12} {:<7} {:<10} {:<18} {:<5} {:<6} socket / features",
                "id", "name", "mode", "vlan", "mac", "pairs", "conn"
            );
            for p in ports {
                println!(
                    "{:<4} {:<12} {:<7} {:<10} {:<18} {:<5} {:<6} {}\n{:>48} {}  queues running {:?}",
                    p.id,
                    p.name,
                    p.mode,
                    p.vlan,
                    p.mac,
                    p.queue_pairs,
                    if p.connected { "yes" } else { "no" },
                    p.socket,
                    "",
                    p.device.features.join(","),
                    p.device.running_queues
                );
                if p.macs.refused > 0 {
                    println!(
                        "{:>48} MACs learned {}/{}, {} more not learned (max_macs)",
                        "", p.macs.learned, p.macs.limit, p.macs.refused
                    );
                }
                if p.device.dma_faults > 0 || p.device.protocol_errors > 0 || p.device.calls_revoked > 0 {
                    println!(
                        "{:>48} dma faults {}, protocol errors {}, interrupt eventfds revoked {}",
                        "", p.device.dma_faults, p.device.protocol_errors, p.device.calls_revoked
                    );
                }
                if let Some(t) = &p.device.iotlb {
                    println!(
                        "{:>48} iotlb: {} entries, {} updates ({} refused), {} invalidations, {} misses sent ({} unsent), {} rx parked on miss ({} dropped), {} tx timeouts",
                        "", t.entries, t.updates, t.refused, t.invalidations, t.misses_sent, t.misses_unsent,
                        t.rx_parked, t.rx_miss_drops, t.tx_miss_timeouts
                    );
                    for f in &t.recent_faults {
                        println!("{:>48} fault: {f}", "");
                    }
                }
            }
        }
        Request::Stats => {
            let s: Stats = serde_json::from_value(v).map_err(bad)?;
            // One column per drop reason, counted on either side of the port.
            print!(
                "{:<12} {:>12} {:>12} {:>12} {:>12}",
                "port", "rx_pkts", "rx_bytes", "tx_pkts", "tx_bytes"
            );
            DropReason::ALL.iter().for_each(|&r| print!(" {:>9}", r.name()));
            println!(" {:>12} {:>12}", "copies", "kernel_cp");
            for p in &s.ports {
                print!(
                    "{:<12} {:>12} {:>12} {:>12} {:>12}",
                    p.name, p.rx.packets, p.rx.bytes, p.tx.packets, p.tx.bytes
                );
                DropReason::ALL.iter().for_each(|&r| print!(" {:>9}", p.rx.drops(r) + p.tx.drops(r)));
                println!(" {:>12} {:>12}", p.tx.copies, p.rx.kernel_copies + p.tx.kernel_copies);
            }
            for m in &s.pmds {
                print!(
                    "pmd{} core {:?}: {} packets, {:.1} ticks/packet, {:.1} packets/busy loop, {} sleeps",
                    m.pmd, m.core, m.packets, m.ticks_per_packet, m.mean_burst, m.sleeps
                );
                if m.batch_holds > 0 {
                    print!(", {} batch waits ({} ran out)", m.batch_holds, m.batch_expired);
                }
                if m.stalls > 0 || m.fd_interrupts > 0 {
                    print!(", {} stalls, {} blocked eventfd writes interrupted", m.stalls, m.fd_interrupts);
                }
                println!();
                if !m.queues.is_empty() {
                    let qs: Vec<String> = m
                        .queues
                        .iter()
                        .map(|q| {
                            let pin = if q.pinned { " pinned" } else { "" };
                            format!("{}/{} {:.1} %{pin}", q.port, q.queue_pair, q.load_pct)
                        })
                        .collect();
                    println!(
                        "  polls (port/queue pair, load): {} (total {:.1} %)",
                        qs.join(", "),
                        m.load_pct
                    );
                }
            }
        }
        Request::Fdb => {
            let e: Vec<FdbEntry> = serde_json::from_value(v).map_err(bad)?;
            println!("{:<5} {:<18} {:<5} age", "vlan", "mac", "port");
            for x in e {
                println!("{:<5} {:<18} {:<5} {}", x.vlan, x.mac, x.port, x.age_secs);
            }
        }
        Request::Policy { .. } | Request::PolicySet { .. } => {
            let r: PolicyReport = serde_json::from_value(v).map_err(bad)?;
            print_policy(&r);
        }
        Request::Nic { .. } => {
            let r: NicReport = serde_json::from_value(v).map_err(bad)?;
            print_nic(&r);
        }
        Request::AccelPlug { .. } | Request::AccelUnplug { .. } => {
            let r: AccelReport = serde_json::from_value(v).map_err(bad)?;
            print_accel(&[r]);
        }
        Request::AccelStatus { .. } => {
            let r: Vec<AccelReport> = serde_json::from_value(v).map_err(bad)?;
            print_accel(&r);
        }
        Request::QueuePin { name, queue_pair, pmd } => {
            let t = v["pmd"].as_u64().unwrap_or_default();
            match pmd {
                Some(_) => println!("{name}/{queue_pair}: polled by pmd{t}, pinned"),
                None => println!("{name}/{queue_pair}: polled by pmd{t}, free to move on a rebalance"),
            }
        }
        Request::Rebalance => {
            let r: RebalanceReport = serde_json::from_value(v).map_err(bad)?;
            let pcts = |v: &[f64]| v.iter().map(|p| format!("{p:.1} %")).collect::<Vec<_>>().join(" | ");
            println!("polling threads' load before: {}", pcts(&r.before_pct));
            for m in &r.moves {
                println!(
                    "  moved {}/{} ({:.1} %) from pmd{} to pmd{}",
                    m.port, m.queue_pair, m.load_pct, m.from, m.to
                );
            }
            if r.applied {
                println!("after: {} (busiest {:.0} % lower)", pcts(&r.after_pct), r.improvement_pct);
            }
            if !r.why.is_empty() {
                println!("{}", r.why);
            }
        }
        _ => println!("ok"),
    }
    Ok(())
}

fn print_accel(rows: &[AccelReport]) {
    for r in rows {
        match (&r.tier, &r.nic_name) {
            (Some(t), Some(n)) => println!(
                "{}: plugged into {n} ({t}){}",
                r.port,
                r.plugged_ms.map(|ms| format!(" for {:.1} s", ms as f64 / 1000.0)).unwrap_or_default()
            ),
            _ => println!("{}: software path", r.port),
        }
        println!(
            "  {} plugs, {} unplugs, {} refused{}",
            r.plugs,
            r.unplugs,
            r.refusals,
            r.last_refusal.as_ref().map(|w| format!(" (last: {w})")).unwrap_or_default()
        );
        println!(
            "  device: {} frames sent, {} received, {} spoofed, {} held by the rate, {} transmit faults, {} receive faults, \
             {} in-flight transmits drained",
            r.tx_frames, r.rx_frames, r.spoofed, r.shaped, r.tx_faults, r.rx_faults, r.drained
        );
        if let Some(h) = r.last.as_ref().filter(|h| h.tier == "l1") {
            println!("  last unplug (from l1): {} us, no ring handed over", h.unplug_us);
        } else if let Some(h) = &r.last {
            println!(
                "  last hand-over (from {}): plug {} us, unplug {} us; ledger rx {}/{} tx {}/{} ({}); resumed at rx {:?} tx {:?}",
                h.tier,
                h.plug_us,
                h.unplug_us,
                h.rx_completed,
                h.rx_taken,
                h.tx_completed,
                h.tx_taken,
                if h.balanced { "balanced" } else { "NOT balanced" },
                h.rx_state,
                h.tx_state
            );
        }
    }
}

fn print_nic(r: &NicReport) {
    println!(
        "nic {} on {}: level {}, {} pools, {} of {} MAC filters in use",
        r.name, r.wire, r.level, r.pools, r.filters_used, r.filters
    );
    for b in &r.bound {
        let strip = b.strip_vlan.map(|v| format!(" (strips VLAN {v})")).unwrap_or_default();
        let macs = if b.macs.is_empty() {
            "(no MAC learned yet: the software path serves it)".to_string()
        } else {
            b.macs.join(",")
        };
        let rate = b.tx_rate.map(|r| format!(", sends at most {r} bit/s")).unwrap_or_default();
        println!(
            "  pool {:<3} {:<12} {}{} (transmit weight {}{})",
            b.pool, b.port, macs, strip, b.tx_weight, rate
        );
    }
    for (port, why) in &r.unserved {
        println!("  {port:<16} not served: {why}");
    }
    println!(
        "  wire {} frames: {} to guests' rings, {} to the software path ({} handed back), {} filtered; {} MACs overflowed",
        r.wire_frames, r.to_pools, r.to_default, r.fallbacks, r.filtered, r.mac_overflow
    );
    println!(
        "  offloads: LRO merged {} segments into {} frames; checksums verified for guests {}; interrupts ({}) raised {}, folded {}",
        r.lro_merged, r.lro_coalesced, r.csum_verified, r.itr, r.irqs_raised, r.irqs_folded
    );
    println!(
        "  transmit: {} frames to the wire, {} queued, {} dropped (pool queue full), {} waits for a pool's shaper; TSO cut {} frames into {} segments, {} checksums inserted",
        r.tx_sent, r.tx_queued, r.tx_dropped, r.tx_shaped, r.tso_frames, r.tso_segments, r.csum_inserted
    );
    let per = |x: u64| if r.dma_packets > 0 { x as f64 / r.dma_packets as f64 } else { 0.0 };
    println!(
        "  device DMA: {} packets, {:.1} bytes written, {:.1} read, {:.2} descriptor fetches, {:.2} write-backs, {:.2} TLPs, {:.2} IOTLB lookups per packet; {} IOTLB misses; {} faults; {} CPU copies; {:.0} ns device time per packet",
        r.dma_packets,
        per(r.dma_write_bytes),
        per(r.dma_read_bytes),
        per(r.desc_fetches),
        per(r.desc_writebacks),
        per(r.tlps),
        per(r.iotlb_lookups),
        r.iotlb_misses,
        r.dma_faults,
        r.cpu_copies,
        if r.wire_frames > 0 { r.device_ns as f64 / r.wire_frames as f64 } else { 0.0 }
    );
}

fn print_policy(r: &PolicyReport) {
    let p = &r.policy;
    println!("port {}", r.name);
    match &p.ingress {
        Some(i) => println!(
            "  ingress policer: rate {}{}{}{}",
            i.rate,
            i.burst.map(|b| format!(" burst {b}")).unwrap_or_default(),
            i.excess_burst.map(|b| format!(" excess burst {b}")).unwrap_or_default(),
            i.excess_rate.map(|b| format!(" excess rate {b}")).unwrap_or_default()
        ),
        None => println!("  ingress policer: off"),
    }
    match &p.egress {
        Some(e) => println!(
            "  egress shaper:   rate {}{} queue {} (holding {} packets, {} bytes)",
            e.rate,
            e.burst.map(|b| format!(" burst {b}")).unwrap_or_default(),
            e.queue.unwrap_or(256),
            r.shaper_queued,
            r.shaper_queued_bytes
        ),
        None => println!("  egress shaper:   off"),
    }
    match &p.anti_spoof {
        Some(s) => println!(
            "  anti-spoofing:   macs {} ips {}",
            if s.macs.is_empty() { "(the port's own)".to_string() } else { s.macs.join(",") },
            s.ips.as_ref().map_or("(not checked)".to_string(), |l| if l.is_empty() {
                "(none allowed)".into()
            } else {
                l.join(",")
            })
        ),
        None => println!("  anti-spoofing:   off"),
    }
    let c = &r.counters;
    println!(
        "  drops: policed {} (yellow passed {}), spoofed mac {} ip {} arp {} nd {} ethertype {}, shaper full {}; held by shaper {}",
        c.policed, c.policed_yellow, c.spoof_mac, c.spoof_ip, c.spoof_arp, c.spoof_nd, c.spoof_ethertype, c.shaped_dropped, c.shaped_held
    );
}
