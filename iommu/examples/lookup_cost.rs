//! Translation cost per lookup: the vhost-user IOTLB with 1, 64 and 4096 entries (the hint
//! hit, and scattered lookups that miss the hint), and the IO page table (cache hit and walk).
//!
//! `cargo run --release -p iommu --example lookup_cost`

use std::hint::black_box;
use std::time::Instant;

use iommu::{Access, IoPageTable, Iotlb, IotlbEntry, IotlbHint, Perm, TlbCache};

const N: u64 = 2_000_000;

fn per_lookup(f: impl FnMut(u64)) -> f64 {
    let mut f = f;
    let t = Instant::now();
    for i in 0..N {
        f(i);
    }
    t.elapsed().as_nanos() as f64 / N as f64
}

fn main() {
    println!("{:<34} {:>10}", "lookup", "ns/lookup");
    for n in [1u64, 64, 4096] {
        let mut t = Iotlb::default();
        for i in 0..n {
            t.update(
                IotlbEntry {
                    iova: i << 20,
                    size: 1 << 16,
                    uaddr: 0x7f00_0000_0000 + (i << 16),
                    perm: Perm::RW,
                },
                |u, _| Some(u),
            )
            .unwrap();
        }
        let mut h = IotlbHint::default();
        let same = per_lookup(|i| {
            black_box(t.lookup(black_box((i & 0xff) * 64), 64, Access::Read, &mut h)).ok();
        });
        let scattered = per_lookup(|i| {
            let e = (i.wrapping_mul(2654435761)) % n;
            black_box(t.lookup(black_box((e << 20) + 128), 64, Access::Read, &mut h)).ok();
        });
        // A ring's worth of buffers (256, each in its own entry when there are enough) visited
        // in order again and again.
        let ring = per_lookup(|i| {
            let e = (i % 256) % n;
            black_box(t.lookup(black_box((e << 20) + 128), 64, Access::Read, &mut h)).ok();
        });
        println!("{:<34} {:>10.1}", format!("iotlb, {n} entries, same entry"), same);
        println!("{:<34} {:>10.1}", format!("iotlb, {n} entries, 256-buffer ring"), ring);
        println!("{:<34} {:>10.1}", format!("iotlb, {n} entries, scattered"), scattered);
    }
    let mut pt = IoPageTable::new();
    for i in 0..4096u64 {
        pt.map(i << 21, i << 21, 1 << 21, Perm::RW).unwrap();
    }
    let mut c = TlbCache::default();
    let hit = per_lookup(|i| {
        black_box(pt.translate(black_box((i & 0xff) * 64), 64, Access::Read, &mut c)).ok();
    });
    let walk = per_lookup(|i| {
        let e = (i.wrapping_mul(2654435761)) % 4096;
        black_box(pt.translate(black_box(e << 21), 64, Access::Read, &mut c)).ok();
    });
    println!("{:<34} {:>10.1}", "page table, cache hit", hit);
    println!("{:<34} {:>10.1}", "page table, 4096 2M pages scattered", walk);
}
