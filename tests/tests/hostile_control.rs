//! Frontends and control clients that try to stop the switch for everyone else: replies never
//! read, message floods, listeners that never accept, paths that are not sockets, slow or
//! greedy control clients. Each costs at most its own connection; the "liveness probe" checks
//! that the others go on (two guests exchange 100 frames, `ports` answers within 1 s).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::{
    connect_default, exchange, init_log, mac, port_config, port_info, sock, start_switch, switch_config,
    wait_until, Proc, Scratch,
};
use vswitch::control::{request, Request};
use vswitch::Switch;
use vswitch_bench::frontend::{Frontend, FrontendConfig};
use vswitch_bench::harness::peer::vswitch_binary;

/// Ports b and c exchange 100 frames, and the switch answers `ports` within 1 s.
fn liveness(sw: &Switch, dir: &Scratch) {
    let t = Instant::now();
    let ports = sw.ports().expect("the control thread answers");
    assert!(t.elapsed() < Duration::from_secs(1), "`ports` took {:?}", t.elapsed());
    assert!(ports.iter().any(|p| p.name == "b"));
    let mut b = connect_default(dir, "b");
    let mut c = connect_default(dir, "c");
    exchange(&mut b, &mut c, mac(0xb), mac(0xc), 100, 0);
    exchange(&mut c, &mut b, mac(0xc), mac(0xb), 100, 1000);
}

/// `code` headers (no payload, flags = version 1) back to back.
fn headers(code: u32, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 * n);
    for _ in 0..n {
        v.extend(code.to_le_bytes());
        v.extend(1u32.to_le_bytes());
        v.extend(0u32.to_le_bytes());
    }
    v
}

/// A frontend that negotiates within `within`.
fn negotiates(dir: &Scratch, name: &str, within: Duration) -> Frontend {
    let t = Instant::now();
    let fe = Frontend::connect(&sock(dir, name), FrontendConfig::default(), within)
        .unwrap_or_else(|e| panic!("frontend on {name} could not negotiate within {within:?}: {e}"));
    assert!(t.elapsed() <= within + Duration::from_millis(500));
    fe
}

