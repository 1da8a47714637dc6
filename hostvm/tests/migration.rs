//! Live migration between two hostvm processes: the payload VM (echo role) moves from switch
//! port m1 to m2 while the harness's frontend keeps sending it frames.
//!
//! The source gets SIGUSR1 and `--migrate-to`, the destination waits with `--incoming`, both
//! with the same memory size and MAC. The source sends a digest of all guest memory with the
//! guest stopped (`--migrate-verify`), which the destination checks before it takes the
//! guest: a page neither KVM's dirty log nor the switch's caught fails the migration. The
//! switch runs in this process (adaptive mode), so a test can break its log on purpose.

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e_tests::{
    connect_default, drain, frame_of_size, mac, recv_n, send, sock, start_switch, wait_until, Proc, Scratch,
};
use vswitch::Switch;
use vswitch_bench::frame::verify_frame;
use vswitch_bench::frontend::Frontend;

const T: Duration = Duration::from_secs(20);
const VM: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x20];

/// One migration at a time: the broken-log hook is process-wide, and two pairs of VMs would
/// crowd a 2-CPU machine.
static SERIAL: Mutex<()> = Mutex::new(());

fn hostvm(dir: &Scratch, name: &str, port: &str, extra: &[String]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostvm"));
    cmd.args(["run", "--mem", "64M", "--serial", "null", "--stats-interval", "0", "--net-wait", "10"]);
    cmd.args(["--payload", "echo", "--net"]);
    cmd.arg(format!("socket={},mac={}", sock(dir, port).display(), e2e_tests::mac_str(VM)));
    cmd.args(extra);
    Proc::spawn(cmd, &dir.path(&format!("{name}.log")))
}

/// The `nic0 rx_frames=.. tx_frames=..` line hostvm prints at exit.
fn nic0_rx(log: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.starts_with("hostvm: nic0 rx_frames="))
        .unwrap_or_else(|| panic!("no counters in:\n{log}"));
    line.split(' ')
        .find_map(|w| w.strip_prefix("rx_frames="))
        .and_then(|v| v.parse().ok())
        .expect("rx_frames")
}

/// Sends probe frames until the VM echoes one (through whichever port has its MAC).
fn await_echo(h: &mut Frontend, seq0: u64) {
    for i in 0..200 {
        send(h, 0, &frame_of_size(VM, mac(1), None, 60, seq0 + i));
        if !recv_n(h, 1, Duration::from_millis(100)).is_empty() {
            drain(h, Duration::from_millis(100));
            return;
        }
    }
    panic!("the VM did not echo within 20 s");
}

struct Run {
    _dir: Scratch,
    _sw: Switch,
    h: Frontend,
    src: Proc,
    dst: Proc,
    /// Frames sent while the migration went on, and echoes of them that came back intact.
    sent: u64,
    echoed: u64,
}

/// Source on m1 echoing, destination waiting on m2; SIGUSR1 to the source while 8-frame bursts
/// go to the VM's MAC every millisecond or so; returns once the source says how it went (and,
/// if the guest moved, has exited).
fn migrate(tag: &str, seq_base: u64) -> Run {
    let dir = Scratch::new(tag);
    let sw = start_switch(&dir, &["h", "m1", "m2"]);
    let mut h = connect_default(&dir, "h");
    let chan = dir.path("migrate.sock");
    let src = hostvm(
        &dir,
        "src",
        "m1",
        &["--migrate-to".into(), chan.display().to_string(), "--migrate-verify".into()],
    );
    assert!(wait_until(T, || src.log_text().contains("payload NICs ready")), "{}", src.log_text());
    await_echo(&mut h, seq_base);
    let dst = hostvm(&dir, "dst", "m2", &["--incoming".into(), chan.display().to_string()]);
    assert!(wait_until(T, || dst.log_text().contains("waiting for a migrating guest")), "{}", dst.log_text());
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(src.pid() as i32, libc::SIGUSR1) }, 0);
    let (mut sent, mut echoed, mut seq) = (0u64, 0u64, seq_base + 1000);
    let deadline = Instant::now() + T;
    let mut looked = Instant::now();
    let outcome = |log: &str| log.contains("hostvm: migrated:") || log.contains("migration failed");
    while Instant::now() < deadline {
        if looked.elapsed() > Duration::from_millis(50) {
            looked = Instant::now();
            if outcome(&src.log_text()) {
                break;
            }
        }
        for _ in 0..8 {
            send(&mut h, 0, &frame_of_size(VM, mac(1), None, 60 + (seq as usize * 97) % 1455, seq));
            seq += 1;
            sent += 1;
        }
        for f in drain(&mut h, Duration::from_millis(1)) {
            assert_eq!(&f[6..12], &VM, "an echo comes from the VM");
            verify_frame(&f).expect("every echo is intact");
            echoed += 1;
        }
    }
    for f in drain(&mut h, Duration::from_millis(200)) {
        verify_frame(&f).expect("every echo is intact");
        echoed += 1;
    }
    assert!(outcome(&src.log_text()), "the source did not finish within {T:?}:\n{}", src.log_text());
    Run { _dir: dir, _sw: sw, h, src, dst, sent, echoed }
}

