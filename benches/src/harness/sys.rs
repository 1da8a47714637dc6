//! Machine description and CPU accounting from `/proc`, CPU pinning and huge pages.
//!
//! CPU time is counted in clock ticks (`USER_HZ`) as the kernel reports it: the aggregate
//! `cpu` line of `/proc/stat` for the whole machine and `utime + stime` of `/proc/PID/stat`
//! for each measured process (every thread included). [`other_cpu_pct`] is the share of
//! all CPU time that went to *other* processes during a window, the measure used to flag a
//! run as disturbed ([`results::BUSY_PCT`](super::results::BUSY_PCT)).

use std::ffi::CStr;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use super::results::Machine;

/// Where DPDK and the harness expect hugetlbfs.
pub const HUGEPAGES_MOUNT: &str = "/dev/hugepages";

/// The 2 MiB huge page pool in sysfs.
const HUGEPAGES_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// Describes this machine: CPU model, online CPUs, kernel release, host name and the start
/// time (now). `versions` is left empty for the caller to fill in.
pub fn machine(tsc_hz: f64) -> Machine {
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| cpuinfo_model(&s))
        .unwrap_or_else(|| "unknown".to_string());
    // SAFETY: sysconf only reads a system parameter.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let (kernel, hostname) = uname().unwrap_or_else(|| ("unknown".to_string(), "unknown".to_string()));
    Machine {
        cpu_model,
        cpus: usize::try_from(online).unwrap_or(0).max(1),
        kernel,
        hostname,
        tsc_hz,
        started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        versions: Default::default(),
    }
}

/// The first `model name` of a /proc/cpuinfo text (x86), else its `Model`/`cpu model` line.
fn cpuinfo_model(cpuinfo: &str) -> Option<String> {
    ["model name", "Model", "cpu model"].iter().find_map(|key| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == *key && !v.trim().is_empty()).then(|| v.trim().to_string())
        })
    })
}

/// (`uname -r`, `uname -n`).
fn uname() -> Option<(String, String)> {
    // SAFETY: utsname is plain old data; all-zero is a valid value.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return None;
    }
    let field = |f: &[libc::c_char]| {
        // The kernel NUL-terminates every field; reinterpret c_char as u8 to find the end.
        let bytes: Vec<u8> = f.iter().map(|&c| c as u8).collect();
        CStr::from_bytes_until_nul(&bytes).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
    };
    Some((field(&u.release), field(&u.nodename)))
}

/// CPU time counters at one instant: the machine's and each measured process's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuSnapshot {
    /// Busy clock ticks of all CPUs: user + nice + system + irq + softirq + steal.
    pub busy: u64,
    /// All clock ticks of all CPUs: `busy` + idle + iowait.
    pub total: u64,
    /// `(pid, utime + stime)` of each measured process, in clock ticks (0 if it was gone).
    pub pids: Vec<(u32, u64)>,
}

/// Reads the machine's CPU counters and those of `pids` (whole processes, threads included).
/// A process that does not exist (any more) counts 0; an unreadable `/proc/stat` gives zeros,
/// which [`other_cpu_pct`] reports as 0 %.
pub fn cpu_snapshot(pids: &[u32]) -> CpuSnapshot {
    let (busy, total) =
        fs::read_to_string("/proc/stat").ok().and_then(|s| parse_proc_stat(&s)).unwrap_or((0, 0));
    let pids = pids
        .iter()
        .map(|&p| {
            let t = fs::read_to_string(format!("/proc/{p}/stat")).ok().and_then(|s| parse_pid_stat(&s));
            (p, t.unwrap_or(0))
        })
        .collect();
    CpuSnapshot { busy, total, pids }
}

