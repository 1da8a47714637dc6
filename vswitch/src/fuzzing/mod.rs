//! Fuzz harnesses for everything that takes bytes from a guest, a frontend or an operator.
//!
//! Each harness is one function over an input the fuzzer shapes (`arbitrary`) that panics when
//! an invariant breaks. The libFuzzer targets in `fuzz/` call the `fuzz(&[u8])` entry points;
//! the tests below run the same functions over proptest's byte vectors and over every file in
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/`, so `cargo test` on stable replays
//! every seed and every crash found so far.

pub mod burst;
pub mod chain;
pub mod config;
pub mod iotlb;
pub mod nic_wire;
pub mod offload;
pub mod packed;
pub mod spoof;
pub mod vhost_msgs;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// Runs `f` over every file of the target's seed corpus and regressions.
    fn replay(target: &str, f: fn(&[u8])) -> usize {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut n = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
            for e in entries.flatten() {
                let data = std::fs::read(e.path()).expect("corpus file");
                f(&data);
                n += 1;
            }
        }
        n
    }

    macro_rules! harness {
        ($name:ident, $replay:ident, $f:path, $cases:expr, $max:expr) => {
            proptest! {
                #![proptest_config(ProptestConfig { cases: $cases, ..ProptestConfig::default() })]
                #[test]
                fn $name(data in prop::collection::vec(any::<u8>(), 0..$max)) {
                    $f(&data);
                }
            }

            #[test]
            fn $replay() {
                replay(stringify!($name), $f);
            }
        };
    }

    harness!(burst, burst_corpus, super::burst::fuzz, 200, 4096);
    harness!(chain, chain_corpus, super::chain::fuzz, 300, 4096);
    harness!(config, config_corpus, super::config::fuzz, 500, 512);
    harness!(iotlb, iotlb_corpus, super::iotlb::fuzz, 500, 2048);
    harness!(offload, offload_corpus, super::offload::fuzz, 500, 1024);
    harness!(packed, packed_corpus, super::packed::fuzz, 500, 4096);
    harness!(nic_wire, nic_wire_corpus, super::nic_wire::fuzz, 300, 4096);
    harness!(spoof, spoof_corpus, super::spoof::fuzz, 500, 512);
    harness!(vhost_msgs, vhost_msgs_corpus, super::vhost_msgs::fuzz, 200, 2048);
}
