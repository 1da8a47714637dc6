//! Live migration of a Linux guest between two QEMU processes on this machine, both on the
//! switch (source on port m1, destination on m2), while a peer guest pings it and streams
//! transfers to it (the kit's `feeder` and `sink` roles: numbers from a random start, so the
//! sink can say where bytes went wrong and what came instead). QEMU must complete
//! the migration (it refuses to start one without VHOST_F_LOG_ALL); the guest must go on
//! answering on the destination, every transfer it received must have the checksum the peer
//! sent, and its MAC must move to m2 at once (SEND_RARP). The same with the source port plugged
//! into a Level 2 NIC, which steps aside when logging starts, and with the guest's NIC on packed
//! rings.
//!
//! TCG guests (see linux_guests.rs) on QEMU 10: QEMU 7.2 loses guest writes in a TCG
//! migration (see `Kit::with_qemu10`). The tests in this file run one at a time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e_tests::linux::{Guest, GuestSpec, Kit, Qmp};
use e2e_tests::{port_info, sock, start_specs, wait_until, Scratch};
use serde_json::json;
use vswitch::switch::Switch;

static SERIAL: Mutex<()> = Mutex::new(());

const IP_P: &str = "10.78.0.1";
const IP_M: &str = "10.78.0.2";
const MAC_P: &str = "52:54:00:4c:00:01";
const MAC_M: &str = "52:54:00:4c:00:02";
/// The peer's ping interval, seconds.
const PING_I: f64 = 0.1;
/// KiB per transfer.
const BLOB_KB: u64 = 2048;

