//! Operator views of the pinned maps (`mesh services`). They need no running agent.

use std::{io::Write, path::Path};

use serde::Serialize;

use crate::{
    datapath::{Maps, Snapshot},
    state::protocol_name,
};

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Serialize, Debug)]
pub struct ServicesView {
    pub services: Vec<ServiceView>,
}

#[derive(Serialize, Debug)]
pub struct ServiceView {
    pub name: String,
    pub id: u32,
    pub vip: String,
    pub protocol: &'static str,
    pub generation: u32,
    pub slot_count: u32,
    pub no_backend: u64,
    pub backends: Vec<BackendView>,
}

#[derive(Serialize, Debug)]
pub struct BackendView {
    pub id: u32,
    pub addr: String,
    /// Slots in the live round-robin set; 0 means it gets no new connections.
    pub slots: u32,
    pub connections: u64,
}

pub fn services_view(snap: &Snapshot) -> ServicesView {
    let services = snap
        .services
        .iter()
        .map(|(vip, svc)| {
            let live_slots: Vec<u32> = snap
                .slots
                .iter()
                .filter(|(k, _)| {
                    k.service_id == svc.id
                        && k.generation == svc.generation
                        && k.slot < svc.slot_count
                })
                .map(|(_, &backend)| backend)
                .collect();
            let backends = snap
                .backend_stats
                .iter()
                .filter(|(k, _)| k.service_id == svc.id)
                .map(|(k, stats)| BackendView {
                    id: k.backend_id,
                    addr: snap
                        .backends
                        .get(&k.backend_id)
                        .map_or_else(|| "?".to_string(), ToString::to_string),
                    slots: live_slots.iter().filter(|&&b| b == k.backend_id).count() as u32,
                    connections: stats.connections,
                })
                .collect();
            ServiceView {
                name: snap.names.get(&svc.id).cloned().unwrap_or_default(),
                id: svc.id,
                vip: vip.addr.to_string(),
                protocol: protocol_name(vip.proto),
                generation: svc.generation,
                slot_count: svc.slot_count,
                no_backend: snap.service_stats.get(&svc.id).map_or(0, |s| s.no_backend),
                backends,
            }
        })
        .collect();
    ServicesView { services }
}

pub fn services(bpffs: &Path, output: Output) -> anyhow::Result<()> {
    let view = services_view(&Maps::open_pinned(bpffs)?.snapshot()?);
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut out, &view)?;
            writeln!(out)?;
        }
        Output::Table => write_services_table(&mut out, &view)?,
    }
    Ok(())
}

fn write_services_table(out: &mut impl Write, view: &ServicesView) -> std::io::Result<()> {
    let mut rows = vec![[
        "SERVICE".to_string(),
        "VIP".to_string(),
        "PROTO".to_string(),
        "BACKEND".to_string(),
        "SLOTS".to_string(),
        "CONNECTIONS".to_string(),
    ]];
    for svc in &view.services {
        if svc.backends.is_empty() {
            rows.push([
                svc.name.clone(),
                svc.vip.clone(),
                svc.protocol.to_string(),
                "-".into(),
                "0".into(),
                format!("{} refused (no backend)", svc.no_backend),
            ]);
        }
        for (i, b) in svc.backends.iter().enumerate() {
            let (name, vip, proto) = if i == 0 {
                (svc.name.clone(), svc.vip.clone(), svc.protocol.to_string())
            } else {
                (String::new(), String::new(), String::new())
            };
            rows.push([
                name,
                vip,
                proto,
                b.addr.clone(),
                b.slots.to_string(),
                b.connections.to_string(),
            ]);
        }
    }
    write_table(out, &rows)
}

/// Left-aligned columns separated by two spaces.
pub fn write_table<const N: usize>(
    out: &mut impl Write,
    rows: &[[String; N]],
) -> std::io::Result<()> {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    Ok(())
}