#[test]
fn a_frontend_that_never_reads_its_replies_costs_only_its_port() {
    let dir = Scratch::new("ctl-noread");
    let sw = start_switch(&dir, &["a", "b", "c", "d"]);
    let mut s = UnixStream::connect(sock(&dir, "a")).unwrap();
    // 1000 GET_FEATURES (1): each wants a reply, and none is ever read.
    s.write_all(&headers(1, 1000)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let _d = negotiates(&dir, "d", Duration::from_secs(2));
    liveness(&sw, &dir);
    assert!(
        wait_until(Duration::from_secs(5), || !port_info(&sw, "a").connected),
        "the frontend that does not read its replies is disconnected"
    );
}

#[test]
fn a_message_with_too_many_fds_costs_only_its_connection() {
    let dir = Scratch::new("ctl-fdspray");
    let sw = start_switch(&dir, &["a", "b", "c", "d"]);
    let s = UnixStream::connect(sock(&dir, "a")).unwrap();
    // GET_FEATURES (1) with 40 eventfds attached, more than any message may carry. The vhost
    // crate would read the header, refuse the fds and wait for ever for the header again.
    let efds: Vec<vmm_sys_util::eventfd::EventFd> =
        (0..40).map(|_| vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd")).collect();
    let raw: Vec<i32> = efds.iter().map(|e| e.as_raw_fd()).collect();
    e2e_tests::send_raw(&s, 1, 1, 0, &[], &raw);
    std::thread::sleep(Duration::from_millis(200));
    let _d = negotiates(&dir, "d", Duration::from_secs(2));
    liveness(&sw, &dir);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 64];
    assert!(matches!((&s).read(&mut b), Ok(0) | Err(_)), "the connection that sent them is closed");
}

#[test]
fn a_message_flood_does_not_starve_other_ports() {
    let dir = Scratch::new("ctl-flood");
    let sw = start_switch(&dir, &["a", "b", "c", "d"]);
    let mut s = UnixStream::connect(sock(&dir, "a")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // SET_OWNER (3) wants no reply: the switch can always take more.
            let chunk = headers(3, 64 * 1024 / 12);
            let mut sent = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match s.write(&chunk) {
                    Ok(n) => sent += n / 12,
                    Err(_) => break,
                }
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let _d = negotiates(&dir, "d", Duration::from_secs(2));
    let t = Instant::now();
    sw.stats().unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "stats took {:?}", t.elapsed());
    liveness(&sw, &dir);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().unwrap();
    assert!(sent > 10_000, "the flood was a flood ({sent} messages)");
}

/// A listener at `path` that never accepts, with its backlog full.
fn full_backlog(path: &std::path::Path) -> (std::os::unix::net::UnixListener, Vec<UnixStream>) {
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    // SAFETY: listen again on our own socket: only its backlog changes.
    assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
    // Fill the backlog with connections nobody accepts (non-blocking, so we stop when full).
    let mut held = Vec::new();
    for _ in 0..8 {
        match vswitch::switch::sockets::connect(path) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    (l, held)
}

#[test]
fn ports_at_a_listener_that_never_accepts_do_not_hang_the_switch() {
    let dir = Scratch::new("ctl-backlog");
    let sw = start_switch(&dir, &["b", "c"]);
    // Client mode: the frontend's socket never accepts.
    let _u = full_backlog(&sock(&dir, "u"));
    let t = Instant::now();
    sw.add_port(port_config(&dir, "u,client")).unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "port-add took {:?}", t.elapsed());
    // Server mode at a path where a live listener sits: refused at once.
    let _v = full_backlog(&sock(&dir, "v"));
    let t = Instant::now();
    let e = sw.add_port(port_config(&dir, "v")).unwrap_err().to_string();
    assert!(t.elapsed() < Duration::from_secs(2), "port-add took {:?}", t.elapsed());
    assert!(e.contains("in use"), "{e}");
    std::thread::sleep(Duration::from_millis(1200)); // a client retry or two
    liveness(&sw, &dir);
}

#[test]
fn port_paths_that_are_not_sockets_of_ours_are_refused_and_left_alone() {
    let dir = Scratch::new("ctl-paths");
    let control = dir.path("ctl.sock");
    init_log();
    let mut cfg = switch_config(&dir, &["b", "c"]);
    cfg.control = Some(control.clone());
    let sw = Switch::start(cfg).unwrap();
    let precious = dir.path("precious");
    std::fs::write(&precious, b"keep me").unwrap();
    let link = dir.path("link.sock");
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    for path in [&precious, &link] {
        let mut p = port_config(&dir, "x");
        p.socket = path.clone();
        let e = sw.add_port(p.clone()).unwrap_err().to_string();
        assert!(e.contains("is not a socket"), "{e}");
        // The same through the control socket, as `vswitch ctl port-add` sends it.
        let e = request(&control, &Request::PortAdd { port: Box::new(p) }).unwrap_err().to_string();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    }
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    // A socket file put in place of a port's own is not removed with the port.
    sw.add_port(port_config(&dir, "y")).unwrap();
    std::fs::remove_file(sock(&dir, "y")).unwrap();
    let squatter = std::os::unix::net::UnixListener::bind(sock(&dir, "y")).unwrap();
    sw.del_port("y").unwrap();
    assert!(sock(&dir, "y").exists(), "port-del removed a socket the switch did not create");
    drop(squatter);
    liveness(&sw, &dir);
}

#[test]
fn frontends_outside_the_allow_list_are_refused() {
    let dir = Scratch::new("ctl-peercred");
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let sw = start_switch(&dir, &["a,allow-uid=4242", &format!("b,allow-uid={me}"), "c"]);
    let e = Frontend::connect(&sock(&dir, "a"), FrontendConfig::default(), Duration::from_secs(2));
    assert!(e.is_err(), "uid {me} is not on port a's list");
    assert!(!port_info(&sw, "a").connected);
    liveness(&sw, &dir);
    // Client mode: the listener at the path runs as us, not as the allowed user.
    let l = std::os::unix::net::UnixListener::bind(sock(&dir, "u")).unwrap();
    l.set_nonblocking(true).unwrap();
    sw.add_port(port_config(&dir, "u,client,allow-uid=4242")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    if let Ok((mut s, _)) = l.accept() {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)), "closed, not served");
    }
    assert!(!port_info(&sw, "u").connected, "a squatter at the path is not served");
}

#[test]
fn socket_files_get_their_mode_whatever_the_umask() {
    let bin = vswitch_binary(None).expect("vswitch is built (scripts/test.sh builds it first)");
    let dir = Scratch::new("ctl-mode");
    let control = dir.path("ctl.sock");
    for (extra, want) in [("", 0o660), ("--socket-mode 600", 0o600)] {
        let _ = std::fs::remove_file(&control);
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "umask 000; exec {} run --port a={} --control {} {extra}",
            bin.display(),
            sock(&dir, "a").display(),
            control.display()
        ));
        let mut p = Proc::spawn(cmd, &dir.path("vswitch.log"));
        assert!(wait_until(Duration::from_secs(10), || control.exists()), "switch up: {}", p.log_text());
        let mode = |f: &std::path::Path| std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&control), 0o600, "control socket is owner-only");
        assert!(wait_until(Duration::from_secs(5), || sock(&dir, "a").exists()));
        assert_eq!(mode(&sock(&dir, "a")), want, "port socket mode with '{extra}'");
        p.stop(Duration::from_secs(5));
    }
}