/// `KIT ... WORD k=v k=v` lines of a console: their fields, in order. Lines another writer cut
/// (busybox's ping shares the console) lack a field: [`whole`] filters them.
fn kit_lines(console: &str, word: &str) -> Vec<HashMap<String, String>> {
    console
        .lines()
        .filter_map(|l| {
            let rest = l.split_once(&format!(" {word} "))?.1;
            l.starts_with("KIT t=").then(|| {
                rest.split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
        })
        .collect()
}

/// The lines of `lines` with every field of `keys`, non-empty.
fn whole(lines: Vec<HashMap<String, String>>, keys: &[&str]) -> Vec<HashMap<String, String>> {
    lines.into_iter().filter(|f| keys.iter().all(|k| f.get(*k).is_some_and(|v| !v.is_empty()))).collect()
}

/// busybox ping's answered sequence numbers in `console`.
fn ping_seqs(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.split_once("seq=")?.1.split_whitespace().next()?.parse().ok())
        .collect()
}

fn fdb_port(sw: &Switch, mac: &str) -> Option<String> {
    let ports = sw.ports().ok()?;
    let e = sw.fdb().ok()?.into_iter().find(|e| e.mac == mac)?;
    ports.into_iter().find(|p| p.id == e.port).map(|p| p.name)
}

/// What runs under the migrating guest's port.
#[derive(Clone, Copy, PartialEq)]
enum Under {
    /// The software path, split rings.
    Split,
    /// The source port plugged into a Level 2 NIC.
    Level2,
    /// The software path, the guest's NIC on packed rings (`packed=on`) on both QEMUs.
    Packed,
}

fn migrate_under_traffic(under: Under) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let kit = Kit::get().with_qemu10();
    let accel = under == Under::Level2;
    let name = match under {
        Under::Split => "lmig",
        Under::Level2 => "lmig-accel",
        Under::Packed => "lmig-packed",
    };
    let dir = Scratch::new(name);
    let dst_dir = Scratch::new(&format!("{name}-dst"));
    // The migrating guest's ports offer packed rings when it asks for them.
    let packed = if under == Under::Packed { ",packed=on" } else { "" };
    let mut specs = vec![
        "p=SOCK:p.sock".to_string(),
        format!("m1=SOCK:m1.sock{packed}"),
        format!("m2=SOCK:m2.sock{packed}"),
    ];
    let wire = format!("lmigw{}", std::process::id() % 10000);
    if accel {
        specs.push(format!("up=nic:wire:{wire},level=2,pools=4"));
    }
    let sw = start_specs(&dir, &specs);
    let _end = accel.then(|| vswitch::uplink::link::LinkEnd::attach(&wire).expect("the wire's far end"));

    let (qmp_src, qmp_dst, mig) = (dir.path("src.qmp"), dst_dir.path("dst.qmp"), dir.path("mig.sock"));
    let ip = format!("ip={IP_M}/24");
    let mut src_spec = GuestSpec::new("m", &sock(&dir, "m1"), MAC_M, &["role=sink", &ip]);
    src_spec.mem_mb = 256;
    src_spec.timeout_s = 400;
    src_spec.qemu_args = vec!["-qmp".into(), format!("unix:{},server=on,wait=off", qmp_src.display())];
    if under == Under::Packed {
        src_spec.device = vec!["packed=on".into()];
    }
    // The destination: the same machine, the same kernel command line, its NIC on m2.
    let mut dst_spec = src_spec.clone();
    dst_spec.sock = sock(&dir, "m2");
    dst_spec.qemu_args = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp_dst.display()),
        "-incoming".into(),
        format!("unix:{}", mig.display()),
    ];
    let mut peer_spec = GuestSpec::new(
        "p",
        &sock(&dir, "p"),
        MAC_P,
        &[
            "role=feeder",
            &format!("ip={IP_P}/24"),
            &format!("peer={IP_M}"),
            &format!("ping_i={PING_I}"),
            &format!("blob_kb={BLOB_KB}"),
        ],
    );
    peer_spec.mem_mb = 256;
    peer_spec.timeout_s = 400;
    let mut src = Guest::start(&kit, &dir, &src_spec);
    let mut dst = Guest::start(&kit, &dst_dir, &dst_spec);
    let mut peer = Guest::start(&kit, &dir, &peer_spec);
    // A failure's story: each console whole but for the peer's ping answers (counted), QEMU's
    // output, and the switch's view of the three ports.
    let story = |src: &Guest, dst: &Guest, peer: &Guest| {
        let mut out = String::new();
        for g in [src, dst, peer] {
            let c = g.console();
            let pings = c.lines().filter(|l| l.contains("bytes from")).count();
            let rest: Vec<&str> = c.lines().filter(|l| !l.contains("bytes from")).collect();
            out += &format!(
                "--- guest {} console ({pings} ping answers left out) ---\n{}\n--- qemu {} ---\n{}\n",
                g.name,
                rest.join("\n"),
                g.name,
                g.qemu_log()
            );
        }
        let ports =
            sw.ports().map(|v| v.into_iter().map(|p| format!("{p:?}")).collect::<Vec<_>>().join("\n"));
        out + &format!("--- switch ports ---\n{}", ports.unwrap_or_else(|e| e.to_string()))
    };

    // Traffic flows before the migration: pings answered, two transfers received.
    let flowing = wait_until(Duration::from_secs(240), || {
        kit_lines(&src.console(), "RECV").len() >= 2 && ping_seqs(&peer.console()).len() >= 10
    });
    assert!(flowing, "traffic before the migration\n{}", story(&src, &dst, &peer));
    let packed = port_info(&sw, "m1").device.features.iter().any(|f| f == "RING_PACKED");
    assert_eq!(packed, under == Under::Packed, "m1's rings: {:?}", port_info(&sw, "m1").device.features);
    if accel {
        let r = sw.accel_plug("m1", "l2").expect("the source port plugs at Level 2");
        assert_eq!(r.tier.as_deref(), Some("l2"));
        std::thread::sleep(Duration::from_secs(1));
        let r = sw.accel_status(Some("m1")).unwrap().remove(0);
        assert!(r.tier.is_some() && r.rx_frames + r.tx_frames > 0, "the device carries m's traffic: {r:?}");
    }
    // Start while a transfer is under way (the peer announced it and has not finished it).
    let in_flight = || {
        let c = peer.console();
        let (sends, sent) = (kit_lines(&c, "SEND"), kit_lines(&c, "SENT").len());
        (sends.len() > sent).then(|| sends.last().and_then(|f| f.get("md5").cloned())).flatten()
    };
    let mut spanning = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            spanning = in_flight();
            spanning.is_some()
        }),
        "a transfer under way\n{}",
        story(&src, &dst, &peer)
    );
    let spanning = spanning.unwrap_or_default();
    let before = peer.console().len();

    let mut q = Qmp::connect(&qmp_src, Duration::from_secs(10)).expect("the source's QMP");
    q.execute("migrate-set-parameters", json!({ "max-bandwidth": 1u64 << 30, "downtime-limit": 300 }))
        .expect("migration parameters");
    let t0 = Instant::now();
    q.execute("migrate", json!({ "uri": format!("unix:{}", mig.display()) })).expect("migrate starts");
    let (mut saw_logging, mut status, mut last_log) = (false, json!(null), None);
    while t0.elapsed() < Duration::from_secs(180) {
        let log = port_info(&sw, "m1").device.dirty_log;
        saw_logging |= log.as_ref().is_some_and(|l| l.logging);
        if log.is_some() {
            last_log = log;
        }
        status = q.execute("query-migrate", json!({})).expect("query-migrate");
        match status["status"].as_str() {
            Some("completed") | Some("failed") | Some("cancelled") => break,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let took = t0.elapsed();
    assert_eq!(status["status"], "completed", "migration: {status}\n{}", story(&src, &dst, &peer));
    let during = peer.console().len();
    println!(
        "migration completed in {took:?}: QEMU total-time {} ms, downtime {} ms, setup {} ms, RAM {} bytes transferred, {} dirty-sync rounds",
        status["total-time"], status["downtime"], status["setup-time"], status["ram"]["transferred"], status["ram"]["dirty-sync-count"]
    );
    println!("m1's dirty log as last seen: {last_log:?}");
    assert!(saw_logging, "the switch logged m's writes during the migration");
    let unplugged = accel.then(|| sw.accel_status(Some("m1")).unwrap().remove(0));
    // The source is paused for good: quit it (the switch sees m1's frontend go).
    let _ = q.execute("quit", json!({}));
    assert!(wait_until(Duration::from_secs(10), || !src.running()), "the source QEMU quits");

    // The guest runs on the destination: its MAC moved to m2 at once (SEND_RARP), pings are
    // answered again and transfers go on, each with the checksum the peer sent.
    assert!(
        wait_until(Duration::from_secs(5), || fdb_port(&sw, &MAC_M.to_lowercase()).as_deref() == Some("m2")),
        "the guest's MAC is on m2: {:?}; table {:?}; m2 from its guest {:?}\n{}",
        fdb_port(&sw, &MAC_M.to_lowercase()),
        sw.fdb(),
        e2e_tests::port_stats(&sw, "m2").rx,
        story(&src, &dst, &peer)
    );
    let sent_before = kit_lines(&peer.console(), "SENT").len();
    // (A receiving process stuck across the switch-over is killed after 60 s by the sink.)
    let full_on_dst = |dst: &Guest| {
        kit_lines(&dst.console(), "RECV")
            .iter()
            .any(|r| r.get("bytes").is_some_and(|b| *b == (BLOB_KB * 1024).to_string()))
    };
    let resumed = wait_until(Duration::from_secs(150), || {
        kit_lines(&peer.console(), "SENT").len() >= sent_before + 2 && full_on_dst(&dst)
    });
    assert!(resumed, "transfers resume on the destination\n{}", story(&src, &dst, &peer));
    let console = peer.console();
    let sends: HashMap<String, String> = whole(kit_lines(&console, "SEND"), &["md5", "bytes"])
        .into_iter()
        .map(|f| (f["md5"].clone(), f["bytes"].clone()))
        .collect();
    // The guest's one console, in two files: a line it was writing at the switch-over starts
    // in the source's file and ends in the destination's.
    let m_console = src.console() + &dst.console();
    let recvs = whole(kit_lines(&m_console, "RECV"), &["md5", "bytes"]);
    // Every transfer that arrived whole (as many bytes as sent) has the checksum the peer sent:
    // a page the switch wrote and did not log would leave stale bytes in it. (A transfer cut
    // short, its receiving process stuck across the switch-over and killed, is only counted.)
    let full = format!("{}", BLOB_KB * 1024);
    let (whole_recvs, cut): (Vec<_>, Vec<_>) = recvs.iter().partition(|r| r["bytes"] == full);
    for r in &whole_recvs {
        assert!(
            sends.contains_key(&r["md5"]),
            "a transfer of {} bytes arrived with md5 {} that the peer never sent (summed again from the file: {:?}; \
             first difference: {:?})\n{}",
            r["bytes"],
            r["md5"],
            r.get("file"),
            r.get("diff"),
            story(&src, &dst, &peer)
        );
    }
    // Pings from the migration's start on: answered, and the longest gap between answers.
    let seqs = ping_seqs(&console[before..]);
    let after = ping_seqs(&console[during..]);
    let gap = seqs.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let lost = match (seqs.first(), seqs.last()) {
        (Some(a), Some(b)) => (b - a + 1) - seqs.len() as u64,
        _ => 0,
    };
    println!(
        "pings from the migration's start: {} answered, {lost} lost, longest gap {gap} pings (~{:.1} s); {} answered after it completed; {} transfers verified ({} on the destination)",
        seqs.len(),
        gap as f64 * PING_I,
        after.len(),
        whole_recvs.len(),
        kit_lines(&dst.console(), "RECV").len()
    );
    if !cut.is_empty() {
        println!("{} transfer(s) cut short on the receiving side: {cut:?}", cut.len());
    }
    assert!(!after.is_empty(), "pings are answered after the migration\n{}", story(&src, &dst, &peer));
    let landed = |c: &str| whole(kit_lines(c, "RECV"), &["md5"]).iter().any(|r| r["md5"] == spanning);
    println!(
        "the transfer under way at the start arrived on the {}",
        if landed(&src.console()) {
            "source (before the switch-over)"
        } else if landed(&m_console) {
            "destination"
        } else {
            "neither (its receiving process was cut short)"
        }
    );
    if let Some(r) = unplugged {
        let last = r.last.clone().expect("a hand-over report");
        println!("unplugged when logging started: {last:?}");
        assert!(
            r.tier.is_none() && last.tier == "l2" && last.balanced,
            "stepped aside through the contract: {r:?}"
        );
        // After the switch-over the destination's port takes the device, and the guest's
        // traffic goes on through it.
        sw.accel_plug("m2", "l2").expect("the destination's port plugs at Level 2");
        let sent = kit_lines(&peer.console(), "SENT").len();
        assert!(
            wait_until(Duration::from_secs(60), || kit_lines(&peer.console(), "SENT").len() >= sent + 2),
            "transfers go on through the device\n{}",
            story(&src, &dst, &peer)
        );
        let d = sw.accel_status(Some("m2")).unwrap().remove(0);
        println!(
            "destination plugged: {} frames received and {} sent by the device",
            d.rx_frames, d.tx_frames
        );
        assert!(d.tier.as_deref() == Some("l2") && d.rx_frames > 0 && d.tx_frames > 0, "{d:?}");
        let sends = whole(kit_lines(&peer.console(), "SEND"), &["md5"]);
        let full = format!("{}", BLOB_KB * 1024);
        for r in whole(kit_lines(&(src.console() + &dst.console()), "RECV"), &["md5", "bytes"]) {
            if r["bytes"] == full {
                assert!(
                    sends.iter().any(|f| f["md5"] == r["md5"]),
                    "a transfer through the device arrived with md5 {} that the peer never sent",
                    r["md5"]
                );
            }
        }
    }
    dst.stop();
    peer.stop();
}

#[test]
fn a_linux_guest_migrates_between_two_qemus_under_ping_and_transfers_with_every_checksum_right() {
    migrate_under_traffic(Under::Split);
}

#[test]
fn a_guest_plugged_into_a_level_2_nic_migrates_too_its_port_stepping_aside_when_logging_starts() {
    migrate_under_traffic(Under::Level2);
}

/// Packed rings hand over a position token (slot and wrap counter) in GET_VRING_BASE, and the
/// device writes its used entries into the descriptor ring itself: both must survive the move.
#[test]
fn a_guest_on_packed_rings_migrates_too() {
    migrate_under_traffic(Under::Packed);
}
