//! What the polling [`Frontend`](crate::Frontend) asks of a backend: protocol features,
//! queue pairs, virtio-net features and the MAC, chosen from its [`FrontendConfig`] and sent
//! through the [`Session`].

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::config::FrontendConfig;
use crate::error::{Error, Result};
use crate::features::{
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_ANY_LAYOUT, VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::session::Session;

/// Outcome of the negotiation.
pub(crate) struct Negotiated {
    /// Acked virtio features (including `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub features: u64,
    /// Acked protocol features (0 without `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub protocol: VhostUserProtocolFeatures,
    /// Device MAC from the config space, when available.
    pub mac: Option<[u8; 6]>,
}

impl Negotiated {
    /// Whether `f` was acked.
    pub fn has(&self, f: u64) -> bool {
        self.features & f != 0
    }

    /// virtio-net header length: 12 bytes with VERSION_1 or MRG_RXBUF, else 10.
    pub fn hdr_len(&self) -> usize {
        if self.has(VIRTIO_F_VERSION_1) || self.has(VIRTIO_NET_F_MRG_RXBUF) {
            12
        } else {
            10
        }
    }
}

/// The protocol features `cfg` needs the backend to ack.
pub(crate) fn wanted_protocol(cfg: &FrontendConfig) -> VhostUserProtocolFeatures {
    let mut want = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::RARP;
    if cfg.mem_slots {
        want |= VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
    }
    if cfg.iommu.is_some() {
        want |= VhostUserProtocolFeatures::BACKEND_REQ;
    }
    want
}

/// After the session's handshake: checks the queue count, acks features and reads the MAC.
pub(crate) fn negotiate(s: &mut Session, cfg: &FrontendConfig) -> Result<Negotiated> {
    let protocol = s.protocol_features();
    check_queue_pairs(s, cfg)?;
    let offered = s.offered_features();
    let mut want = VIRTIO_NET_F_MAC | VIRTIO_F_ANY_LAYOUT | VHOST_USER_F_PROTOCOL_FEATURES;
    for (on, bit) in [
        (cfg.version_1, VIRTIO_F_VERSION_1),
        (cfg.mrg_rxbuf, VIRTIO_NET_F_MRG_RXBUF),
        (cfg.event_idx, VIRTIO_RING_F_EVENT_IDX),
        (cfg.indirect, VIRTIO_RING_F_INDIRECT_DESC),
        (cfg.guest_offloads, VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6),
        (cfg.host_offloads, VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6),
    ] {
        if on {
            want |= bit;
        }
    }
    if cfg.iommu.is_some() {
        if offered & VIRTIO_F_ACCESS_PLATFORM == 0
            || !protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ)
        {
            return Err(Error::Unsupported("a vIOMMU (ACCESS_PLATFORM with BACKEND_REQ)".into()));
        }
        want |= VIRTIO_F_ACCESS_PLATFORM;
    }
    if cfg.queue_pairs > 1 {
        want |= VIRTIO_NET_F_MQ;
        if offered & VIRTIO_NET_F_MQ == 0 {
            return Err(Error::Unsupported("VIRTIO_NET_F_MQ".into()));
        }
    }
    s.set_features(offered & want)?;
    let mut neg = Negotiated { features: s.features(), protocol, mac: None };
    if protocol.contains(VhostUserProtocolFeatures::CONFIG) && neg.has(VIRTIO_NET_F_MAC) {
        neg.mac = read_mac(s);
    }
    Ok(neg)
}

/// More than one queue pair needs the MQ protocol feature and a GET_QUEUE_NUM that allows it.
fn check_queue_pairs(s: &mut Session, cfg: &FrontendConfig) -> Result<()> {
    if !s.protocol_features().contains(VhostUserProtocolFeatures::MQ) {
        if cfg.queue_pairs > 1 {
            return Err(Error::Unsupported(format!(
                "{} queue pairs (no MQ protocol feature)",
                cfg.queue_pairs
            )));
        }
        return Ok(());
    }
    let max = s.queue_num()?;
    tracing::debug!("backend GET_QUEUE_NUM = {max}");
    if max < u64::from(cfg.queue_pairs) {
        return Err(Error::Unsupported(format!("{} queue pairs (GET_QUEUE_NUM = {max})", cfg.queue_pairs)));
    }
    Ok(())
}

/// The MAC from the config space; a failed or short read is logged, not fatal.
fn read_mac(s: &mut Session) -> Option<[u8; 6]> {
    match s.get_config(0, 6) {
        Ok(payload) if payload.len() == 6 => {
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&payload);
            Some(mac)
        }
        Ok(_) => {
            tracing::warn!("GET_CONFIG returned a short payload");
            None
        }
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    }
}
