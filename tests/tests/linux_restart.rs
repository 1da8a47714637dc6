//! The switch killed (SIGKILL) and restarted while two Linux guests (the kit of
//! `tests/guest/build.sh`, QEMU 7.2 under TCG) ping each other through it. Its ports are in
//! client mode and QEMU listens on their sockets (`server=on`): while no switch is there QEMU
//! keeps the guest running with its NIC's link down, and it takes each new switch's connection
//! as a new backend (it restores the rings from their used indexes). Every restart must
//! reconnect both ports and the pings must resume, with neither guest rebooted.
//!
//! `RESTARTS=N` sets the number of restarts (default 3, for CI; the hardening issue's figure
//! is 20); the test prints each restart's downtime:
//! `RESTARTS=20 cargo test -p e2e-tests --test linux_restart -- --nocapture`
//! (the `vswitch` binary must be built: `cargo build --profile test -p vswitch --bin vswitch`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e_tests::linux::{Guest, GuestSpec, Kit};
use e2e_tests::{find, sock, Proc, Scratch};
use vswitch::control::{request, PortInfo, Request, Stats};
use vswitch_bench::harness::peer::vswitch_binary;

/// One guest test at a time in this process (two TCG guests already fill two cores).
static SERIAL: Mutex<()> = Mutex::new(());

const IP_A: &str = "10.77.0.1";
const IP_B: &str = "10.77.0.2";
/// How long every other restart leaves the guests without a switch.
const GAP: Duration = Duration::from_secs(1);

/// A switch process with ports `a` and `b` in client mode.
struct SwitchProc {
    p: Proc,
    control: PathBuf,
}

impl SwitchProc {
    /// Starts the `n`th switch (its log: `vswitch-n.log`).
    fn start(bin: &Path, dir: &Scratch, n: usize) -> SwitchProc {
        let control = dir.path("ctl.sock");
        let mut cmd = Command::new(bin);
        cmd.arg("run").arg("--control").arg(&control);
        for name in ["a", "b"] {
            cmd.arg("--port").arg(format!("{name}={},client", sock(dir, name).display()));
        }
        cmd.env("VSWITCH_LOG", "info");
        SwitchProc { p: Proc::spawn(cmd, &dir.path(&format!("vswitch-{n}.log"))), control }
    }

    /// Its ports, or `None` while its control socket does not answer (starting up).
    fn ports(&self) -> Option<Vec<PortInfo>> {
        let v = request(&self.control, &Request::Ports).ok()?;
        serde_json::from_value(v).ok()
    }

    /// Whether both ports have their frontend connected and both queues running.
    fn both_connected(&self) -> bool {
        self.ports().is_some_and(|ps| {
            ps.len() == 2 && ps.iter().all(|p| p.connected && p.device.running_queues == vec![0, 1])
        })
    }

    fn stats(&self) -> Option<Stats> {
        serde_json::from_value(request(&self.control, &Request::Stats).ok()?).ok()
    }
}

/// Answered pings so far: busybox ping's reply lines.
fn replies(console: &str) -> usize {
    console.lines().filter(|l| l.contains(" bytes from ")).count()
}

/// How often /init started: more than once means the guest rebooted.
fn boots(console: &str) -> usize {
    console.lines().filter(|l| l.starts_with("KIT t=") && l.contains(" init name=")).count()
}