/// (busy, total) clock ticks from the aggregate `cpu` line of a /proc/stat text.
fn parse_proc_stat(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    let f = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is already inside user/nice)
    let busy = f(0) + f(1) + f(2) + f(5) + f(6) + f(7);
    Some((busy, busy + f(3) + f(4)))
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line. The command name (field 2) is
/// in parentheses and may itself contain spaces and parentheses, so fields are counted from
/// the last `)`.
fn parse_pid_stat(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state(3) ppid(4) ... utime(14) stime(15).
    let mut it = rest.split_whitespace().skip(11);
    let utime: u64 = it.next()?.parse().ok()?;
    let stime: u64 = it.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second of /proc's CPU counters.
fn clk_tck() -> f64 {
    // SAFETY: sysconf only reads a system parameter.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Clock ticks the snapshots' processes used between `a` and `b` (a process missing from `a`
/// counts from 0; one that vanished before `b` contributes nothing).
fn pids_ticks(a: &CpuSnapshot, b: &CpuSnapshot) -> u64 {
    b.pids
        .iter()
        .map(|&(pid, t1)| {
            let t0 = a.pids.iter().find(|&&(p, _)| p == pid).map_or(0, |&(_, t)| t);
            t1.saturating_sub(t0)
        })
        .sum()
}

/// CPU seconds the processes of the snapshots used between `a` and `b`.
pub fn pids_cpu_seconds(a: &CpuSnapshot, b: &CpuSnapshot) -> f64 {
    pids_ticks(a, b) as f64 / clk_tck()
}

/// Share of all CPU time of all CPUs between `a` and `b` that went to processes other than
/// the snapshots' pids, in percent (≥ 0): (Δbusy − Δpids) / Δtotal × 100.
pub fn other_cpu_pct(a: &CpuSnapshot, b: &CpuSnapshot) -> f64 {
    let total = b.total.saturating_sub(a.total);
    if total == 0 {
        return 0.0;
    }
    let busy = b.busy.saturating_sub(a.busy) as f64;
    ((busy - pids_ticks(a, b) as f64) / total as f64 * 100.0).max(0.0)
}

/// A CPU set holding `cpu` only, or `None` if `cpu` is beyond what a `cpu_set_t` holds.
fn single_cpu_set(cpu: usize) -> Option<libc::cpu_set_t> {
    cpu_set(&[cpu])
}

/// The affinity mask of `cpus` (None if one is out of range or the list is empty).
fn cpu_set(cpus: &[usize]) -> Option<libc::cpu_set_t> {
    if cpus.is_empty() || cpus.iter().any(|&c| c >= libc::CPU_SETSIZE as usize) {
        return None;
    }
    // SAFETY: cpu_set_t is a plain bit mask; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `cpu` < CPU_SETSIZE was checked above, so the bit lies inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    Some(set)
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    let set = single_cpu_set(cpu).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("CPU {cpu} is out of range for an affinity mask"))
    })?;
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("cannot pin this thread to CPU {cpu}: {e}")));
    }
    Ok(())
}

