//! The connection's side of live migration: the dirty log a frontend hands over
//! (`SET_LOG_BASE`), whether it is in use (`VHOST_F_LOG_ALL` acked), and giving it to the
//! running queues, which mark what they write (see [`crate::vhost::dirty_log`]).

use std::fs::File;
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserLog, VhostUserProtocolFeatures};
use vhost::vhost_user::Result as VuResult;

use super::{refuse, VhostDevice};
use crate::vhost::dirty_log::DirtyLog;
use crate::virtio::features;

/// What `vswitch ctl ports` shows of a connection's dirty log.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DirtyLogInfo {
    /// Bytes of log (each bit one 4 KiB page of guest memory).
    pub bytes: u64,
    /// Whether the frontend acked VHOST_F_LOG_ALL: every write into the guest is marked.
    pub logging: bool,
    /// Marks of pages past the log's end, or of writes in no region (not set; the frontend
    /// sized its log too small).
    pub beyond: u64,
    /// SET_LOG_BASE messages taken on this connection (QEMU sends a new one when the guest's
    /// memory grows during a migration).
    pub bases: u64,
}

impl VhostDevice {
    /// Whether the frontend acked VHOST_F_LOG_ALL (it is migrating the guest).
    pub fn log_all_acked(&self) -> bool {
        self.acked.has(features::VHOST_F_LOG_ALL)
    }

    /// Whether the frontend acked the RARP protocol feature (it may send SEND_RARP).
    pub fn rarp_acked(&self) -> bool {
        self.protocol & VhostUserProtocolFeatures::RARP.bits() != 0
    }

    /// The dirty log every write into the guest goes to, while the frontend migrates it.
    pub fn logging(&self) -> Option<&Arc<DirtyLog>> {
        self.log.as_ref().filter(|_| self.acked.has(features::VHOST_F_LOG_ALL))
    }

    /// Gives every running virtio queue of the port the current log (or none): under each
    /// queue's lock, so once this returns every write of a burst is marked. Queues plugged
    /// into a device are not logged: the control thread unplugs them before logging starts.
    pub fn apply_log(&self) {
        let log = self.logging().cloned();
        for i in 0..self.vrings.len() {
            if let Some(slot) = self.port.slot(i) {
                if let Some(q) = slot.lock().virtio_mut() {
                    q.log = log.clone();
                }
            }
        }
    }

    /// What `ctl ports` shows of the log.
    pub(super) fn log_info(&self) -> Option<DirtyLogInfo> {
        self.log.as_ref().map(|l| DirtyLogInfo {
            bytes: l.len(),
            logging: self.acked.has(features::VHOST_F_LOG_ALL),
            beyond: l.beyond(),
            bases: self.log_bases,
        })
    }

    /// A SET_FEATURES acking `bits` may ack VHOST_F_LOG_ALL only with a log to mark.
    pub(super) fn check_log_all(&self, bits: u64) -> VuResult<()> {
        if bits & features::VHOST_F_LOG_ALL != 0 && self.log.is_none() {
            return Err(refuse(match &self.log_refused {
                Some(why) => format!("VHOST_F_LOG_ALL refused: the dirty log was refused ({why})"),
                None => "VHOST_F_LOG_ALL without a dirty log: send SET_LOG_BASE with the log's memfd \
                         (protocol feature LOG_SHMFD) first"
                    .into(),
            }));
        }
        Ok(())
    }

    /// SET_LOG_BASE: maps the log (checked like guest memory) and, while logging, gives it to
    /// the queues.
    pub(super) fn take_log_base(&mut self, log: &VhostUserLog, file: &File) -> VuResult<()> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        tracing::debug!(port = %self.port.name, "SET_LOG_BASE {size} bytes at offset {offset}");
        // The vhost crate sends no reply for a refusal here and QEMU waits for one: the
        // refusal is kept, the frontend gets its reply, and the SET_FEATURES acking
        // VHOST_F_LOG_ALL that follows is refused with the reason (QEMU then fails the
        // migration, with the guest still running here).
        let mapped = match DirtyLog::map(file, size, offset) {
            Ok(m) => m,
            Err(e) => {
                self.protocol_errors += 1;
                tracing::warn!(port = %self.port.name, "dirty log refused: {e}");
                self.log = None;
                self.log_refused = Some(e.to_string());
                self.apply_log();
                return Ok(());
            }
        };
        self.log_refused = None;
        // Marks made in the old log until the queues switch are still seen: QEMU reads the
        // old log once more before it frees it.
        self.log = Some(Arc::new(mapped));
        self.log_bases += 1;
        if self.logging().is_some() {
            self.apply_log();
        }
        Ok(())
    }
}
