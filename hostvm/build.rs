//! Builds the guest payload (`payload/main.rs`): `no_std` Rust for the host target,
//! statically linked at 1 MiB by `payload/link.ld`, then embedded in hostvm with
//! `include_bytes!`. One `rustc` call, no extra target needed: the payload runs in 64-bit
//! ring 3 like any user program, it just has no OS under it.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("payload.elf");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let src = dir.join("payload");
    for f in ["main.rs", "abi.rs", "link.ld"] {
        println!("cargo:rerun-if-changed={}", src.join(f).display());
    }
    let script = format!("link-arg=-Wl,-T,{}", src.join("link.ld").display());
    let status = Command::new(rustc)
        .args(["--edition", "2021", "--crate-type", "bin", "--crate-name", "hostvm_payload"])
        .args(["-C", "opt-level=2", "-C", "panic=abort", "-C", "debuginfo=0", "-C", "strip=symbols"])
        .args(["-C", "relocation-model=static", "-C", "link-arg=-nostdlib", "-C", "link-arg=-static"])
        .args(["-C", &script, "-C", "link-arg=-Wl,--build-id=none"])
        .arg(src.join("main.rs"))
        .arg("-o")
        .arg(&out)
        // The outer build's flags (coverage, sanitizers, target-cpu) are not for the payload.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .status()
        .expect("run rustc for the guest payload");
    assert!(status.success(), "building the guest payload (hostvm/payload/main.rs) failed");
}
