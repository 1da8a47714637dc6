//! The kick, call and err files a frontend hands over must be eventfds.
//!
//! The polling threads wait on kicks and write calls; a pipe, a socket or a FUSE file there
//! could block them in ways no flag prevents. Only an eventfd has the behaviour they rely on
//! (an 8-byte counter; a write blocks only on a full counter, which the watchdog bounds).

use std::fs::File;
use std::os::fd::AsRawFd;

/// Why a vring file was refused.
#[derive(Debug, thiserror::Error)]
pub enum VringFdError {
    /// not an eventfd
    #[error("the {what} file of queue {index} is not an eventfd ({kind}): refused")]
    NotEventfd {
        /// "kick", "call" or "err".
        what: &'static str,
        /// Queue index.
        index: u8,
        /// What the file is, as /proc/self/fd names it.
        kind: String,
    },
    /// fcntl failed
    #[error("cannot make the {what} eventfd of queue {index} non-blocking: {source}")]
    Flags {
        /// "kick" or "call".
        what: &'static str,
        /// Queue index.
        index: u8,
        /// Cause.
        source: std::io::Error,
    },
}

/// Accepts `file` as the `what` file of queue `index` only if it is an eventfd, made
/// non-blocking when `nonblock` (a lazy frontend's blocking eventfd; the frontend can undo it,
/// which is why the writes are also watched).
pub fn vring_eventfd(
    file: File,
    what: &'static str,
    index: u8,
    nonblock: bool,
) -> Result<File, VringFdError> {
    let kind = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("unknown: {e}"));
    if kind != "anon_inode:[eventfd]" {
        return Err(VringFdError::NotEventfd { what, index, kind });
    }
    if nonblock {
        set_nonblocking(&file).map_err(|source| VringFdError::Flags { what, index, source })?;
    }
    Ok(file)
}

fn set_nonblocking(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn fd_file(fd: i32) -> File {
        assert!(fd >= 0);
        // SAFETY: a fresh fd, owned by the File from here on.
        unsafe { File::from_raw_fd(fd) }
    }

    #[test]
    fn test_eventfd_is_accepted_and_made_non_blocking() {
        // SAFETY: plain syscall.
        let f = vring_eventfd(fd_file(unsafe { libc::eventfd(0, 0) }), "call", 0, true).unwrap();
        // SAFETY: fcntl on an fd we own.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_ne!(flags & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn test_pipe_file_and_socket_are_refused() {
        let mut p = [0i32; 2];
        // SAFETY: p has room for two fds.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        let (r, w) = (fd_file(p[0]), fd_file(p[1]));
        let (s, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let file = File::open("/proc/self/status").unwrap();
        for f in [r, w, File::from(std::os::fd::OwnedFd::from(s)), file] {
            let e = vring_eventfd(f, "kick", 1, true).unwrap_err();
            assert!(matches!(e, VringFdError::NotEventfd { .. }), "{e}");
        }
    }
}