/// Makes the child that `cmd` spawns start pinned to `cpus` (all its threads inherit the
/// mask). If the affinity cannot be set (e.g. a CPU is offline), spawning fails with that error.
pub fn pin_command(cmd: &mut Command, cpus: &[usize]) {
    let set = cpu_set(cpus);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // sched_setaffinity (a system call, async-signal-safe) on a mask built before the fork;
    // it neither allocates nor takes locks (io::Error::from_raw_os_error does not allocate).
    unsafe {
        cmd.pre_exec(move || {
            let Some(set) = set.as_ref() else {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            };
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Reads an unsigned number from a sysfs/procfs file.
fn read_u64(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether hugetlbfs is mounted at [`HUGEPAGES_MOUNT`].
fn hugetlbfs_mounted() -> bool {
    fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let mut f = l.split_whitespace();
                let (_dev, dir, fstype) = (f.next(), f.next(), f.next());
                dir == Some(HUGEPAGES_MOUNT) && fstype == Some("hugetlbfs")
            })
        })
        .unwrap_or(false)
}

/// A surprise while reserving huge pages or mounting hugetlbfs (the expected refusals, such as
/// not being root, are `Ok(false)` from [`hugepages`]).
#[derive(thiserror::Error, Debug)]
pub enum HugePagesError {
    /// cannot read {0}
    #[error("cannot read {0}")]
    Read(String),
    /// cannot reserve {want} huge pages in {path}: {source}
    #[error("cannot reserve {want} huge pages in {path}: {source}")]
    Reserve {
        /// Pages asked for in total.
        want: u64,
        /// The `nr_hugepages` file written.
        path: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// cannot create /dev/hugepages to mount hugetlbfs on: {0}
    #[error("cannot create {HUGEPAGES_MOUNT} to mount hugetlbfs on: {0}")]
    MountPoint(#[source] io::Error),
    /// cannot mount hugetlbfs on /dev/hugepages: {0}
    #[error("cannot mount hugetlbfs on {HUGEPAGES_MOUNT}: {0}")]
    Mount(#[source] io::Error),
}

/// Ensures at least `min_free_pages` free 2 MiB huge pages and hugetlbfs mounted at
/// [`HUGEPAGES_MOUNT`], reserving more pages and mounting as root when needed.
///
/// `Ok(false)` means huge pages cannot be had here (not root, no 2 MiB page support, not
/// enough memory, mounting not permitted) and the caller should use 4 KiB pages; pages
/// reserved by a failed attempt are given back. `Err` is kept for surprises (the kernel
/// rejecting a write as root, an unreadable pool).
pub fn hugepages(min_free_pages: u64) -> Result<bool, HugePagesError> {
    if !Path::new(HUGEPAGES_2M).is_dir() {
        return Ok(false);
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let free_path = format!("{HUGEPAGES_2M}/free_hugepages");
    let nr_path = format!("{HUGEPAGES_2M}/nr_hugepages");
    let free = read_u64(&free_path).ok_or_else(|| HugePagesError::Read(free_path.clone()))?;
    if free < min_free_pages {
        if !root {
            return Ok(false);
        }
        let nr = read_u64(&nr_path).ok_or_else(|| HugePagesError::Read(nr_path.clone()))?;
        let want = nr + (min_free_pages - free);
        match fs::write(&nr_path, format!("{want}\n")) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES | libc::EROFS)) => {
                return Ok(false)
            }
            Err(source) => return Err(HugePagesError::Reserve { want, path: nr_path, source }),
        }
        let now_free = read_u64(&free_path).unwrap_or(0);
        if now_free < min_free_pages {
            // Not enough contiguous memory: give back what was reserved for nothing.
            let _ = fs::write(&nr_path, format!("{nr}\n"));
            return Ok(false);
        }
    }
    if !hugetlbfs_mounted() {
        if !root {
            return Ok(false);
        }
        if let Err(e) = fs::create_dir_all(HUGEPAGES_MOUNT) {
            return Err(HugePagesError::MountPoint(e));
        }
        // SAFETY: all arguments are valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"nodev".as_ptr(),
                c"/dev/hugepages".as_ptr(),
                c"hugetlbfs".as_ptr(),
                0,
                c"pagesize=2M".as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
                return Ok(false);
            }
            return Err(HugePagesError::Mount(e));
        }
    }
    Ok(true)
}

/// DPDK's runtime directories for a file prefix (root's and, if set, the user's).
fn dpdk_runtime_dirs(prefix: &str) -> Vec<PathBuf> {
    let mut dirs = vec![Path::new("/var/run/dpdk").join(prefix)];
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        dirs.push(PathBuf::from(x).join("dpdk").join(prefix));
    }
    dirs
}

