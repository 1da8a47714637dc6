//! Deadline enforcement for control-socket requests.
//!
//! The vhost crate retries socket reads and writes that fail with `EAGAIN`,
//! so `SO_RCVTIMEO`/`SO_SNDTIMEO` alone do not bound a request to a backend
//! that stops answering. The watchdog thread instead shuts the socket down
//! when an armed deadline passes, which makes the pending (and every later)
//! request fail at once.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    deadline: Option<Instant>,
    fired: bool,
    exit: bool,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Shuts a socket down when an armed deadline expires.
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// An armed deadline; disarms on drop.
pub(crate) struct Armed<'a>(&'a Watchdog);

impl Watchdog {
    /// Starts the watchdog thread for `sock` (a handle on the control socket).
    pub(crate) fn new(sock: UnixStream) -> std::io::Result<Watchdog> {
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), cv: Condvar::new() });
        let s = shared.clone();
        let thread =
            thread::Builder::new().name("vhost-user-watchdog".into()).spawn(move || run(&s, &sock))?;
        Ok(Watchdog { shared, thread: Some(thread) })
    }

    /// Arms a deadline `timeout` from now until the returned guard is dropped.
    pub(crate) fn arm(&self, timeout: Duration) -> Armed<'_> {
        self.shared.lock().deadline = Some(Instant::now() + timeout);
        self.shared.cv.notify_one();
        Armed(self)
    }

    /// Whether a deadline expired (the socket is shut down for good).
    pub(crate) fn fired(&self) -> bool {
        self.shared.lock().fired
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.0.shared.lock().deadline = None;
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.lock().exit = true;
        self.shared.cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, sock: &UnixStream) {
    let mut st = shared.lock();
    loop {
        if st.exit {
            return;
        }
        st = match st.deadline {
            None => shared.cv.wait(st).unwrap_or_else(|e| e.into_inner()),
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    tracing::warn!("vhost-user request timed out; shutting the control socket down");
                    let _ = sock.shutdown(Shutdown::Both);
                    st.fired = true;
                    st.deadline = None;
                    continue;
                }
                shared.cv.wait_timeout(st, d - now).unwrap_or_else(|e| e.into_inner()).0
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn fires_only_when_deadline_passes() {
        let (a, _b) = UnixStream::pair().unwrap();
        let wd = Watchdog::new(a.try_clone().unwrap()).unwrap();
        {
            let _g = wd.arm(Duration::from_secs(5));
        }
        thread::sleep(Duration::from_millis(20));
        assert!(!wd.fired());

        let t = Instant::now();
        let _g = wd.arm(Duration::from_millis(50));
        let mut buf = [0u8; 1];
        // Blocks until the watchdog shuts the socket down: EOF.
        assert_eq!((&a).read(&mut buf).unwrap(), 0);
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!(wd.fired());
    }
}
