//! What the control thread reports of ports and polling threads (`ctl ports`, `ctl stats`).

use super::Control;
use crate::control::{MacUsage, PmdReport, PortInfo, PortStats, QueueReport, Stats};
use crate::l2::{format_mac, mac_from_bytes, VlanMode};
use crate::virtio::queue::QueueCounters;

impl Control {
    pub(super) fn port_infos(&self) -> Vec<PortInfo> {
        let mut v: Vec<PortInfo> = self
            .ports
            .values()
            .map(|st| PortInfo {
                id: st.port.id,
                name: st.cfg.name.clone(),
                socket: match &st.uplink {
                    Some(u) => u.label(),
                    None => st.cfg.socket.display().to_string(),
                },
                mode: if st.uplink.is_some() {
                    "uplink"
                } else if st.cfg.client {
                    "client"
                } else {
                    "server"
                }
                .into(),
                vlan: match &st.port.vlan {
                    VlanMode::Access(n) => format!("access {n}"),
                    VlanMode::Trunk(None) => "trunk all".into(),
                    VlanMode::Trunk(Some(s)) => format!("trunk {:?}", s),
                },
                mac: format_mac(mac_from_bytes(st.port.mac)),
                queue_pairs: st.port.pairs(),
                // An uplink is "connected" while its device is there.
                connected: st.conn.is_some() || (st.uplink.is_some() && st.port.txq.iter().all(|s| s.live())),
                connects: st.connects,
                macs: {
                    let (learned, limit, refused) = self.fdb.port_usage(st.port.id);
                    MacUsage { learned, limit, refused }
                },
                device: st.device.lock().map(|d| d.info()).unwrap_or_default(),
            })
            .collect();
        v.sort_by_key(|p| p.id);
        v
    }

    pub(super) fn stats(&self) -> Stats {
        let mut ports: Vec<PortStats> = self
            .ports
            .values()
            .map(|st| {
                let (mut rx, mut tx) = (QueueCounters::default(), QueueCounters::default());
                let mut queues = Vec::new();
                for k in 0..st.port.pairs() as usize {
                    let r = st.port.rxq[k].stats.snapshot();
                    let t = st.port.txq[k].stats.snapshot();
                    tx += r;
                    rx += t;
                    queues.push(QueueReport { queue: 2 * k, counters: r });
                    queues.push(QueueReport { queue: 2 * k + 1, counters: t });
                }
                let policy = st.port.policy.stats.snapshot();
                PortStats { name: st.cfg.name.clone(), id: st.port.id, rx, tx, queues, policy }
            })
            .collect();
        ports.sort_by_key(|p| p.id);
        let names = self.ports.iter().map(|(id, st)| (*id, st.cfg.name.clone())).collect();
        let pmds = self
            .pmds
            .iter()
            .map(|p| {
                let queues = self.balance.report(p.idx, &names);
                let s = &p.stats;
                let ld = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                let (packets, busy) = (ld(&s.packets), ld(&s.busy_ticks));
                PmdReport {
                    pmd: p.idx,
                    core: p.core,
                    packets,
                    busy_ticks: busy,
                    idle_ticks: ld(&s.idle_ticks),
                    ticks_per_packet: if packets > 0 { busy as f64 / packets as f64 } else { 0.0 },
                    mean_burst: packets as f64 / ld(&s.busy_iterations).max(1) as f64,
                    sleeps: ld(&s.sleeps),
                    batch_holds: ld(&s.batch_holds),
                    batch_expired: ld(&s.batch_expired),
                    stalls: p.heartbeat.stalls(),
                    fd_interrupts: p.heartbeat.interrupts(),
                    load_pct: queues.iter().map(|q| q.load_pct).sum(),
                    queues,
                }
            })
            .collect();
        Stats { ports, pmds }
    }
}
