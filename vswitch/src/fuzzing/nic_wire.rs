//! Frames from the wire through a NIC model's receive side: the classifier (`Nic::steer_len`),
//! checksum verification, LRO and TSO (`nic_models`). The wire is as hostile as a guest.
//!
//! Invariants: no panic; every frame given to LRO comes back exactly once (counted in the
//! segments of what it gives back); a coalesced frame parses, its IP length covers exactly its
//! bytes and its checksums verify; a frame TSO cuts comes back as segments that parse, each no
//! longer than the MSS, whose payloads concatenate to the frame's.

use arbitrary::{Arbitrary, Unstructured};
use nic_models::engines::lro::{Lro, LroConfig};
use nic_models::engines::{csum, ip_end, layout, tso};
use nic_models::{Level, Nic, TableSizes};

use super::offload::Frame;

/// A model's bindings and a run of wire frames.
#[derive(Arbitrary, Debug)]
pub struct Input {
    guests: Vec<(u8, Option<u16>, [u8; 6])>,
    frames: Vec<(Frame, u16)>,
    mss: u16,
}

/// The libFuzzer entry point.
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(input);
    }
}

/// Runs one input; panics on a broken invariant.
pub fn run(input: Input) {
    let mut nic = Nic::new(Level::L1, TableSizes::I82576).expect("82576 tables");
    for (owner, vlan, mac) in input.guests.iter().take(10) {
        if nic.bind(u16::from(*owner), vlan.map(|v| v & 0xfff)).is_ok() {
            nic.set_macs(u16::from(*owner), &[*mac]);
        }
    }
    let mut lro = Lro::new(LroConfig { min_mss: 88, max_segs: 32, ..LroConfig::default() });
    let mut out = Vec::new();
    let mut given = 0u64;
    let mut seg = Vec::new();
    for (k, (frame, wire_len)) in input.frames.iter().take(40).enumerate() {
        let f = frame.bytes();
        let _ = nic.steer_len(&f, *wire_len as usize);
        let _ = nic.steer(&f);
        let _ = csum::verify(&f);
        lro.receive(&f, k as u64, &mut out);
        given += 1;
        if k % 8 == 7 {
            lro.flush_due(k as u64, &mut out);
        }
        // TSO over the same bytes.
        if let Some(l) = layout(&f).filter(|l| l.proto == nic_models::engines::TCP) {
            let payload = f[l.payload..ip_end(&f, &l)].to_vec();
            let mut got = Vec::new();
            // At most 64 segments: every segment takes the same path, and a frame of 9,000
            // payload bytes cut one byte at a time spent most of this harness's time on its
            // 9,000 checksums. A small MSS stays reachable for a small payload.
            let mss = input.mss.max(1).max(payload.len().div_ceil(64) as u16);
            if let Ok(n) = tso::segment(&f, mss, &mut seg, |s| {
                let sl = layout(s).expect("a segment parses");
                let p = &s[sl.payload..ip_end(s, &sl)];
                assert!(p.len() <= mss as usize, "segment longer than the MSS");
                got.extend_from_slice(p);
            }) {
                assert!(n >= 1);
                assert_eq!(got, payload, "segments carry the payload in order");
            }
        }
    }
    lro.flush_all(&mut out);
    let segs: u64 = out.iter().map(|o| u64::from(o.segs)).sum();
    assert_eq!(segs, given, "every frame comes back once");
    for o in out.iter().filter(|o| o.segs > 1) {
        let l = layout(&o.frame).expect("a coalesced frame parses");
        assert_eq!(ip_end(&o.frame, &l), o.frame.len(), "its IP length covers it exactly");
        let s = csum::verify(&o.frame);
        assert!(s.l4_checked && !s.l4_error && !s.ip_error, "its checksums verify");
    }
}
