//! Anti-spoofing: `SpoofFilter::check` over every prefix of a frame.
//!
//! Invariants: no panic for any prefix; `NeedBytes(n)` asks for more than it was given; once a
//! prefix holds what the check needs (`PREFIX` bytes, or the whole frame), more bytes never
//! turn a refusal into a pass.

use arbitrary::{Arbitrary, Unstructured};

use crate::policy::spoof::{SpoofConfig, SpoofFilter, Verdict, MAX_LOOK, PREFIX};

/// Allowed addresses and one frame.
#[derive(Arbitrary, Debug)]
pub struct Input {
    port_mac: [u8; 6],
    macs: Vec<[u8; 6]>,
    ips: Option<Vec<(bool, [u8; 16], u8)>>,
    frame: Vec<u8>,
}

fn mac(b: [u8; 6]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":")
}

fn prefix(&(v6, a, len): &(bool, [u8; 16], u8)) -> String {
    if v6 {
        format!("{}/{}", std::net::Ipv6Addr::from(a), len % 130)
    } else {
        format!("{}/{}", std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]), len % 34)
    }
}

/// The libFuzzer entry point.
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(input);
    }
}

/// Checks every prefix of the frame; panics on a broken invariant.
pub fn run(input: Input) {
    let cfg = SpoofConfig {
        macs: input.macs.iter().take(4).map(|m| mac(*m)).collect(),
        ips: input.ips.as_ref().map(|v| v.iter().take(4).map(prefix).collect()),
    };
    let Ok(filter) = SpoofFilter::new(&cfg, input.port_mac) else { return };
    let f = &input.frame[..input.frame.len().min(2 * MAX_LOOK)];
    let mut dropped = None;
    for k in 0..=f.len() {
        let v = filter.check(&f[..k]);
        if let Verdict::NeedBytes(n) = v {
            assert!(n > k, "NeedBytes({n}) with {k} bytes given");
            assert!(n <= MAX_LOOK, "NeedBytes({n}) past MAX_LOOK");
        }
        if k >= PREFIX.min(f.len()) {
            match (dropped, v) {
                (Some(r), Verdict::Pass) => panic!("{k} bytes pass a frame {r:?} refused with fewer"),
                (None, Verdict::Drop(r)) => dropped = Some(r),
                _ => {}
            }
        }
    }
}
