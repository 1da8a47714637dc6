//! hostvm with its built-in payload on the switch: a real KVM guest (ring 3, natively even
//! under PVM) whose virtio-mmio NICs the switch serves over vhost-user, exchanging frames
//! with the harness's frontend on other ports.
//!
//! Each test runs the `hostvm` binary as a child process (stopped by PID on drop) and an
//! in-process switch in adaptive mode; the payload idles through hostvm when it has nothing
//! to do, so nothing here spins a core.

use std::process::Command;
use std::time::Duration;

use e2e_tests::{
    connect_default, drain, find, frame_of_size, mac, recv_n, send, sock, start_switch, switch_config,
    wait_stats, wait_until, Proc, Scratch,
};
use vswitch::{Switch, SwitchConfig, UnsealedMemory};
use vswitch_bench::frame::verify_frame;
use vswitch_bench::frontend::Frontend;

const T: Duration = Duration::from_secs(10);
const VM0: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];
const VM1: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x11];

/// Starts `hostvm run --payload ...` with `args`; waits until its NICs are ready.
fn hostvm(dir: &Scratch, name: &str, args: &[String]) -> Proc {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostvm"));
    cmd.args(["run", "--mem", "64M", "--serial", "null", "--stats-interval", "0", "--net-wait", "10"]);
    cmd.args(args);
    let vm = Proc::spawn(cmd, &dir.path(&format!("{name}.log")));
    assert!(
        wait_until(T, || vm.log_text().contains("payload NICs ready")),
        "the payload did not come up:\n{}",
        vm.log_text()
    );
    vm
}

fn net(dir: &Scratch, port: &str, m: [u8; 6], extra: &str) -> [String; 2] {
    ["--net".into(), format!("socket={},mac={}{extra}", sock(dir, port).display(), e2e_tests::mac_str(m))]
}

/// Frames of sizes cycling over 60..=1514, sequence numbers from `seq0`.
fn frames(dst: [u8; 6], src: [u8; 6], n: usize, seq0: u64) -> Vec<Vec<u8>> {
    (0..n).map(|i| frame_of_size(dst, src, None, 60 + (i * 97) % 1455, seq0 + i as u64)).collect()
}

/// Sends `frames` from `h` (a few at a time, so nothing overruns a 256-entry ring) and checks
/// that each comes back echoed: MACs swapped, everything else identical, in order.
fn echo_round(h: &mut Frontend, frames: &[Vec<u8>], vm_mac: [u8; 6]) {
    let mut got = Vec::new();
    for chunk in frames.chunks(32) {
        for f in chunk {
            send(h, 0, f);
        }
        got.extend(recv_n(h, chunk.len(), T));
    }
    assert_eq!(got.len(), frames.len(), "{} of {} echoes came back", got.len(), frames.len());
    for (i, (g, f)) in got.iter().zip(frames).enumerate() {
        assert_eq!(&g[0..6], &f[6..12], "echo {i}: destination is the sender");
        assert_eq!(&g[6..12], &vm_mac, "echo {i}: source is the VM");
        assert!(g[12..] == f[12..], "echo {i} ({} bytes) altered", f.len());
    }
    assert!(drain(h, Duration::from_millis(50)).is_empty(), "no extra frames");
}

/// Sends probe frames (sequence numbers from 1 000 000) until the VM echoes one, then
/// drains: the path h → switch → VM → switch → h works end to end.
fn await_echo(h: &mut Frontend, vm_mac: [u8; 6]) {
    for i in 0..100 {
        send(h, 0, &frame_of_size(vm_mac, mac(1), None, 60, 1_000_000 + i));
        if !recv_n(h, 1, Duration::from_millis(100)).is_empty() {
            drain(h, Duration::from_millis(100));
            return;
        }
    }
    panic!("the VM did not echo within 10 s");
}

/// The `nicN rx_frames=.. tx_frames=..` line hostvm prints at exit, as numbers.
fn nic_counts(log: &str, nic: usize) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.starts_with(&format!("hostvm: nic{nic} rx_frames=")))
        .unwrap_or_else(|| panic!("no counters for nic{nic} in:\n{log}"));
    let field = |k: &str| -> u64 {
        let v = line.split(' ').find_map(|w| w.strip_prefix(&format!("{k}="))).expect("field");
        v.parse().expect("number")
    };
    (field("rx_frames"), field("tx_frames"))
}

