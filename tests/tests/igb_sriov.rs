//! `vswitch vf` against the real Linux igb driver: QEMU 10's emulated igb (an 82576 with
//! SR-IOV) in a TCG guest running Debian's generic kernel, the kit of
//! `tests/guest/igb-sriov.sh`. In the guest, iproute2 sets VF 0 and our tool VF 1 with the same
//! words; `ip -d link show` must read both back alike, the options igb refuses must fail with
//! iproute2's words, and the device's MAC/VLAN steering and VF-to-VF switching must work.
//! About 35 s once the kit is built (about 90 MB of downloads, cached in
//! `/var/tmp/vswitch-igbkit` or `$IGBKIT_DIR`).

use std::process::Command;

#[test]
fn vswitch_vf_sets_an_emulated_igbs_vfs_as_iproute2_does() {
    let tool = vswitch_bench::harness::peer::vswitch_binary(None)
        .expect("the vswitch binary (scripts/test.sh builds it: cargo build --profile test -p vswitch)");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/igb-sriov.sh");
    // The script bounds the QEMU run itself (300 s) and cleans it up.
    let out = Command::new(&script)
        .arg("--tool")
        .arg(&tool)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The record: every check and what igb does not enforce.
    for l in text.lines().filter(|l| l.starts_with("IGB-CHECK") || l.starts_with("IGB-INFO")) {
        println!("{l}");
    }
    assert!(out.status.success() && text.contains("IGB-RESULT: PASS"), "the igb run failed:\n{text}");
    for check in [
        "set-vf1-tool",
        "vf-lines-equal-ip-vs-tool",
        "tool-show",
        "unsupported-state-tool",
        "unsupported-query_rss-tool",
        "unsupported-min_tx_rate-tool",
        "ping-vf0-to-vf1",
        "ping-stops-vf1-port-vlan-200",
    ] {
        assert!(
            text.contains(&format!("IGB-CHECK: PASS name={check} ")),
            "check {check} did not pass:\n{text}"
        );
    }
}