/// The guest's uptime on its last progress line (`KIT t=<uptime> ...`).
fn uptime(console: &str) -> f64 {
    console
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("KIT t=")?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The guests and the current switch; a failure shows all their output.
struct Rig {
    dir: Scratch,
    a: Guest,
    b: Guest,
    sw: SwitchProc,
}

impl Rig {
    fn fail(&self, why: &str) -> ! {
        panic!(
            "{why}\n--- switch log ({}) ---\n{}\n{}\n{}",
            self.sw.p.log.display(),
            self.sw.p.log_text(),
            self.a.report(),
            self.b.report()
        )
    }

    /// Polls every 20 ms until `f` holds; fails with `what` after `limit`.
    fn wait(&mut self, limit: Duration, what: &str, mut f: impl FnMut(&mut Rig) -> bool) -> Duration {
        let t = Instant::now();
        loop {
            if f(self) {
                return t.elapsed();
            }
            if !self.a.running() || !self.b.running() {
                self.fail(&format!("a guest's QEMU ended while waiting for {what}"));
            }
            if t.elapsed() > limit {
                self.fail(&format!("no {what} within {limit:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn linux_guests_keep_pinging_across_switch_restarts_in_client_mode() {
    restarts(false);
}

/// The same with guest a's NIC asking for packed rings (QEMU `packed=on`) from ports that do
/// not offer them (the default): it gets split rings and survives the restarts. (Offered, a
/// packed ring would not: it has no used index in guest memory, so QEMU resumes it where the
/// first switch started it, fails to read the dead switch's position ("ring restore failed")
/// and the guest's NIC stops.)
#[test]
fn a_guest_asking_for_packed_rings_gets_split_ones_and_keeps_pinging_across_restarts() {
    restarts(true);
}

fn restarts(packed: bool) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let restarts: usize = std::env::var("RESTARTS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let bin = vswitch_binary(None).expect(
        "vswitch is built (cargo build --profile test -p vswitch --bin vswitch; scripts/test.sh does)",
    );
    let kit = Kit::get();
    let dir = Scratch::new(if packed { "linux-restart-packed" } else { "linux-restart" });
    // QEMU's own time limit: boot, and each restart with room to spare.
    let timeout_s = 180 + 30 * restarts as u64;
    let mut a = GuestSpec::new(
        "a",
        &sock(&dir, "a"),
        "52:54:00:4b:00:01",
        &["role=solo", &format!("ip={IP_A}/24"), &format!("peer={IP_B}"), "tests=pingloop", "ping_i=0.1"],
    );
    let mut b = GuestSpec::new(
        "b",
        &sock(&dir, "b"),
        "52:54:00:4b:00:02",
        &["role=solo", &format!("ip={IP_B}/24"), "hold=1"],
    );
    for g in [&mut a, &mut b] {
        g.listen = true;
        g.timeout_s = timeout_s;
    }
    if packed {
        a.device = vec!["packed=on".into()];
    }
    let gb = Guest::start(&kit, &dir, &b);
    let ga = Guest::start(&kit, &dir, &a);
    // QEMU stays in its network setup, listening, until a switch connects.
    let t = Instant::now();
    while !(sock(&dir, "a").exists() && sock(&dir, "b").exists()) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "QEMU did not create its sockets:\n{}\n{}",
            ga.report(),
            gb.report()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sw = SwitchProc::start(&bin, &dir, 0);
    let mut rig = Rig { dir, a: ga, b: gb, sw };
    rig.wait(Duration::from_secs(10), "connection of both ports to the first switch", |r| {
        r.sw.both_connected()
    });
    let boot =
        rig.wait(Duration::from_secs(150), "answered ping after boot", |r| replies(&r.a.console()) > 0);
    let feats =
        rig.sw.ports().unwrap_or_default().into_iter().find(|p| p.name == "a").map(|p| p.device.features);
    assert!(
        feats.as_ref().is_some_and(|f| !f.is_empty() && !f.iter().any(|f| f == "RING_PACKED")),
        "a's rings are split (packed=on: {packed}): {feats:?}"
    );
    println!("first switch: guests booted and a's first ping answered after {:.1} s", boot.as_secs_f64());

    // Per restart: from the new switch's start to both ports connected, and to a's first
    // answered ping.
    let (mut connect, mut down) = (Vec::new(), Vec::new());
    for k in 1..=restarts {
        // Steady first: a few more answers through this switch.
        let r = replies(&rig.a.console());
        rig.wait(Duration::from_secs(30), "steady pings before the kill", |rg| {
            replies(&rg.a.console()) >= r + 3
        });
        // The kill lands at a different point of the ping cadence each time (the wait above
        // ends just after an answer).
        std::thread::sleep(Duration::from_millis((k as u64 * 37) % 100));
        if !rig.sw.p.running() {
            rig.fail(&format!("switch {} ended by itself", k - 1));
        }
        rig.sw.p.kill(); // SIGKILL, reaped
        let killed = Instant::now();
        // Counted after the kill: answers the old switch delivered are not the new one's.
        let before = rig.a.console();
        let (r0, up0) = (replies(&before), uptime(&before));
        // Every other restart leaves the guests without a switch for a second: QEMU notices the
        // hang-up, sets the link down and the guest's pings go unanswered.
        let gap = if k % 2 == 0 { GAP } else { Duration::ZERO };
        std::thread::sleep(gap);
        rig.sw = SwitchProc::start(&bin, &rig.dir, k);
        let t0 = Instant::now();
        let (mut conn, mut first) = (None, None);
        let what = format!("reconnection and answered ping after restart {k}");
        rig.wait(Duration::from_secs(60), &what, |rg| {
            if conn.is_none() && rg.sw.both_connected() {
                conn = Some(t0.elapsed());
            }
            // An answer needs both ports running on the new switch, and that switch to have
            // delivered something to a (not an answer the old one left in a's ring).
            if conn.is_some()
                && first.is_none()
                && replies(&rg.a.console()) > r0
                && rg.sw.stats().is_some_and(|s| find(&s, "a").tx.packets > 0)
            {
                first = Some(t0.elapsed());
            }
            first.is_some()
        });
        let (conn, first) = (conn.unwrap(), first.unwrap());
        // The answers go through the new switch, both ways, and keep coming.
        rig.wait(Duration::from_secs(30), &format!("pings resumed through switch {k}"), |rg| {
            let s = rg.sw.stats();
            s.is_some_and(|s| {
                let (pa, pb) = (find(&s, "a"), find(&s, "b"));
                pa.rx.packets > 0 && pb.tx.packets > 0 && pb.rx.packets > 0 && pa.tx.packets > 0
            }) && replies(&rg.a.console()) >= r0 + 3
        });
        // Same guests, same boot: QEMU still runs (it has -no-reboot), /init started once,
        // and the uptime did not go back (a's progress line comes once per round of pings, so
        // a quick restart may see the same one).
        let (ca, cb) = (rig.a.console(), rig.b.console());
        if boots(&ca) != 1 || boots(&cb) != 1 || uptime(&ca) < up0 {
            rig.fail(&format!(
                "a guest rebooted across restart {k}: boots a={} b={}, a's uptime {up0} -> {}",
                boots(&ca),
                boots(&cb),
                uptime(&ca)
            ));
        }
        if ca.contains("KIT-RESULT") {
            rig.fail("guest a ended its ping loop");
        }
        // Whether a's kernel saw its link go down (QEMU sets it down when the switch hangs up,
        // up again on the next connection; the kernel then forgets its ARP entries): only the
        // once-a-second round headers tell, so a short drop may go unseen.
        let carrier_down = ca.get(before.len()..).is_some_and(|after| after.contains("carrier=0"));
        let info = rig.sw.ports().unwrap_or_default();
        // One connection each, to this switch: its first attempt found QEMU listening.
        assert!(info.len() == 2 && info.iter().all(|p| p.mode == "client" && p.connects == 1), "{info:?}");
        println!(
            "restart {k:>2}: down {:>6.1} ms; both ports connected {:>6.1} ms, first answered ping \
             {:>6.1} ms after the new switch started ({:>6.1} ms after the kill; guest a uptime \
             {up0:.1} s; a's carrier seen down: {})",
            ms(gap),
            ms(conn),
            ms(first),
            ms(first + (t0 - killed)),
            if carrier_down { "yes" } else { "no" }
        );
        connect.push(ms(conn));
        down.push(ms(first));
    }
    if restarts > 0 {
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        println!(
            "{restarts} restarts: downtime (new switch start -> first answered ping) median {:.1} ms, max \
             {:.1} ms; reconnect (-> both ports connected) median {:.1} ms, max {:.1} ms",
            median(&down),
            max(&down),
            median(&connect),
            max(&connect)
        );
    }
    let s = rig.sw.stats().expect("stats of the last switch");
    println!("last switch: a {:?}\n  b {:?}", find(&s, "a").rx, find(&s, "b").rx);
    rig.sw.p.stop(Duration::from_secs(5));
    rig.a.stop();
    rig.b.stop();
}