#[test]
fn echo_payload_answers_every_frame_through_the_switch() {
    let dir = Scratch::new("hostvm-echo");
    let sw = start_switch(&dir, &["h", "vm"]);
    let mut h = connect_default(&dir, "h");
    let mut vm = hostvm(
        &dir,
        "vm",
        &[vec!["--payload".into(), "echo".into()], net(&dir, "vm", VM0, "").to_vec()].concat(),
    );
    let fs = frames(VM0, mac(1), 300, 0);
    echo_round(&mut h, &fs, VM0);
    let s = wait_stats(&sw, T, |s| find(s, "vm").tx.packets == 300 && find(s, "vm").rx.packets == 300);
    let p = find(&s, "vm");
    assert_eq!((p.rx.packets, p.tx.packets), (300, 300), "{p:?}");
    assert_eq!(p.tx.copies, 300, "one copy into the VM per frame");
    let log = vm.stop(T);
    assert_eq!(nic_counts(&log, 0), (300, 300), "{log}");
    assert!(log.contains("exit: Payload(0)"), "the payload stopped cleanly on SIGINT:\n{log}");
    assert!(log.contains("first guest instruction") && log.contains("first frame received"), "{log}");
}

#[test]
fn forward_payload_carries_traffic_between_two_nics_both_ways() {
    let dir = Scratch::new("hostvm-fwd");
    // PVP: h0 and the VM's NIC 0 share VLAN 10, NIC 1 and h1 VLAN 20, so every frame from h0
    // to h1 must go through the VM.
    let _sw = start_switch(&dir, &["h0,vlan=10", "vm0,vlan=10", "vm1,vlan=20", "h1,vlan=20"]);
    let mut h0 = connect_default(&dir, "h0");
    let mut h1 = connect_default(&dir, "h1");
    let args = [
        vec!["--payload".into(), "forward".into()],
        net(&dir, "vm0", VM0, "").to_vec(),
        net(&dir, "vm1", VM1, "").to_vec(),
    ]
    .concat();
    let mut vm = hostvm(&dir, "vm", &args);
    for (from, to, src, dst, seq0) in [(&mut h0, &mut h1, mac(1), mac(2), 0u64)] {
        let fs = frames(dst, src, 200, seq0);
        let mut got = Vec::new();
        for chunk in fs.chunks(32) {
            for f in chunk {
                send(from, 0, f);
            }
            got.extend(recv_n(to, chunk.len(), T));
        }
        assert_eq!(got.len(), fs.len());
        assert!(got == fs, "frames arrive unchanged and in order");
    }
    // And back (h1 is learnt on VLAN 20 now; h0 on VLAN 10).
    let back = frames(mac(1), mac(2), 100, 1000);
    for f in &back {
        send(&mut h1, 0, f);
    }
    let got = recv_n(&mut h0, back.len(), T);
    assert!(got == back, "{} of {} frames came back unchanged", got.len(), back.len());
    let log = vm.stop(T);
    assert_eq!(nic_counts(&log, 0), (200, 100), "{log}");
    assert_eq!(nic_counts(&log, 1), (100, 200), "{log}");
}

