//! The frontends' connections: accepting them (server ports) or connecting to them (client
//! ports), attaching one to its port's device, serving its messages within a budget, and
//! letting it go.

use super::*;

impl Control {
    pub(super) fn accept(&mut self, id: u16) {
        // A frontend that reconnects at once may be here before its old connection's hang-up
        // was handled: that one is gone, not active.
        let gone = self
            .ports
            .get(&id)
            .and_then(|st| st.conn.as_ref())
            .is_some_and(|(_, fd)| sockets::peer_closed(*fd));
        if gone {
            self.disconnect(id);
        }
        let Some(st) = self.ports.get_mut(&id) else { return };
        let Some((l, _)) = &st.listener else { return };
        loop {
            match l.accept() {
                Ok((s, _)) => {
                    if st.conn.is_some() {
                        tracing::warn!(port = %st.cfg.name, "refusing a second frontend connection while one is active");
                        continue;
                    }
                    if let Err(why) = st.cfg.peer_allowed(s.as_raw_fd()) {
                        tracing::warn!(port = %st.cfg.name, "refusing a frontend: {why}");
                        continue;
                    }
                    // SAFETY: into_raw_fd hands over sole ownership of the descriptor.
                    let s = unsafe { UnixStream::from_raw_fd(s.into_raw_fd()) };
                    self.attach(id, s);
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(port = %st.cfg.name, "accept failed: {e}");
                    return;
                }
            }
        }
    }

    pub(super) fn retry_clients(&mut self) {
        let now = Instant::now();
        let due: Vec<u16> = self
            .ports
            .values()
            .filter(|p| p.cfg.client && p.conn.is_none() && p.next_retry <= now)
            .map(|p| p.port.id)
            .collect();
        for id in due {
            let Some(st) = self.ports.get_mut(&id) else { continue };
            st.next_retry = now + RETRY;
            // Never waits: a frontend whose backlog is full is tried again next time.
            match sockets::connect(&st.cfg.socket) {
                Ok(s) => match st.cfg.peer_allowed(s.as_raw_fd()) {
                    Ok(()) => self.attach(id, s),
                    Err(why) => {
                        tracing::warn!(port = %st.cfg.name, "not serving the frontend at {}: {why}", st.cfg.socket.display())
                    }
                },
                Err(e) => tracing::debug!(port = %st.cfg.name, "frontend not reachable yet: {e}"),
            }
        }
    }

    pub(super) fn attach(&mut self, id: u16, s: UnixStream) {
        let Some(st) = self.ports.get_mut(&id) else { return };
        // Blocking for the vhost crate, which retries EAGAIN for ever; it is handed a message
        // only once the whole message is queued and there is room for its reply, so neither
        // its reads nor its sends wait (see `service_conn`).
        if s.set_nonblocking(false).is_err() || s.set_read_timeout(Some(MSG_TIMEOUT)).is_err() {
            return;
        }
        let fd = s.as_raw_fd();
        let handler = BackendReqHandler::from_stream(s, st.device.clone());
        // Writable too: a frontend that reads its replies at last lets the connection go on.
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self.poll.registry().register(&mut SourceFd(&fd), token_of(id, true), interest) {
            tracing::warn!(port = %st.cfg.name, "cannot watch connection: {e}");
            return;
        }
        st.conn = Some((handler, fd));
        st.partial_since = None;
        st.blocked_since = None;
        st.logged = 0;
        st.connects += 1;
        tracing::info!(port = %st.cfg.name, "frontend connected");
    }

