//! `vswitch ctl policy` against a running `vswitch` binary: show, change, refuse.

use std::process::Command;
use std::time::Duration;

use e2e_tests::{wait_until, Proc, Scratch};
use vswitch_bench::harness::peer::vswitch_binary;

fn ctl(bin: &std::path::Path, control: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin)
        .arg("ctl")
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .expect("run vswitch ctl");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn test_ctl_policy_shows_and_changes_a_running_switch() {
    let bin = vswitch_binary(None).expect("vswitch is built (scripts/test.sh builds it first)");
    let dir = Scratch::new("policy-cli");
    let control = dir.path("ctl.sock");
    let mut cmd = Command::new(&bin);
    cmd.arg("run")
        .arg("--port")
        .arg(format!("vm1={},police=50M", dir.path("vm1.sock").display()))
        .arg("--control")
        .arg(&control);
    let mut p = Proc::spawn(cmd, &dir.path("vswitch.log"));
    assert!(wait_until(Duration::from_secs(10), || control.exists()), "switch up: {}", p.log_text());

    let (ok, out) = ctl(&bin, &control, &["policy", "vm1"]);
    assert!(ok, "{out}");
    assert!(out.contains("ingress policer: rate 50Mbit") && out.contains("egress shaper:   off"), "{out}");

    let (ok, out) = ctl(
        &bin,
        &control,
        &[
            "policy",
            "vm1",
            "--shape",
            "1G",
            "--shape-queue",
            "64",
            "--allow-ip",
            "10.0.0.1",
            "--allow-ip",
            "fd00::/64",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("ingress policer: rate 50Mbit"), "kept what was not mentioned: {out}");
    assert!(out.contains("egress shaper:   rate 1Gbit queue 64"), "{out}");
    assert!(out.contains("ips 10.0.0.1,fd00::/64"), "{out}");

    let (ok, out) = ctl(&bin, &control, &["policy", "vm1", "--no-police", "--anti-spoof", "off"]);
    assert!(ok, "{out}");
    assert!(out.contains("ingress policer: off") && out.contains("anti-spoofing:   off"), "{out}");

    // Refusals say what is wrong; the policy in force stays.
    let (ok, out) = ctl(&bin, &control, &["policy", "vm1", "--shape", "1G", "--shape-burst", "100"]);
    assert!(!ok && out.contains("below 1518"), "{out}");
    let (ok, out) = ctl(&bin, &control, &["policy", "vm1", "--police", "ten"]);
    assert!(!ok && out.contains("number"), "{out}");
    let (ok, out) = ctl(&bin, &control, &["policy", "nosuch"]);
    assert!(!ok && out.contains("no port named 'nosuch'"), "{out}");
    let (_, out) = ctl(&bin, &control, &["policy", "vm1"]);
    assert!(out.contains("egress shaper:   rate 1Gbit"), "{out}");
    p.stop(Duration::from_secs(5));
}