#[test]
fn payload_vm_migrates_live_between_hostvms_with_traffic_and_verified_memory() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut r = migrate("hostvm-migrate", 0);
    assert!(r.src.wait_exit(T).is_some_and(|s| s.success()), "{}", r.src.log_text());
    let slog = r.src.log_text();
    assert!(slog.contains("exit: Migrated"), "the source ends as migrated:\n{slog}");
    let line = slog.lines().find(|l| l.contains("hostvm: migrated: total")).expect("migration figures");
    eprintln!("{line}");
    eprintln!("during the migration: {} frames sent, {} echoed", r.sent, r.echoed);
    assert!(r.echoed > 0 && r.sent > 0);
    // The guest runs on the destination, reached through m2 (the switch moved its MAC at
    // SEND_RARP): every frame of a burst comes back.
    let t0 = Instant::now();
    send(&mut r.h, 0, &frame_of_size(VM, mac(1), None, 60, 5_000_000));
    let first = recv_n(&mut r.h, 1, T);
    assert_eq!(first.len(), 1, "the migrated guest answers");
    eprintln!("a probe's echo after the source exited: {:.2} ms", t0.elapsed().as_secs_f64() * 1e3);
    let burst: Vec<Vec<u8>> = (0..200)
        .map(|i| frame_of_size(VM, mac(1), None, 60 + (i * 131) % 1455, 6_000_000 + i as u64))
        .collect();
    let mut got = Vec::new();
    for chunk in burst.chunks(32) {
        for f in chunk {
            send(&mut r.h, 0, f);
        }
        got.extend(recv_n(&mut r.h, chunk.len(), T));
    }
    assert_eq!(got.len(), burst.len(), "the migrated guest echoes everything");
    for (g, f) in got.iter().zip(&burst) {
        assert!(g[12..] == f[12..] && g[0..6] == f[6..12], "echo altered");
    }
    let dlog = r.dst.stop(T);
    assert!(dlog.contains("migrated in") && dlog.contains("exit: Payload(0)"), "{dlog}");
    // The payload's counters live in guest memory: the destination's include everything the
    // source's guest received before it moved.
    let rx = nic0_rx(&dlog);
    assert!(rx >= r.echoed + 200 + 2, "destination counted {rx} frames; {} echoed in all", r.echoed + 200);
}

#[test]
fn a_page_the_switch_did_not_log_fails_the_migration_and_the_guest_runs_on() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The switch stops marking the receive buffers it fills (the echo payload copies each
    // frame out and never writes them, so KVM's log does not have them either).
    vswitch::test_hooks::set_skip_rx_log(true);
    let r = std::panic::catch_unwind(|| migrate("hostvm-migrate-broken", 0));
    vswitch::test_hooks::set_skip_rx_log(false);
    let mut r = r.unwrap_or_else(|e| std::panic::resume_unwind(e));
    let slog = r.src.log_text();
    assert!(
        slog.contains("migration failed") && slog.contains("differs from the source's"),
        "the destination's memory check catches the missed pages:\n{slog}"
    );
    eprintln!("{}", slog.lines().find(|l| l.contains("migration failed")).unwrap_or_default());
    let dst = r.dst.wait_exit(T);
    assert!(dst.is_some_and(|s| !s.success()), "the destination gives up: {dst:?}\n{}", r.dst.log_text());
    // The guest runs on at the source: its rings were given back to the switch on m1.
    await_echo(&mut r.h, 7_000_000);
    let slog = r.src.stop(T);
    assert!(slog.contains("exit: Payload(0)"), "{slog}");
}

#[test]
fn with_no_destination_the_migration_fails_with_the_reason_and_the_guest_runs_on() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Scratch::new("hostvm-migrate-nodest");
    let _sw = start_switch(&dir, &["h", "m1"]);
    let mut h = connect_default(&dir, "h");
    let chan = dir.path("nobody.sock");
    let mut src = hostvm(&dir, "src", "m1", &["--migrate-to".into(), chan.display().to_string()]);
    assert!(wait_until(T, || src.log_text().contains("payload NICs ready")), "{}", src.log_text());
    await_echo(&mut h, 0);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(src.pid() as i32, libc::SIGUSR1) }, 0);
    assert!(wait_until(T, || src.log_text().contains("migration failed")), "{}", src.log_text());
    assert!(src.log_text().contains("--incoming"), "the error says what to start: {}", src.log_text());
    await_echo(&mut h, 1_000_000);
    let log = src.stop(T);
    assert!(log.contains("exit: Payload(0)"), "{log}");
}
