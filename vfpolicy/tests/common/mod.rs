//! Helpers for the tests that compare with iproute2: a self-deleting netns
//! with a veth pair, and `strace` captures of the netlink bytes a command
//! sends. Every external command runs under `timeout`.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// Seconds any one external command may take.
pub const CMD_TIMEOUT: &str = "30";

/// Why the test cannot run here, if it cannot.
pub fn missing(tools: &[&str], need_root: bool) -> Option<String> {
    if need_root && !is_root() {
        return Some("not root (needs CAP_NET_ADMIN for netns and veth)".into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for tool in tools {
        if !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
            return Some(format!("`{tool}` is not on PATH"));
        }
    }
    None
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// Runs `args` under `timeout`, with `env` added.
pub fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new("timeout")
        .arg(CMD_TIMEOUT)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

/// A network namespace holding the veth pair `vfa`/`vfb`, deleted (with the
/// pair) when dropped, also when the test fails.
pub struct Netns {
    /// `ip netns` name.
    pub name: String,
}

impl Netns {
    /// Creates `vfp<pid><tag>` and the veth pair in it.
    pub fn new(tag: &str) -> Netns {
        let name = format!("vfp{}{tag}", std::process::id());
        let _ = run(&["ip", "netns", "del", &name], &[]);
        let out = run(&["ip", "netns", "add", &name], &[]);
        assert!(out.status.success(), "ip netns add: {}", text(&out.stderr));
        let ns = Netns { name };
        let out =
            run(&["ip", "-n", &ns.name, "link", "add", "vfa", "type", "veth", "peer", "name", "vfb"], &[]);
        assert!(out.status.success(), "veth: {}", text(&out.stderr));
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name], &[]);
    }
}

/// What one command sent to the kernel and printed.
pub struct Capture {
    /// Every netlink message it sent, in order.
    pub messages: Vec<Vec<u8>>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

/// Runs `args` under `strace -f -e write=all`, capturing every sendmsg and
/// sendto buffer in full.
pub fn strace(args: &[&str], env: &[(&str, &str)]) -> Capture {
    static N: AtomicU32 = AtomicU32::new(0);
    let file = temp_file(&format!("strace-{}", N.fetch_add(1, Ordering::Relaxed)));
    let file_s = file.to_string_lossy().into_owned();
    let mut full =
        vec!["strace", "-f", "-qq", "-e", "trace=sendmsg,sendto", "-e", "write=all", "-o", &file_s];
    full.extend_from_slice(args);
    let out = run(&full, env);
    let trace = std::fs::read_to_string(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    Capture { messages: parse_strace(&trace), stdout: text(&out.stdout), stderr: text(&out.stderr) }
}

fn temp_file(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vfpolicy-{}-{tag}.txt", std::process::id()))
}

/// The netlink messages in strace's `-e write=all` hex dumps: each syscall
/// line starts a buffer, each ` | OFFSET  HEX...  ASCII |` line adds bytes.
pub fn parse_strace(trace: &str) -> Vec<Vec<u8>> {
    let mut buffers: Vec<Vec<u8>> = Vec::new();
    for line in trace.lines() {
        if let Some(dump) = line.strip_prefix(" | ") {
            // "OFFSET  xx xx .. xx  xx .. xx  ascii |": hex sits in columns 7..55.
            let hex = dump.get(7..55).unwrap_or("");
            let last = buffers.last_mut().expect("hex dump before any syscall");
            last.extend(hex.split_whitespace().map(|b| u8::from_str_radix(b, 16).unwrap()));
        } else if !line.starts_with(" * ") {
            buffers.push(Vec::new());
        }
    }
    buffers.iter().flat_map(|b| split_netlink(b)).collect()
}

fn split_netlink(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while b.len() >= 16 {
        let len = u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize;
        let len = len.clamp(16, b.len());
        out.push(b[..len].to_vec());
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

/// The message with its `nlmsg_seq` zeroed, the one field that differs
/// between two runs.
pub fn mask_seq(m: &[u8]) -> Vec<u8> {
    let mut m = m.to_vec();
    if m.len() >= 12 {
        m[8..12].fill(0);
    }
    m
}

/// iproute2's `iplink_have_newlink` probe: an empty RTM_NEWLINK with seq 0.
pub fn is_newlink_probe(m: &[u8]) -> bool {
    m.len() == 32 && m[4..6] == 16u16.to_ne_bytes() && m[8..].iter().all(|&b| b == 0)
}

/// Hex, 16 bytes a line, for assertion messages.
pub fn hex_lines(msgs: &[Vec<u8>]) -> String {
    let mut s = String::new();
    for (i, m) in msgs.iter().enumerate() {
        s.push_str(&format!("message {i} ({} bytes):\n", m.len()));
        for chunk in m.chunks(16) {
            let h: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            s.push_str(&format!("  {}\n", h.join(" ")));
        }
    }
    s
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
