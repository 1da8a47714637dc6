//! Socket files: created with their mode and group before anyone can connect, replaced only
//! when they are a stale socket of ours, removed only while they are still the one we made;
//! connects that never block; who is at the other end (`SO_PEERCRED`).
//!
//! A path handed to the switch (a port's socket, the control socket) may come from a config
//! file or a control client. The switch therefore never deletes, follows or replaces anything
//! at it that is not a socket file it created (a previous run's included).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Who may reach a socket file: its permission bits and group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// Permission bits of the socket file (connecting needs write permission).
    pub mode: u32,
    /// Group of the socket file (None: the switch's own).
    pub gid: Option<u32>,
}

/// A socket file this process created, by identity: removed only if the path still names it.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device, inode and change time (ns): an inode number alone may be reused by a file
    /// made after ours was removed.
    id: (u64, u64, i64, i64),
}

fn identity(m: &std::fs::Metadata) -> (u64, u64, i64, i64) {
    (m.dev(), m.ino(), m.ctime(), m.ctime_nsec())
}

impl SocketFile {
    /// Removes the file if it is still the socket we created (not a file someone put there
    /// since).
    pub fn remove(&self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.file_type().is_socket() && identity(&m) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Why a socket file could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Something that is not a socket is at the path.
    #[error("{path} exists and is not a socket; the switch never replaces a file it did not create: remove it or choose another path")]
    NotASocket {
        /// The path.
        path: String,
    },
    /// A live listener is at the path.
    #[error("{path} is in use: another process listens on it")]
    InUse {
        /// The path.
        path: String,
    },
    /// A stale socket of another user.
    #[error("{path} is a stale socket owned by uid {uid}, not by this switch (uid {ours}); remove it yourself if it is no longer needed")]
    Foreign {
        /// The path.
        path: String,
        /// Its owner.
        uid: u32,
        /// Our uid.
        ours: u32,
    },
    /// A system call failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: String,
        /// Cause.
        source: io::Error,
    },
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= a.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a socket path must be 1-{} bytes without NUL", a.sun_path.len() - 1),
        ));
    }
    for (d, s) in a.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((a, len as libc::socklen_t))
}

fn stream_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the new fd is owned by the OwnedFd.
    let fd = unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Connects to the socket at `path` without ever waiting: a listener whose backlog is full
/// answers `WouldBlock` (try again later), where a blocking connect would wait for as long as
/// that listener likes. The stream is left non-blocking.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    let (addr, len) = sockaddr(path)?;
    let fd = stream_socket()?;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    let r = unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Makes the path free for a new socket: nothing there, or a stale socket of ours (nobody
/// listens; same owner) which is removed. Anything else is refused with the reason.
fn clear_stale(path: &Path) -> Result<(), SocketError> {
    let p = || path.display().to_string();
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(SocketError::Io { what: "inspect", path: p(), source }),
    };
    if !m.file_type().is_socket() {
        return Err(SocketError::NotASocket { path: p() });
    }
    match connect(path) {
        // Someone accepts, or would (a full backlog is a live listener too).
        Ok(_) => return Err(SocketError::InUse { path: p() }),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(SocketError::InUse { path: p() }),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {}
        Err(source) => return Err(SocketError::Io { what: "probe", path: p(), source }),
    }
    // SAFETY: geteuid has no preconditions.
    let ours = unsafe { libc::geteuid() };
    if m.uid() != ours {
        return Err(SocketError::Foreign { path: p(), uid: m.uid(), ours });
    }
    std::fs::remove_file(path).map_err(|source| SocketError::Io {
        what: "remove the stale socket",
        path: p(),
        source,
    })
}

/// Creates a listening socket file at `path` with `access` applied before it listens: until
/// `listen`, a connect to the new file is refused, so nobody connects under the umask's
/// permissions. The listener is non-blocking.
pub fn listen(path: &Path, access: Access) -> Result<(UnixListener, SocketFile), SocketError> {
    let p = || path.display().to_string();
    let io =
        |what: &'static str| move |source| SocketError::Io { what, path: path.display().to_string(), source };
    clear_stale(path)?;
    let (addr, len) = sockaddr(path).map_err(io("bind"))?;
    let fd = stream_socket().map_err(io("create a socket for"))?;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
        return Err(io("bind")(io::Error::last_os_error()));
    }
    if let Err(source) = apply_access(path, access) {
        let _ = std::fs::remove_file(path); // ours: bind just made it and nobody can connect
        return Err(SocketError::Io { what: "set the mode and group of", path: p(), source });
    }
    let m = std::fs::symlink_metadata(path).map_err(io("inspect"))?;
    let file = SocketFile { path: path.into(), id: identity(&m) };
    // SAFETY: plain syscall on our socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
        let e = io::Error::last_os_error();
        file.remove();
        return Err(io("listen on")(e));
    }
    Ok((UnixListener::from(fd), file))
}