/// Removes what a DPDK process with `--file-prefix=PREFIX` leaves behind once it has exited:
/// `/dev/hugepages/PREFIXmap_*` (kept with `--single-file-segments`) and its runtime
/// directory `/var/run/dpdk/PREFIX`. Does nothing for an empty prefix or one containing `/`
/// or `..`. Best effort: errors are ignored.
pub fn cleanup_hugefiles(prefix: &str) {
    if prefix.is_empty() || prefix.contains('/') || prefix.contains("..") {
        return;
    }
    let stem = format!("{prefix}map_");
    if let Ok(entries) = fs::read_dir(HUGEPAGES_MOUNT) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&stem) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    for d in dpdk_runtime_dirs(prefix) {
        let _ = fs::remove_dir_all(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        // Burn a little CPU so our counters move.
        let a = cpu_snapshot(&[me]);
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(60) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let b = cpu_snapshot(&[me, u32::MAX]);
        assert!(a.total > 0 && a.busy > 0 && a.total >= a.busy, "{a:?}");
        assert!(b.total >= a.total);
        assert_eq!(b.pids.len(), 2);
        assert_eq!(b.pids[1], (u32::MAX, 0), "a missing pid counts 0");
        assert!(b.pids[0].1 >= a.pids[0].1);
        assert!(pids_cpu_seconds(&a, &b) >= 0.0);
        let pct = other_cpu_pct(&a, &b);
        assert!((0.0..=100.0).contains(&pct), "{pct}");
    }

    #[test]
    fn other_load_from_synthetic_snapshots() {
        let a = CpuSnapshot { busy: 1000, total: 5000, pids: vec![(1, 100), (2, 50)] };
        // 200 ticks of total, 120 busy of which our pids used 60 + 20.
        let b = CpuSnapshot { busy: 1120, total: 5200, pids: vec![(1, 160), (2, 70), (3, 5)] };
        assert_eq!(pids_ticks(&a, &b), 85, "pid 3 appeared and counts from 0");
        assert!((other_cpu_pct(&a, &b) - (120.0 - 85.0) / 200.0 * 100.0).abs() < 1e-9);
        // Our pids used more than the machine counted (sampling skew): clamped at 0.
        let c = CpuSnapshot { busy: 1010, total: 5200, pids: vec![(1, 200), (2, 50)] };
        assert_eq!(other_cpu_pct(&a, &c), 0.0);
        // A vanished pid (0 now) does not go negative.
        let d = CpuSnapshot { busy: 1100, total: 5100, pids: vec![(1, 0), (2, 50)] };
        assert!((other_cpu_pct(&a, &d) - 100.0).abs() < 1e-9);
        assert_eq!(other_cpu_pct(&a, &a), 0.0, "empty window");
        let secs = pids_cpu_seconds(&a, &b);
        assert!((secs - 85.0 / clk_tck()).abs() < 1e-12);
    }

    #[test]
    fn parses_pid_stat_with_odd_names() {
        let line = "4242 (a) (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 567 0 0 20 0 3 0 99 0 0";
        assert_eq!(parse_pid_stat(line), Some(1234 + 567));
        let plain = "9343 (cat) R 9339 9339 6548 0 -1 4194304 101 0 0 0 7 3 0 0 20 0 1 0 984048";
        assert_eq!(parse_pid_stat(plain), Some(10));
        assert_eq!(parse_pid_stat("12 (trunc) S 1 2"), None);
        assert_eq!(parse_pid_stat("no parens"), None);
    }

    #[test]
    fn parses_proc_stat_and_cpuinfo() {
        let s = "cpu  100 2 30 400 5 6 7 8 9 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n";
        assert_eq!(parse_proc_stat(s), Some((100 + 2 + 30 + 6 + 7 + 8, 153 + 400 + 5)));
        assert_eq!(parse_proc_stat("intr 1\n"), None);
        let ci = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon Processor\n";
        assert_eq!(cpuinfo_model(ci).as_deref(), Some("Intel Xeon Processor"));
        assert_eq!(cpuinfo_model("processor : 0\n"), None);
    }

    #[test]
    fn machine_description() {
        let m = machine(2.0e9);
        assert!(m.cpus >= 1);
        assert!(!m.kernel.is_empty() && m.kernel != "unknown");
        assert!(!m.hostname.is_empty());
        assert!(m.started_unix > 1_600_000_000);
        assert_eq!(m.tsc_hz, 2.0e9);
        assert!(m.versions.is_empty());
    }

    #[test]
    fn pinning() {
        // A child pinned to CPU 0 reports that affinity.
        let mut cmd = Command::new("grep");
        cmd.args(["Cpus_allowed_list", "/proc/self/status"]);
        pin_command(&mut cmd, &[0]);
        match cmd.output() {
            Ok(out) => {
                let s = String::from_utf8_lossy(&out.stdout);
                assert_eq!(s.split(':').nth(1).map(str::trim), Some("0"), "{s}");
            }
            Err(e) => panic!("spawning grep failed: {e}"),
        }
        let mut bad = Command::new("true");
        pin_command(&mut bad, &[1 << 20]);
        assert!(bad.status().is_err(), "an impossible CPU makes the spawn fail");
        // Pin a scratch thread (not the test thread, which other tests share).
        let r = std::thread::spawn(|| pin_current_thread(0)).join();
        assert!(matches!(r, Ok(Ok(()))));
        assert!(pin_current_thread(1 << 20).is_err());
    }

    #[test]
    fn cleanup_refuses_odd_prefixes() {
        // Must not touch anything (would otherwise remove /var/run/dpdk itself).
        cleanup_hugefiles("");
        cleanup_hugefiles("../x");
        cleanup_hugefiles("a/b");
        cleanup_hugefiles("vsb-test-nonexistent-prefix");
    }
}
