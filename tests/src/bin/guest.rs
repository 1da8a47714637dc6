//! A guest in its own process, so tests can SIGKILL it mid-traffic (and so the switch's file
//! descriptors are not mixed with the guest's in one process).
//!
//! `guest MODE SOCKET SRC DST [RATE]` connects a virtio-net frontend to the switch port
//! listening on SOCKET; MACs are `02:00:00:00:00:SRC` / `..:DST` (hex byte). Then, forever:
//!
//! * `send`: about RATE frames per millisecond (default 8) SRC -> DST, sequence numbers from
//!   0; receives whatever arrives.
//! * `echo`: sends every frame it receives back to the frame's source.
//! * `ping`: every 100 to 150 ms (varying, so pings do not fall into step with the switch's
//!   100 ms idle sleep) one frame SRC -> DST, then waits up to 1 s for a frame back.
//!
//! Prints `connected` once set up, then `sent=N received=M` every 100 ms (`send`, `echo`) or
//! `rtt_us=N` / `lost` per ping.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use vswitch_bench::frame::build_frame;
use vswitch_bench::frontend::{Frontend, FrontendConfig};

fn mac(arg: &str) -> [u8; 6] {
    let n = u8::from_str_radix(arg, 16).unwrap_or_else(|_| panic!("bad MAC byte {arg:?}"));
    [0x02, 0, 0, 0, 0, n]
}

fn say(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: guest send|echo|ping SOCKET SRC DST [RATE]");
        std::process::exit(2);
    }
    let (mode, src, dst) = (args[1].as_str(), mac(&args[3]), mac(&args[4]));
    let rate: u64 = args.get(5).map_or(8, |a| a.parse().expect("RATE is a number"));
    let mut fe = Frontend::connect(Path::new(&args[2]), FrontendConfig::default(), Duration::from_secs(10))
        .unwrap_or_else(|e| {
            eprintln!("guest: {e}");
            std::process::exit(1);
        });
    say("connected");
    let (mut sent, mut received) = (0u64, 0u64);
    let mut report = Instant::now();
    loop {
        match mode {
            "send" => {
                for _ in 0..rate {
                    if !fe.send(0, &build_frame(dst, src, None, 100, sent)) {
                        break;
                    }
                    sent += 1;
                }
                received += fe.poll_rx(0, |_| {}) as u64;
                std::thread::sleep(Duration::from_millis(1));
            }
            "echo" => {
                let mut got = fe.recv_frames(0, 1, Duration::from_millis(100));
                fe.poll_rx(0, |f| got.push(f.to_vec()));
                for mut f in got {
                    received += 1;
                    let (d, s) = f.split_at_mut(6);
                    d.swap_with_slice(&mut s[..6]);
                    sent += u64::from(fe.send(0, &f));
                }
            }
            "ping" => {
                std::thread::sleep(Duration::from_millis(100 + (sent * 37) % 50));
                let t = Instant::now();
                if fe.send(0, &build_frame(dst, src, None, 100, sent)) {
                    sent += 1;
                }
                match fe.recv_frames(0, 1, Duration::from_secs(1)).len() {
                    0 => say("lost"),
                    _ => say(&format!("rtt_us={}", t.elapsed().as_micros())),
                }
                continue;
            }
            _ => {
                eprintln!("unknown mode {mode}");
                std::process::exit(2);
            }
        }
        if report.elapsed() >= Duration::from_millis(100) {
            say(&format!("sent={sent} received={received}"));
            report = Instant::now();
        }
    }
}