#[test]
fn send_payload_delivers_its_count_and_exits() {
    let dir = Scratch::new("hostvm-send");
    let _sw = start_switch(&dir, &["h", "vm"]);
    let mut h = connect_default(&dir, "h");
    let args = [
        vec![
            "--payload",
            "send",
            "--count",
            "1000",
            "--rate",
            "2000",
            "--frame-len",
            "200",
            "--dst-mac",
            &e2e_tests::mac_str(mac(1)),
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        net(&dir, "vm", VM0, "").to_vec(),
    ]
    .concat();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostvm"));
    cmd.args(["run", "--mem", "64M", "--serial", "null", "--stats-interval", "0"]).args(&args);
    let mut vm = Proc::spawn(cmd, &dir.path("vm.log"));
    let got = recv_n(&mut h, 1000, T);
    let st = vm.wait_exit(T);
    let log = vm.log_text();
    assert!(st.is_some_and(|s| s.success()), "hostvm exits 0 once all frames are sent: {st:?}\n{log}");
    // Paced at 2 kpps (the sender sleeps between frames), so the harness's 256 receive buffers
    // never run out, even on a loaded machine: nothing is lost.
    let seqs: Vec<u64> = got.iter().map(|f| verify_frame(f).expect("intact test frame")).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order");
    assert_eq!(got.len(), 1000, "all frames arrived:\n{log}");
    assert!(got.iter().all(|f| f.len() == 200 && f[6..12] == VM0));
    assert_eq!(nic_counts(&log, 0), (0, 1000));
    assert!(
        log.contains("idles=") && !log.contains(" idles=0"),
        "a slow paced sender sleeps between frames: {log}"
    );
}

#[test]
fn sink_payload_counts_frames_and_finishes_at_its_count() {
    let dir = Scratch::new("hostvm-sink");
    let _sw = start_switch(&dir, &["h", "vm"]);
    let mut h = connect_default(&dir, "h");
    let args = [
        vec!["--payload".into(), "sink".into(), "--count".into(), "300".into()],
        net(&dir, "vm", VM0, "").to_vec(),
    ]
    .concat();
    let mut vm = hostvm(&dir, "vm", &args);
    for f in frames(VM0, mac(1), 300, 0) {
        send(&mut h, 0, &f);
        std::thread::sleep(Duration::from_micros(200));
    }
    let st = vm.wait_exit(T);
    let log = vm.log_text();
    assert!(st.is_some_and(|s| s.success()), "{st:?}\n{log}");
    assert_eq!(nic_counts(&log, 0), (300, 0), "{log}");
}

#[test]
fn vm_keeps_working_when_a_client_mode_switch_restarts() {
    let dir = Scratch::new("hostvm-restart");
    let specs = ["h", "vm,client"];
    let sw = start_switch(&dir, &specs);
    // hostvm listens (server); the switch's client-mode port connects to it.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostvm"));
    cmd.args(["run", "--mem", "64M", "--serial", "null", "--stats-interval", "0", "--payload", "echo"]);
    cmd.args(net(&dir, "vm", VM0, ",server"));
    let mut vm = Proc::spawn(cmd, &dir.path("vm.log"));
    assert!(wait_until(T, || vm.log_text().contains("payload NICs ready")), "{}", vm.log_text());
    let mut h = connect_default(&dir, "h");
    echo_round(&mut h, &frames(VM0, mac(1), 100, 0), VM0);

    drop(h);
    drop(sw);
    std::thread::sleep(Duration::from_millis(300));
    let sw = Switch::start(switch_config(&dir, &specs)).expect("the switch restarts");
    let mut h = connect_default(&dir, "h");
    // The VM was never told: the switch reconnected, hostvm re-sent memory and ring state.
    await_echo(&mut h, VM0);
    let before = find(&sw.stats().expect("stats"), "vm").tx.packets;
    echo_round(&mut h, &frames(VM0, mac(1), 100, 1000), VM0);
    let s = wait_stats(&sw, T, |s| find(s, "vm").tx.packets == before + 100);
    assert_eq!(find(&s, "vm").tx.packets, before + 100);
    let log = vm.stop(T);
    assert!(log.contains("nic0 reconnected 1 times"), "{log}");
    let (rx, tx) = nic_counts(&log, 0);
    assert_eq!(rx, tx, "every frame received was echoed: {log}");
    assert!(rx >= 201, "{log}");
}

#[test]
fn hugepages_back_the_guest_or_the_shortage_is_explained() {
    let free: u64 = std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let dir = Scratch::new("hostvm-huge");
    // hostvm seals its memfd, but a hugetlb memfd can still lose pages (a hole punched while
    // the pool is empty): the switch maps it only under the SIGBUS guard.
    let cfg = SwitchConfig { unsealed_memory: UnsealedMemory::Guard, ..switch_config(&dir, &["h", "vm"]) };
    let _sw = Switch::start(cfg).expect("switch starts");
    let args =
        [vec!["--payload".into(), "echo".into(), "--hugepages".into()], net(&dir, "vm", VM0, "").to_vec()]
            .concat();
    if free >= 32 {
        let mut h = connect_default(&dir, "h");
        let mut vm = hostvm(&dir, "vm", &args);
        assert!(vm.log_text().contains("guest memory 64 MiB on 2 MiB huge pages"), "{}", vm.log_text());
        echo_round(&mut h, &frames(VM0, mac(1), 50, 0), VM0);
        let log = vm.stop(T);
        assert_eq!(nic_counts(&log, 0), (50, 50), "{log}");
    } else {
        // Not enough pages reserved: a clear error that says how to reserve them.
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostvm"));
        cmd.args(["run", "--mem", "64M", "--net-wait", "10"]).args(&args);
        let mut vm = Proc::spawn(cmd, &dir.path("vm.log"));
        assert_eq!(vm.wait_exit(T).and_then(|s| s.code()), Some(1));
        assert!(vm.log_text().contains("nr_hugepages"), "{}", vm.log_text());
    }
}

#[test]
fn a_missing_switch_is_a_clear_error() {
    let dir = Scratch::new("hostvm-noswitch");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostvm"));
    cmd.args(["run", "--mem", "64M", "--payload", "echo", "--net-wait", "1"]);
    cmd.args(net(&dir, "nobody", VM0, ""));
    let mut vm = Proc::spawn(cmd, &dir.path("vm.log"));
    let st = vm.wait_exit(T).expect("exits");
    let log = vm.log_text();
    assert_eq!(st.code(), Some(1), "{log}");
    assert!(log.contains("no switch listening") && log.contains("nobody.sock"), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostvm"));
    cmd.args(["run", "--payload", "forward"]).args(net(&dir, "x", VM0, ""));
    let mut vm = Proc::spawn(cmd, &dir.path("fwd.log"));
    assert_eq!(vm.wait_exit(T).and_then(|s| s.code()), Some(1));
    assert!(vm.log_text().contains("two --net"), "{}", vm.log_text());
}
