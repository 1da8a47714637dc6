//! The control socket's server: many clients at once, none of which can hold the control
//! thread. Every client socket is non-blocking and driven by the control loop's events: a
//! request is read up to its newline (at most [`MAX_REQUEST`] bytes, within [`REQUEST_TIMEOUT`]),
//! answered, and the reply written as the client takes it (within [`REPLY_TIMEOUT`]). A client
//! that sends too much, too slowly, or does not read is closed; the others never wait for it.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

use super::sockets::{self, SocketFile};
use crate::control::{Reply, Request};

/// Longest request line.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Time from connect to a whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Time to take the whole reply (an FDB dump can be megabytes).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients served at once; a newcomer beyond this closes the oldest.
pub const MAX_CLIENTS: usize = 64;
/// Tokens `CLIENT_BASE - slot` are clients' (ports use small tokens).
const CLIENT_BASE: usize = usize::MAX - 16;

struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    sent: usize,
    /// Until when the client may take for its current phase.
    deadline: Instant,
    accepted: Instant,
}

/// The listening control socket and its clients.
pub struct CtlServer {
    listener: UnixListener,
    file: SocketFile,
    clients: Vec<Option<Client>>,
}

/// What a client event produced: a request to answer for a slot.
pub type Pending = (usize, Result<Request, String>);

impl CtlServer {
    /// Serves `listener` (created by [`sockets::listen`], owner-only).
    pub fn new(listener: std::os::unix::net::UnixListener, file: SocketFile) -> Self {
        CtlServer {
            listener: UnixListener::from_std(listener),
            file,
            clients: (0..MAX_CLIENTS).map(|_| None).collect(),
        }
    }

    /// Registers the listener under `token`.
    pub fn register(&mut self, reg: &Registry, token: Token) -> std::io::Result<()> {
        reg.register(&mut self.listener, token, Interest::READABLE)
    }

    /// Whether `t` is one of the clients' tokens, and its slot.
    pub fn slot_of(t: Token) -> Option<usize> {
        let s = CLIENT_BASE.checked_sub(t.0)?;
        (t.0 <= CLIENT_BASE && s < MAX_CLIENTS).then_some(s)
    }

    /// Accepts every waiting client (from the switch's own uid or root only).
    pub fn accept(&mut self, reg: &Registry) {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    return;
                }
            };
            // SAFETY: geteuid has no preconditions.
            let ours = unsafe { libc::geteuid() };
            match sockets::peer(stream.as_raw_fd()) {
                Ok(c) if c.uid == 0 || c.uid == ours => {}
                Ok(c) => {
                    tracing::warn!("control socket: refusing uid {} (pid {}): only uid {ours} and root may control the switch", c.uid, c.pid);
                    continue;
                }
                Err(e) => {
                    tracing::warn!("control socket: cannot tell who connected: {e}");
                    continue;
                }
            }
            let slot = match self.clients.iter().position(Option::is_none) {
                Some(s) => s,
                None => {
                    // Full: the oldest client goes (idle connections cannot lock others out).
                    let oldest = (0..MAX_CLIENTS)
                        .min_by_key(|&s| self.clients[s].as_ref().map(|c| c.accepted))
                        .unwrap_or(0);
                    tracing::debug!("control socket: {MAX_CLIENTS} clients; closing the oldest");
                    self.close(reg, oldest);
                    oldest
                }
            };
            let token = Token(CLIENT_BASE - slot);
            if let Err(e) = reg.register(&mut stream, token, Interest::READABLE) {
                tracing::warn!("control socket: cannot watch a client: {e}");
                continue;
            }
            let now = Instant::now();
            self.clients[slot] = Some(Client {
                stream,
                input: Vec::new(),
                output: Vec::new(),
                sent: 0,
                deadline: now + REQUEST_TIMEOUT,
                accepted: now,
            });
            // A request already waiting is reported by the registration itself.
        }
    }

    /// Handles an event of client `slot`: returns its request once the whole line is in.
    pub fn event(&mut self, reg: &Registry, slot: usize) -> Option<Pending> {
        let c = self.clients.get_mut(slot)?.as_mut()?;
        if !c.output.is_empty() {
            self.flush(reg, slot);
            return None;
        }
        let mut chunk = [0u8; 4096];
        loop {
            match c.stream.read(&mut chunk) {
                Ok(0) => {
                    // End of input: a request without its newline still counts.
                    if c.input.is_empty() {
                        self.close(reg, slot);
                        return None;
                    }
                    break;
                }
                Ok(n) => {
                    c.input.extend_from_slice(&chunk[..n]);
                    if c.input.contains(&b'\n') || c.input.len() > MAX_REQUEST {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(reg, slot);
                    return None;
                }
            }
        }
        let line = match c.input.iter().position(|b| *b == b'\n') {
            Some(end) if end <= MAX_REQUEST => &c.input[..end],
            None if c.input.len() <= MAX_REQUEST => &c.input[..],
            _ => return Some((slot, Err(format!("request longer than {MAX_REQUEST} bytes")))),
        };
        let req = std::str::from_utf8(line)
            .map_err(|e| format!("bad request: {e}"))
            .and_then(|s| serde_json::from_str::<Request>(s).map_err(|e| format!("bad request: {e}")));
        Some((slot, req))
    }

    /// Queues `reply` for client `slot` and starts sending it.
    pub fn reply(&mut self, reg: &Registry, slot: usize, reply: &Reply) {
        let Some(c) = self.clients.get_mut(slot).and_then(Option::as_mut) else { return };
        let mut out = serde_json::to_vec(reply).unwrap_or_default();
        out.push(b'\n');
        c.output = out;
        c.input = Vec::new();
        c.deadline = Instant::now() + REPLY_TIMEOUT;
        let token = Token(CLIENT_BASE - slot);
        if reg.reregister(&mut c.stream, token, Interest::WRITABLE).is_err() {
            self.close(reg, slot);
            return;
        }
        self.flush(reg, slot);
    }

    /// Writes what the client takes; closes it once the reply is out.
    fn flush(&mut self, reg: &Registry, slot: usize) {
        let Some(c) = self.clients.get_mut(slot).and_then(Option::as_mut) else { return };
        while c.sent < c.output.len() {
            match c.stream.write(&c.output[c.sent..]) {
                Ok(n) => c.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        self.close(reg, slot);
    }

    fn close(&mut self, reg: &Registry, slot: usize) {
        if let Some(mut c) = self.clients.get_mut(slot).and_then(Option::take) {
            let _ = reg.deregister(&mut c.stream);
        }
    }

    /// Closes clients past their deadline; returns when the next one falls due.
    pub fn expire(&mut self, reg: &Registry, now: Instant) -> Option<Instant> {
        for s in 0..MAX_CLIENTS {
            if self.clients[s].as_ref().is_some_and(|c| c.deadline <= now) {
                tracing::debug!("control socket: closing a client that took too long");
                self.close(reg, s);
            }
        }
        self.clients.iter().flatten().map(|c| c.deadline).min()
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.clients.iter().flatten().count()
    }

    /// Closes everything and removes the socket file (if it is still ours).
    pub fn shutdown(&mut self, reg: &Registry) {
        for s in 0..MAX_CLIENTS {
            self.close(reg, s);
        }
        let _ = reg.deregister(&mut self.listener);
        self.file.remove();
    }
}