    pub(super) fn disconnect(&mut self, id: u16) {
        let Some(st) = self.ports.get_mut(&id) else { return };
        st.partial_since = None;
        st.blocked_since = None;
        if let Some((_, fd)) = st.conn.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            // Stops every queue under its lock (bursts finish first); the mapping of the gone
            // guest's memory is released with the last queue.
            if let Ok(mut d) = st.device.lock() {
                d.reset();
            }
            self.fdb.flush_port(id);
            st.next_retry = Instant::now() + RETRY;
            // A guest that migrated away (or whose migration died with its frontend): the
            // port's next frontend is plugged as its configuration says.
            if let Some(b) = self.accel.get_mut(&id) {
                if let Some((_, held)) = b.migrating.take() {
                    b.held_off = held;
                }
            }
            tracing::info!(port = %st.cfg.name, "frontend disconnected");
        }
    }

    /// Handles the messages waiting on a port's connection, at most [`MSG_BUDGET`] of them
    /// before other connections get their turn (the rest wait in `ready`).
    pub(super) fn service_conn(&mut self, id: u16) {
        for _ in 0..MSG_BUDGET {
            let Some(st) = self.ports.get_mut(&id) else { return };
            let Some((_, fd)) = &st.conn else { return };
            let fd = *fd;
            // The vhost crate blocks (and retries EAGAIN forever) on a message that has not
            // fully arrived, and on a reply the socket has no room for; hand it only whole
            // messages with room for their reply, so one frontend cannot stall the control
            // thread. A message left incomplete, or unanswerable, too long closes the
            // connection.
            let waiting = waiting_message(fd);
            if matches!(waiting, Waiting::Nothing) {
                st.partial_since = None;
                return;
            }
            if matches!(waiting, Waiting::Partial) {
                st.partial_since.get_or_insert_with(Instant::now);
                return;
            }
            st.partial_since = None;
            if !sockets::writable(fd) {
                st.blocked_since.get_or_insert_with(Instant::now);
                return;
            }
            st.blocked_since = None;
            match waiting {
                Waiting::TooManyFds(n) => {
                    let n = if n == usize::MAX { "too many".to_string() } else { n.to_string() };
                    tracing::warn!(port = %st.cfg.name, "closing vhost-user connection: a message came with {n} file descriptors (most 32)");
                    self.disconnect(id);
                    return;
                }
                Waiting::Nothing | Waiting::Partial | Waiting::Whole | Waiting::Features(_) => {}
                Waiting::SendRarp => {
                    match send_rarp(fd, &st.device) {
                        Ok(Some(mac)) => self.announce(id, mac),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(port = %st.cfg.name, "closing vhost-user connection: {e}");
                            self.disconnect(id);
                            return;
                        }
                    }
                    continue;
                }
                w @ (Waiting::VringEnable | Waiting::IotlbMsg | Waiting::BackendReqFd | Waiting::LogFd) => {
                    let res = match w {
                        Waiting::VringEnable => vring_enable(fd, &st.device),
                        Waiting::IotlbMsg => iotlb_msg(fd, &st.device),
                        Waiting::LogFd => log_fd(fd, &st.device),
                        _ => backend_req_fd(fd, &st.device),
                    };
                    if let Err(e) = res {
                        tracing::warn!(port = %st.cfg.name, "closing vhost-user connection: {e}");
                        self.disconnect(id);
                        return;
                    }
                    continue;
                }
            }
            // Dirty logging starting: a plugged port steps aside before the frontend's reply.
            let features = match waiting {
                Waiting::Features(bits) => Some(bits & crate::virtio::features::VHOST_F_LOG_ALL != 0),
                _ => None,
            };
            if features == Some(true) {
                self.migration_starts(id);
            }
            let Some(st) = self.ports.get_mut(&id) else { return };
            let Some((h, _)) = &mut st.conn else { return };
            match h.handle_request() {
                Ok(()) => {}
                Err(e) if keeps_connection(&e) => {
                    // The message was read whole and refused (the frontend got a failure reply
                    // if it asked for one); the stream is still in step.
                    if let Ok(mut d) = st.device.lock() {
                        d.protocol_errors += 1;
                    }
                    st.logged = st.logged.saturating_add(1);
                    if st.logged <= LOG_BUDGET {
                        tracing::warn!(port = %st.cfg.name, "vhost-user request refused: {e}");
                    }
                    if st.logged == LOG_BUDGET {
                        tracing::warn!(port = %st.cfg.name, "further refusals on this connection are counted (protocol_errors), not logged");
                    }
                }
                Err(e) => {
                    if !matches!(e, VuError::Disconnected | VuError::PartialMessage) {
                        tracing::warn!(port = %st.cfg.name, "closing vhost-user connection: {e}");
                    }
                    self.disconnect(id);
                    return;
                }
            }
            if features.is_some() {
                // Logging stopped (a cancelled migration) or was refused: a port unplugged for
                // it goes back to its tier.
                self.migration_ends(id);
            }
        }
        // Budget spent: more may be waiting, and the edge-triggered poll will not say so again.
        if !self.ready.contains(&id) {
            self.ready.push_back(id);
        }
    }
}
