//! Where a session's socket comes from: connecting to a listening backend (client mode) or
//! accepting one on our own listener (server mode, QEMU's `server=on`). Every wait is bounded
//! and can be cancelled, and a server keeps its listener so the backend can come back.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How often a connect or accept is retried while waiting.
const RETRY: Duration = Duration::from_millis(10);

/// One end of a vhost-user socket that (re)opens connections.
#[derive(Debug)]
pub enum Endpoint {
    /// The backend listens on `path`; we connect.
    Client {
        /// The backend's socket.
        path: PathBuf,
    },
    /// We listen on `path`; the backend connects. The socket file is ours: it is removed
    /// when the endpoint is dropped.
    Server {
        /// Our socket.
        path: PathBuf,
        /// The listener, non-blocking.
        listener: UnixListener,
    },
}

impl Endpoint {
    /// A client endpoint for the backend listening on `path`.
    pub fn client(path: &Path) -> Endpoint {
        Endpoint::Client { path: path.to_owned() }
    }

    /// Listens on `path`, replacing a stale socket file there (never any other kind of file).
    pub fn listen(path: &Path) -> Result<Endpoint> {
        let sock_err = |source| Error::Socket { path: path.to_owned(), source };
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if md.file_type().is_socket() {
                std::fs::remove_file(path).map_err(sock_err)?;
            }
        }
        let listener = UnixListener::bind(path).map_err(sock_err)?;
        listener.set_nonblocking(true).map_err(sock_err)?;
        Ok(Endpoint::Server { path: path.to_owned(), listener })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        match self {
            Endpoint::Client { path } | Endpoint::Server { path, .. } => path,
        }
    }

    /// Whether we listen (server mode).
    pub fn is_server(&self) -> bool {
        matches!(self, Endpoint::Server { .. })
    }

    /// Connects (client) or accepts (server) within `wait`, retrying while the backend is
    /// not there yet, and giving up early once `stop` is set. The stream is blocking.
    pub fn open(&self, wait: Duration, stop: &AtomicBool) -> Result<UnixStream> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(s) = self.try_open()? {
                s.set_nonblocking(false).map_err(|source| self.sock_err(source))?;
                return Ok(s);
            }
            if stop.load(Ordering::Relaxed) {
                return Err(Error::Stopped { path: self.path().to_owned() });
            }
            if Instant::now() >= deadline {
                return Err(Error::ConnectTimeout {
                    path: self.path().to_owned(),
                    timeout_ms: wait.as_millis(),
                });
            }
            thread::sleep(RETRY);
        }
    }

    /// One attempt: `None` while the backend is not there.
    fn try_open(&self) -> Result<Option<UnixStream>> {
        let res = match self {
            Endpoint::Client { path } => UnixStream::connect(path),
            Endpoint::Server { listener, .. } => listener.accept().map(|(s, _)| s),
        };
        match res {
            Ok(s) => Ok(Some(s)),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(self.sock_err(e)),
        }
    }

    fn sock_err(&self, source: io::Error) -> Error {
        Error::Socket { path: self.path().to_owned(), source }
    }
}

/// Errors that mean "not there yet": no socket file, nobody listening, nobody connecting.
fn absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::Interrupted
    )
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Endpoint::Server { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("netfront-ep-{}-{name}.sock", std::process::id()))
    }

    #[test]
    fn client_times_out_when_nobody_listens() {
        let ep = Endpoint::client(&scratch("nobody"));
        let t = Instant::now();
        let err = ep.open(Duration::from_millis(50), &AtomicBool::new(false)).unwrap_err();
        assert!(matches!(err, Error::ConnectTimeout { timeout_ms: 50, .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_stop_cuts_the_wait_short() {
        let ep = Endpoint::client(&scratch("stopped"));
        let t = Instant::now();
        let err = ep.open(Duration::from_secs(30), &AtomicBool::new(true)).unwrap_err();
        assert!(matches!(err, Error::Stopped { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn server_accepts_again_and_removes_its_socket_on_drop() {
        let path = scratch("server");
        let ep = Endpoint::listen(&path).unwrap();
        assert!(ep.is_server());
        let never = AtomicBool::new(false);
        for _ in 0..2 {
            let c = Endpoint::client(&path).open(Duration::from_secs(5), &never).unwrap();
            let s = ep.open(Duration::from_secs(5), &never).unwrap();
            drop((c, s));
        }
        drop(ep);
        assert!(!path.exists());
    }

    #[test]
    fn listen_replaces_a_stale_socket_but_not_a_file() {
        let path = scratch("stale");
        drop(UnixListener::bind(&path).unwrap());
        let ep = Endpoint::listen(&path).unwrap();
        drop(ep);
        std::fs::write(&path, b"mine").unwrap();
        assert!(matches!(Endpoint::listen(&path), Err(Error::Socket { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"mine");
        std::fs::remove_file(&path).unwrap();
    }
}