/// Runs `f` on another thread; false if it did not finish within `within`.
fn finishes(within: Duration, f: impl FnOnce() + Send + 'static) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(within).is_ok()
}

#[test]
fn control_clients_cannot_hold_the_control_thread() {
    let dir = Scratch::new("ctl-clients");
    let control = dir.path("ctl.sock");
    init_log();
    let mut cfg = switch_config(&dir, &["a,max-macs=8192", "b", "c"]);
    cfg.control = Some(control.clone());
    let sw = std::sync::Arc::new(Switch::start(cfg).unwrap());
    // Thousands of source MACs, so that an FDB dump is far bigger than a socket buffer.
    let mut a = connect_default(&dir, "a");
    for i in 0..6000u32 {
        let src = [0x06, 0x77, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
        e2e_tests::send(&mut a, 0, &e2e_tests::frame_of_size(mac(0xb), src, None, 60, i as u64));
    }
    // (Not every one need stay: the table is 4-way set-associative under a hash keyed at
    // random, and a start whose key crowds five of these MACs into one bucket evicts one.)
    assert!(wait_until(Duration::from_secs(5), || sw.fdb().map(|f| f.len() >= 5900).unwrap_or(false)));

    // 1. Asks for the FDB and never reads it.
    let mut greedy = UnixStream::connect(&control).unwrap();
    greedy.write_all(b"{\"cmd\":\"fdb\"}\n").unwrap();
    // 2. Sends without end and no newline.
    let endless = std::thread::spawn({
        let control = control.clone();
        move || {
            let mut s = UnixStream::connect(&control).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            let chunk = vec![b'x'; 1 << 20];
            let mut sent = 0usize;
            while sent < 100 << 20 {
                match s.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(_) => break,
                }
            }
            sent
        }
    });
    // 3. 200 clients that connect and say nothing.
    let idle: Vec<UnixStream> = (0..200).map(|_| UnixStream::connect(&control).unwrap()).collect();

    let sw2 = sw.clone();
    assert!(finishes(Duration::from_secs(2), move || drop(sw2.ports().unwrap())), "API call blocked");
    let c2 = control.clone();
    assert!(
        finishes(Duration::from_secs(2), move || drop(request(&c2, &Request::Ports).unwrap())),
        "a control-socket request was not served within 2 s"
    );
    let sent = endless.join().unwrap();
    assert!(sent < 100 << 20, "the switch read {sent} bytes of a request without a newline");
    drop(idle);
    drop(greedy);
    liveness(&sw, &dir);
}

#[test]
fn a_guest_spraying_source_macs_learns_only_its_limit_and_others_stay_unicast() {
    let dir = Scratch::new("ctl-maclimit");
    let sw = start_switch(&dir, &["a,max-macs=100", "b", "c"]);
    let mut a = connect_default(&dir, "a");
    let mut b = connect_default(&dir, "b");
    let mut c = connect_default(&dir, "c");
    exchange(&mut b, &mut c, mac(0xb), mac(0xc), 10, 0);
    exchange(&mut c, &mut b, mac(0xc), mac(0xb), 10, 100);
    for i in 0..3000u32 {
        let src = [0x06, 0x77, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8];
        // To its own first MAC: dropped (no hairpin), so b and c see none of it.
        let dst = [0x06, 0x77, 0, 0, 0, 0];
        e2e_tests::send(&mut a, 0, &e2e_tests::frame_of_size(dst, src, None, 60, i as u64));
    }
    let macs = |sw: &Switch| port_info(sw, "a").macs;
    assert!(wait_until(Duration::from_secs(5), || macs(&sw).refused >= 2900), "{:?}", macs(&sw));
    let fdb = sw.fdb().unwrap();
    assert_eq!(fdb.iter().filter(|e| e.port == port_info(&sw, "a").id).count(), 100);
    // b and c were learned before and are still known: their unicast does not flood to a.
    e2e_tests::drain(&mut a, Duration::from_millis(50));
    exchange(&mut b, &mut c, mac(0xb), mac(0xc), 50, 1000);
    assert!(e2e_tests::drain(&mut a, Duration::from_millis(50)).is_empty(), "b -> c flooded to a");
}
