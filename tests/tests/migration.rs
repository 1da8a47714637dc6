//! Live migration through the switch, from the frontend's side: the dirty log (SET_LOG_BASE,
//! VHOST_F_LOG_ALL, the rings' log addresses) read and cleared pass by pass as QEMU's pre-copy
//! reads it, while another guest streams frames into the migrating one. After the rings stop and
//! a last pass, the copy must equal the guest's memory byte for byte: a page the switch wrote
//! and did not mark would keep its stale contents at the destination.
//!
//! `test-hooks` breaks the log on purpose (received frames left unmarked) to show the check
//! catches it. The hook is process-wide, so the tests here run one at a time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e_tests::{
    connect_default, drain, init_log, mac, port_info, port_stats, send, start_switch, wait_until, Scratch,
};
use vswitch::config::SwitchConfig;
use vswitch::switch::Switch;
use vswitch::uplink::link::LinkEnd;
use vswitch_bench::frame::{build_frame, frame_seq};
use vswitch_bench::frontend::migration::LOG_PAGE;
use vswitch_bench::frontend::{Frontend, FrontendConfig, Session};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a simulated pre-copy found.
struct Precopy {
    /// Pages whose copy differs from the guest's memory after the last pass.
    stale: Vec<u64>,
    /// Pages copied again in the passes after the first (the log's marks).
    recopied: usize,
    /// Passes run while traffic flowed.
    passes: usize,
}

/// Pre-copy as QEMU runs it against `fe`'s memory: dirty logging on, everything copied, then
/// passes that each copy the pages marked since the last, while `traffic` runs in another
/// thread (at least `min_passes` of them, and until it ends); then the rings are stopped
/// (GET_VRING_BASE: the source's last step before the switch-over) and one last pass.
fn precopy(fe: &mut Frontend, min_passes: usize, traffic: impl FnOnce() + Send) -> Precopy {
    fe.start_migration_log().expect("dirty logging starts");
    let len = fe.memory_len();
    let mut copy = fe.memory_snapshot(0, len);
    let mut recopied = 0;
    let pass = |fe: &mut Frontend, copy: &mut Vec<u8>| {
        let pages = fe.take_dirty_pages();
        for p in &pages {
            let off = (p * LOG_PAGE) as usize;
            if off < len {
                let bytes = fe.memory_snapshot(off, LOG_PAGE as usize);
                copy[off..off + bytes.len()].copy_from_slice(&bytes);
            }
        }
        pages.len()
    };
    let mut passes = 0;
    std::thread::scope(|s| {
        let t = s.spawn(traffic);
        while passes < min_passes || !t.is_finished() {
            std::thread::sleep(Duration::from_millis(3));
            recopied += pass(fe, &mut copy);
            passes += 1;
        }
        t.join().expect("the traffic thread");
    });
    fe.stop().expect("the rings stop (GET_VRING_BASE)");
    recopied += pass(fe, &mut copy);
    let now = fe.memory_snapshot(0, len);
    let stale = (0..len as u64 / LOG_PAGE)
        .filter(|p| {
            let r = (p * LOG_PAGE) as usize..((p + 1) * LOG_PAGE) as usize;
            copy[r.clone()] != now[r]
        })
        .collect();
    Precopy { stale, recopied, passes }
}