fn apply_access(path: &Path, a: Access) -> io::Result<()> {
    if let Some(gid) = a.gid {
        std::os::unix::fs::lchown(path, None, Some(gid))?;
    }
    // The file was just made by bind (a socket, not a link): set_permissions is chmod on it.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(a.mode))
}

/// The uid, gid and pid of the process at the other end of a connected unix socket (for a
/// connection we made: the process that called `listen`).
pub fn peer(fd: RawFd) -> io::Result<libc::ucred> {
    let mut c = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `c`.
    let r =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut c).cast(), &mut len) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(c)
}

/// Whether a reply of a few hundred bytes can be sent on `fd` now without waiting: a unix
/// stream socket polls writable while less than a quarter of its send buffer is in use.
pub fn writable(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd; a zero timeout never waits.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLOUT != 0
}

/// Whether the peer of a connected socket has hung up (or the socket failed).
pub fn peer_closed(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd; a zero timeout never waits.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// A group name or number as a gid.
pub fn gid_of(group: &str) -> Option<u32> {
    if let Ok(n) = group.parse::<u32>() {
        return Some(n);
    }
    let name = std::ffi::CString::new(group).ok()?;
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: group is plain data; all-zero is valid.
    let mut g: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r writes into `g` and `buf` (of the given length) and sets `out`.
    let r = unsafe { libc::getgrnam_r(name.as_ptr(), &mut g, buf.as_mut_ptr(), buf.len(), &mut out) };
    (r == 0 && !out.is_null()).then_some(g.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vswitch-sockets-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn test_listen_applies_mode_whatever_the_umask() {
        let d = dir("mode");
        let p = d.join("s.sock");
        let (_l, f) = listen(&p, Access { mode: 0o640, gid: None }).unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o640);
        f.remove();
        assert!(!p.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn test_listen_never_replaces_a_file_it_did_not_make() {
        let d = dir("nofile");
        let p = d.join("precious");
        std::fs::write(&p, b"keep me").unwrap();
        let e = listen(&p, Access { mode: 0o600, gid: None }).unwrap_err();
        assert!(matches!(e, SocketError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
        let link = d.join("link.sock");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(matches!(
            listen(&link, Access { mode: 0o600, gid: None }),
            Err(SocketError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn test_listen_replaces_a_stale_socket_but_not_a_live_one() {
        let d = dir("stale");
        let p = d.join("s.sock");
        drop(UnixListener::bind(&p).unwrap()); // stale: file left, nobody listens
        let (l, f) = listen(&p, Access { mode: 0o600, gid: None }).unwrap();
        let e = listen(&p, Access { mode: 0o600, gid: None }).unwrap_err();
        assert!(matches!(e, SocketError::InUse { .. }), "{e}");
        drop(l);
        // A socket file put there by someone else since is left alone.
        std::fs::remove_file(&p).unwrap();
        let other = UnixListener::bind(&p).unwrap();
        f.remove();
        assert!(p.exists(), "removed a socket it did not create");
        drop(other);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn test_connect_to_a_full_backlog_does_not_wait() {
        let d = dir("backlog");
        let p = d.join("s.sock");
        let fd = stream_socket().unwrap();
        let (addr, len) = sockaddr(&p).unwrap();
        // SAFETY: valid address; plain syscalls on our socket.
        unsafe {
            assert_eq!(libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len), 0);
            assert_eq!(libc::listen(fd.as_raw_fd(), 0), 0);
        }
        let mut held = Vec::new();
        let t = std::time::Instant::now();
        let mut refused = false;
        for _ in 0..8 {
            match connect(&p) {
                Ok(s) => held.push(s),
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
                    refused = true;
                    break;
                }
            }
        }
        assert!(refused, "a listener that never accepts filled its backlog");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        let _ = std::fs::remove_dir_all(&d);
    }
}