/// Sends `n` frames of sizes 60..1514 from `fa` (MAC `src`) to `dst`, a few at a time.
fn stream(fa: &mut Frontend, src: [u8; 6], dst: [u8; 6], n: u64) {
    for i in 0..n {
        let f = build_frame(dst, src, None, 18 + (i as usize * 211) % 1455, i);
        send(fa, 0, &f);
        if i % 4 == 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A switch with guests a (the sender) and b (migrating), both MACs learned.
fn two_guests(dir: &Scratch) -> (Switch, Frontend, Frontend) {
    let sw = start_switch(dir, &["a", "b"]);
    let mut fa = connect_default(dir, "a");
    let mut fb = connect_default(dir, "b");
    send(&mut fa, 0, &build_frame([0xff; 6], mac(1), None, 18, 0));
    send(&mut fb, 0, &build_frame([0xff; 6], mac(2), None, 18, 0));
    drain(&mut fa, Duration::from_millis(50));
    drain(&mut fb, Duration::from_millis(50));
    (sw, fa, fb)
}

/// Frames delivered into b's receive ring so far.
fn delivered(sw: &Switch, port: &str) -> u64 {
    port_stats(sw, port).tx.packets
}

#[test]
fn a_guest_receiving_frames_while_it_migrates_has_every_page_the_switch_wrote_in_the_dirty_log() {
    let _one = one_at_a_time();
    let dir = Scratch::new("mig-log");
    let (sw, mut fa, mut fb) = two_guests(&dir);
    let before = delivered(&sw, "b");
    // Below b's 256 receive buffers: b does not take frames while it migrates (a paused guest's
    // own writes would be KVM's log's, not the switch's), so every frame must find a buffer.
    let n = 200;
    let r = precopy(&mut fb, 4, || stream(&mut fa, mac(1), mac(2), n));
    let info = port_info(&sw, "b").device;
    let log = info.dirty_log.expect("ctl ports shows b's dirty log");
    let got = delivered(&sw, "b") - before;
    println!(
        "{} passes, {} pages copied again, {got} frames delivered during the migration; log {} bytes, {} marks beyond it",
        r.passes, r.recopied, log.bytes, log.beyond
    );
    assert_eq!(got, n, "every frame reached b's buffers");
    assert!(log.logging && log.bases == 1, "LOG_ALL acked with one log: {log:?}");
    assert!(info.features.iter().any(|f| f == "LOG_ALL"), "features shown: {:?}", info.features);
    assert_eq!(log.beyond, 0, "no write of the switch fell outside the log");
    assert!(r.recopied > 0, "the frames written during the migration were marked");
    assert!(r.stale.is_empty(), "pages the switch wrote but did not mark: {:?}", r.stale);
}

#[test]
fn with_four_queue_pairs_and_two_polling_threads_every_page_written_is_in_the_log() {
    let _one = one_at_a_time();
    init_log();
    let dir = Scratch::new("mig-mq");
    let cfg = SwitchConfig {
        pmd_cores: vec![0, 1],
        ..e2e_tests::switch_config(&dir, &["a,queues=4", "b,queues=4"])
    };
    let sw = Switch::start(cfg).expect("switch starts");
    let fcfg = FrontendConfig { queue_pairs: 4, ..FrontendConfig::default() };
    let mut fa = e2e_tests::connect(&dir, "a", fcfg.clone());
    let mut fb = e2e_tests::connect(&dir, "b", fcfg);
    send(&mut fa, 0, &build_frame([0xff; 6], mac(1), None, 18, 0));
    send(&mut fb, 0, &build_frame([0xff; 6], mac(2), None, 18, 0));
    drain(&mut fa, Duration::from_millis(50));
    drain(&mut fb, Duration::from_millis(50));
    let before = delivered(&sw, "b");
    // From all four of a's transmit queues (both threads poll some), flows spread over b's
    // four receive queues by their UDP ports: deliveries from both threads into the same
    // rings and the same log.
    let n = 600u64;
    let r = precopy(&mut fb, 4, || {
        for i in 0..n {
            let mut f = build_frame(mac(2), mac(1), None, 18 + (i as usize * 211) % 1455, i);
            f[34..36].copy_from_slice(&(1000 + (i % 64) as u16).to_be_bytes());
            send(&mut fa, (i % 4) as u16, &f);
            if i % 8 == 7 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });
    let st = port_stats(&sw, "b");
    let per_queue: Vec<u64> =
        st.queues.iter().filter(|q| q.queue % 2 == 0).map(|q| q.counters.packets).collect();
    let pmds: Vec<u64> = sw.stats().unwrap().pmds.iter().map(|p| p.packets).collect();
    println!(
        "{} passes, {} pages copied again; b's receive queues {per_queue:?}; threads {pmds:?}",
        r.passes, r.recopied
    );
    assert_eq!(st.tx.packets - before, n, "every frame reached b");
    assert!(per_queue.iter().filter(|&&k| k > 0).count() >= 3, "flows spread over b's queues: {per_queue:?}");
    assert!(pmds.iter().all(|&k| k > 0), "both threads delivered: {pmds:?}");
    assert!(r.stale.is_empty(), "pages written but not marked: {:?}", r.stale);
}

#[test]
fn behind_a_viommu_the_log_is_by_guest_physical_address_and_complete() {
    let _one = one_at_a_time();
    let dir = Scratch::new("mig-viommu");
    let sw = start_switch(&dir, &["a", "b"]);
    let mut fa = connect_default(&dir, "a");
    // b's rings and buffers are IOVAs (far from its guest-physical addresses); the log is
    // by guest-physical address, which the switch finds from where it writes.
    let cfg = FrontendConfig {
        iommu: Some(vswitch_bench::frontend::IommuConfig::default()),
        ..FrontendConfig::default()
    };
    let mut fb = e2e_tests::connect(&dir, "b", cfg);
    assert!(fb.has_viommu());
    send(&mut fa, 0, &build_frame([0xff; 6], mac(1), None, 18, 0));
    send(&mut fb, 0, &build_frame([0xff; 6], mac(2), None, 18, 0));
    drain(&mut fa, Duration::from_millis(50));
    drain(&mut fb, Duration::from_millis(200));
    let before = delivered(&sw, "b");
    let r = precopy(&mut fb, 4, || stream(&mut fa, mac(1), mac(2), 200));
    let log = port_info(&sw, "b").device.dirty_log.expect("b's log");
    println!(
        "behind a vIOMMU: {} passes, {} pages copied again, {} marks beyond the log",
        r.passes, r.recopied, log.beyond
    );
    assert_eq!(delivered(&sw, "b") - before, 200, "every frame reached b");
    assert_eq!(log.beyond, 0, "every mark inside the log (guest-physical, not IOVA)");
    assert!(r.recopied > 0 && r.stale.is_empty(), "pages written but not marked: {:?}", r.stale);
}

#[test]
fn with_the_log_of_received_frames_broken_on_purpose_the_destination_keeps_stale_pages() {
    let _one = one_at_a_time();
    let dir = Scratch::new("mig-broken");
    let (sw, mut fa, mut fb) = two_guests(&dir);
    vswitch::test_hooks::set_skip_rx_log(true);
    let r = precopy(&mut fb, 4, || stream(&mut fa, mac(1), mac(2), 100));
    vswitch::test_hooks::set_skip_rx_log(false);
    println!("broken log: {} stale pages after {} passes", r.stale.len(), r.passes);
    assert!(delivered(&sw, "b") >= 100, "the frames reached b");
    // The frames landed in b's receive buffers: pages nobody copied again.
    let (bufs, len) = fb.buffer_area(0);
    assert!(!r.stale.is_empty(), "a broken log must leave stale pages");
    assert!(
        r.stale.iter().all(|p| (bufs..bufs + len).contains(&(p * LOG_PAGE))),
        "the stale pages are b's receive buffers ({bufs:#x}+{len:#x}): {:?}",
        r.stale
    );
}

#[test]
fn logging_stops_when_the_migration_is_cancelled_and_the_guest_goes_on() {
    let _one = one_at_a_time();
    let dir = Scratch::new("mig-cancel");
    let (sw, mut fa, mut fb) = two_guests(&dir);
    fb.start_migration_log().expect("logging starts");
    stream(&mut fa, mac(1), mac(2), 20);
    assert!(wait_until(Duration::from_secs(5), || !drain(&mut fb, Duration::from_millis(20)).is_empty()));
    assert!(!fb.take_dirty_pages().is_empty(), "marks while logging");
    fb.stop_migration_log().expect("logging stops");
    let log = port_info(&sw, "b").device.dirty_log.expect("the log is still shown");
    assert!(!log.logging, "LOG_ALL no longer acked");
    // Writes are no longer marked; traffic goes on both ways.
    e2e_tests::exchange(&mut fa, &mut fb, mac(1), mac(2), 50, 1000);
    e2e_tests::exchange(&mut fb, &mut fa, mac(2), mac(1), 50, 2000);
    assert!(fb.take_dirty_pages().is_empty(), "nothing marked once logging stopped");
}

#[test]
fn send_rarp_from_the_destination_moves_the_guests_mac_at_once() {
    let _one = one_at_a_time();
    let dir = Scratch::new("mig-rarp");
    let sw = start_switch(&dir, &["a", "src", "dst"]);
    let mut fa = connect_default(&dir, "a");
    let mut fsrc = connect_default(&dir, "src");
    let mut fdst = connect_default(&dir, "dst");
    let g = mac(7);
    // The guest lives on src: a's frames to it go there.
    send(&mut fsrc, 0, &build_frame([0xff; 6], g, None, 18, 0));
    drain(&mut fa, Duration::from_millis(50));
    drain(&mut fdst, Duration::from_millis(50));
    let on = |sw: &Switch| {
        let id = |n: &str| port_info(sw, n).id;
        let e = sw.fdb().unwrap().into_iter().find(|e| e.mac == e2e_tests::mac_str(g));
        e.map(|e| {
            if e.port == id("src") {
                "src"
            } else if e.port == id("dst") {
                "dst"
            } else {
                "?"
            }
        })
    };
    assert_eq!(on(&sw), Some("src"));
    // The destination's QEMU sends SEND_RARP once the guest runs there.
    let t = Instant::now();
    fdst.send_rarp(g).expect("SEND_RARP accepted");
    assert!(wait_until(Duration::from_secs(2), || on(&sw) == Some("dst")), "the MAC moved: {:?}", on(&sw));
    println!("forwarding table moved {:?} after SEND_RARP", t.elapsed());
    send(&mut fa, 0, &build_frame(g, mac(1), None, 18, 42));
    let got = e2e_tests::recv_n(&mut fdst, 1, Duration::from_secs(2));
    assert_eq!(got.len(), 1, "a's frame to the guest reaches the destination");
    assert_eq!(frame_seq(&got[0]), Some(42));
    assert!(drain(&mut fsrc, Duration::from_millis(50)).is_empty(), "and not the source");
    // The source's frontend goes (QEMU quits after the switch-over): the entry stays on dst.
    drop(fsrc);
    assert!(wait_until(Duration::from_secs(2), || !port_info(&sw, "src").connected));
    assert_eq!(on(&sw), Some("dst"), "the source's disconnect leaves the moved entry alone");
}

/// A raw session to port `name`, acking LOG_SHMFD and REPLY_ACK, with features set.
fn session(dir: &Scratch, name: &str) -> Session {
    use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
    let s = std::os::unix::net::UnixStream::connect(e2e_tests::sock(dir, name)).expect("connect");
    let mut ses = Session::new(s, 2, Duration::from_secs(2), P::REPLY_ACK | P::LOG_SHMFD).expect("handshake");
    ses.set_features(vswitch_bench::frontend::VIRTIO_F_VERSION_1).expect("features");
    ses
}

fn memfd(len: u64, seal: bool) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"log".as_ptr(), libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a new fd we own.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    if seal {
        // SAFETY: fcntl on our own fd.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) }, 0);
    }
    f
}

#[test]
fn a_log_region_the_switch_cannot_trust_is_refused_and_so_is_logging_without_one() {
    use std::os::fd::AsRawFd;
    let _one = one_at_a_time();
    init_log();
    let dir = Scratch::new("mig-hostile");
    let sw = start_switch(&dir, &["a", "b"]);
    let log_all = vswitch_bench::frontend::VHOST_F_LOG_ALL | vswitch_bench::frontend::VIRTIO_F_VERSION_1;
    let refused = |ses: &mut Session, why: &str| {
        let e = ses.set_features(log_all).expect_err(why);
        println!("{why}: {e}");
    };
    // LOG_ALL with no log at all.
    let mut s = session(&dir, "a");
    refused(&mut s, "LOG_ALL before any SET_LOG_BASE");
    // A log larger than its file; an unsealed memfd (could shrink under the switch: SIGBUS).
    let small = memfd(4096, true);
    s.set_log_base(small.as_raw_fd(), 8192).expect("SET_LOG_BASE is answered");
    refused(&mut s, "a log past the end of its file");
    let unsealed = memfd(8192, false);
    s.set_log_base(unsealed.as_raw_fd(), 8192).expect("SET_LOG_BASE is answered");
    refused(&mut s, "an unsealed log");
    let info = port_info(&sw, "a").device;
    assert!(info.dirty_log.is_none(), "no log kept: {:?}", info.dirty_log);
    assert!(info.protocol_errors >= 5, "each refusal counted: {}", info.protocol_errors);
    // A good one is taken, on the same connection.
    let good = memfd(8192, true);
    s.set_log_base(good.as_raw_fd(), 8192).expect("SET_LOG_BASE");
    s.set_features(log_all).expect("LOG_ALL with a sealed log that fits");
    let log = port_info(&sw, "a").device.dirty_log.expect("the log is shown");
    assert!(log.logging && log.bytes == 8192, "{log:?}");
}

#[test]
fn a_guest_plugged_into_a_level_2_nic_steps_aside_while_it_migrates_and_loses_nothing() {
    let _one = one_at_a_time();
    let dir = Scratch::new("mig-accel");
    let wire = "migw";
    let a_mac = mac(1);
    let wire_mac = mac(0x31);
    let sw = e2e_tests::start_specs(
        &dir,
        &[format!("up=nic:wire:{wire},level=2,pools=4"), "a=SOCK:a.sock".into()],
    );
    let end = LinkEnd::attach(wire).expect("the wire's far end");
    let mut fa = connect_default(&dir, "a");
    send(&mut fa, 0, &build_frame([0xff; 6], a_mac, None, 18, 0));
    assert_eq!(end.send([build_frame([0xff; 6], wire_mac, None, 18, 0).as_slice()]), 1);
    assert!(wait_until(Duration::from_secs(5), || sw
        .nic("up")
        .is_ok_and(|r| r.bound.iter().any(|b| !b.macs.is_empty()))));
    let r = sw.accel_plug("a", "l2").expect("a plugs at Level 2");
    assert_eq!(r.tier.as_deref(), Some("l2"));
    drain(&mut fa, Duration::from_millis(50));
    let tier = |sw: &Switch| sw.accel_status(Some("a")).unwrap()[0].tier.clone();
    // The wire streams to a; the migration starts mid-stream. The device DMAs into a's
    // buffers until the switch unplugs it (before its reply to the SET_FEATURES that starts
    // logging), the software path (which logs) after.
    let n = 220u64;
    let device_before = sw.accel_status(Some("a")).unwrap()[0].rx_frames;
    let soft_before = delivered(&sw, "a");
    let done = std::sync::atomic::AtomicBool::new(false);
    let p = std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..n {
                let f = build_frame(a_mac, wire_mac, None, 18 + (i as usize * 211) % 1455, i);
                while end.send([f.as_slice()]) == 0 {
                    std::thread::sleep(Duration::from_micros(200));
                }
                if i % 4 == 3 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            done.store(true, std::sync::atomic::Ordering::Release);
        });
        // a's 256 buffers are not reposted while it migrates: all 220 frames fit.
        let dev = || sw.accel_status(Some("a")).unwrap()[0].rx_frames - device_before;
        assert!(wait_until(Duration::from_secs(5), || dev() >= 40), "the device delivers first");
        let seen = dev();
        assert!(seen < n - 20, "the migration starts mid-stream ({seen} delivered)");
        precopy(&mut fa, 4, || {
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    });
    let rep = sw.accel_status(Some("a")).unwrap().remove(0);
    // The port's counters count the device's deliveries too.
    let (by_device, total) = (rep.rx_frames - device_before, delivered(&sw, "a") - soft_before);
    let by_switch = total - by_device;
    println!(
        "{} passes, {} pages copied again; {by_device} frames by the device, {by_switch} by the software path; hand-over {:?}",
        p.passes, p.recopied, rep.last
    );
    assert!(p.stale.is_empty(), "pages written but not marked: {:?}", p.stale);
    let last = rep.last.expect("a hand-over report");
    assert!(last.balanced && last.tier == "l2", "unplugged through the contract: {last:?}");
    assert_eq!(rep.unplugs, 1, "unplugged once, when logging started");
    assert_eq!(total, n, "every frame of the wire reached a once");
    assert!(by_device > 0 && by_switch > 0, "the device served a, then the software path");
    assert!(tier(&sw).is_none(), "a stays on the software path while its guest migrates");
    drop(fa);
    // The frontend went (the guest runs elsewhere now): the port is no longer migrating, and
    // its next frontend is served as the configuration says.
    let mut fa2 = connect_default(&dir, "a");
    send(&mut fa2, 0, &build_frame([0xff; 6], a_mac, None, 18, 0));
    fa2.start_migration_log().expect("logging starts on the new connection");
    let e = sw.accel_plug("a", "l2").expect_err("no plug while the guest migrates");
    assert!(e.to_string().contains("migrating"), "says why: {e}");
    fa2.stop_migration_log().expect("logging stops");
    sw.accel_plug("a", "l2").expect("plugs once logging stopped");
    // A cancelled migration puts a plugged port back at its tier.
    fa2.start_migration_log().expect("logging starts");
    assert!(tier(&sw).is_none(), "unplugged for the migration");
    fa2.stop_migration_log().expect("logging stops");
    assert!(
        wait_until(Duration::from_secs(2), || tier(&sw).as_deref() == Some("l2")),
        "back at Level 2 after the cancelled migration: {:?}",
        tier(&sw)
    );
}

#[test]
fn send_rarp_cannot_pull_another_guests_mac_past_anti_spoofing_or_learn_a_group_address() {
    use vswitch::policy::spoof::SpoofConfig;
    use vswitch::policy::PolicyConfig;
    let _one = one_at_a_time();
    let dir = Scratch::new("mig-rarp-hostile");
    let sw = start_switch(&dir, &["victim", "evil"]);
    let mut fv = connect_default(&dir, "victim");
    let mut fe = connect_default(&dir, "evil");
    let (v, e) = (mac(0x0b), mac(0x0e));
    send(&mut fv, 0, &build_frame([0xff; 6], v, None, 18, 0));
    drain(&mut fe, Duration::from_millis(50));
    let spoof = SpoofConfig { macs: vec![e2e_tests::mac_str(e)], ips: None };
    sw.set_policy("evil", PolicyConfig { anti_spoof: Some(spoof), ..Default::default() }).expect("policy");
    let port_of = |m: [u8; 6]| {
        let e = sw.fdb().unwrap().into_iter().find(|x| x.mac == e2e_tests::mac_str(m));
        e.map(|x| x.port)
    };
    let victim = port_info(&sw, "victim").id;
    assert_eq!(port_of(v), Some(victim));
    // The frontend of "evil" claims the victim's MAC, and a group address.
    fe.send_rarp(v).expect("answered");
    fe.send_rarp([0x01, 0, 0x5e, 0, 0, 1]).expect("answered");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(port_of(v), Some(victim), "the victim's MAC stays on its port");
    assert_eq!(port_of([0x01, 0, 0x5e, 0, 0, 1]), None, "a group address is never learned");
    // Its own allowed MAC is taken.
    fe.send_rarp(e).expect("answered");
    assert!(wait_until(Duration::from_secs(2), || port_of(e) == Some(port_info(&sw, "evil").id)));
}
