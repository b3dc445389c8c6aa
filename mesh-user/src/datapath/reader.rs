//! Reads of the maps that take long (the resync's full snapshot: about 100 ms at 10k services)
//! on a thread of their own, with handles of their own on the same maps (duplicated fds), so the
//! control loop keeps serving edits meanwhile. Also `Snapshot::replay`: a snapshot brought up to
//! date with the writes made while it was read.

use std::{
    sync::mpsc::{self, Receiver, Sender, TryRecvError},
    thread::JoinHandle,
};

use anyhow::Context as _;

use super::{MapOp, Maps, Snapshot};

type Job = Box<dyn FnOnce(&Maps) + Send>;

/// A thread that runs jobs against its own handles on the maps, one at a time, in order.
pub struct MapReader {
    jobs: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

/// The result of a submitted job, once it is done.
pub struct Pending<R>(Receiver<R>);

pub enum Poll<R> {
    Ready(R),
    NotYet,
    /// The job panicked or the reader is gone: no result will come.
    Lost,
}

impl<R> Pending<R> {
    /// A handle on results sent to `rx` (tests).
    #[cfg(test)]
    pub fn from_receiver(rx: Receiver<R>) -> Self {
        Self(rx)
    }

    pub fn poll(&self) -> Poll<R> {
        match self.0.try_recv() {
            Ok(result) => Poll::Ready(result),
            Err(TryRecvError::Empty) => Poll::NotYet,
            Err(TryRecvError::Disconnected) => Poll::Lost,
        }
    }
}

impl MapReader {
    /// Starts the thread on duplicates of `maps`' handles.
    pub fn start(maps: &Maps, name: &str) -> anyhow::Result<Self> {
        let own = maps.duplicate().context("duplicating the map handles")?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                for job in queue {
                    job(&own);
                }
            })
            .context("starting the map reader thread")?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Queues `job`; its result comes through the returned handle.
    pub fn submit<R: Send + 'static>(
        &self,
        job: impl FnOnce(&Maps) -> R + Send + 'static,
    ) -> Pending<R> {
        let (tx, rx) = mpsc::channel();
        if let Some(jobs) = &self.jobs {
            // A reader that is gone drops the job: `poll` then says `Lost`.
            let _ = jobs.send(Box::new(move |maps: &Maps| {
                let _ = tx.send(job(maps));
            }));
        }
        Pending(rx)
    }
}

impl Drop for MapReader {
    fn drop(&mut self) {
        // Closing the queue ends the thread after the job it runs.
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Snapshot {
    /// Applies `ops` as the maps did: a snapshot read while they were written, with every one
    /// of them replayed in order, holds what the maps hold after them (each op sets or deletes
    /// whole entries, so an op the read already saw changes nothing when replayed).
    pub fn replay(&mut self, ops: &[MapOp]) {
        for op in ops {
            match op {
                MapOp::PutBackend { id, addr } => {
                    self.backends.insert(*id, *addr);
                }
                MapOp::DeleteBackend { id } => {
                    self.backends.remove(id);
                }
                MapOp::CreateCounter(key) => {
                    self.backend_stats.entry(*key).or_default();
                }
                MapOp::DeleteCounter(key) => {
                    self.backend_stats.remove(key);
                    self.passive.remove(key);
                }
                MapOp::ResetService { service_id } => {
                    if let Some(stats) = self.service_stats.get_mut(service_id) {
                        *stats = Default::default();
                    }
                }
                MapOp::PutSlots {
                    service_id,
                    generation,
                    backends,
                } => {
                    for (slot, backend) in backends.iter().enumerate() {
                        let key = slot_key(*service_id, *generation, slot as u32);
                        self.slots.insert(key, backend.id);
                    }
                }
                MapOp::DeleteSlots {
                    service_id,
                    generation,
                    count,
                } => {
                    for slot in 0..*count {
                        self.slots.remove(&slot_key(*service_id, *generation, slot));
                    }
                }
                MapOp::PutSlot { key, backend } => {
                    self.slots.insert(*key, backend.id);
                }
                MapOp::DeleteSlot(key) => {
                    self.slots.remove(key);
                }
                MapOp::PutName { service_id, name } => {
                    self.names.insert(*service_id, name.clone());
                }
                MapOp::DeleteName { service_id } => {
                    self.names.remove(service_id);
                }
                MapOp::PutService { vip, service } => {
                    self.services.insert(*vip, *service);
                }
                MapOp::DeleteService { vip } => {
                    self.services.remove(vip);
                }
                MapOp::PutActive { key, slots } => {
                    self.active.insert(*key, *slots);
                }
                MapOp::DeleteActive(key) => {
                    self.active.remove(key);
                }
                MapOp::DeletePassive(key) => {
                    self.passive.remove(key);
                }
                MapOp::DeleteAffinity(key) => self.affinity.retain(|(k, _)| k != key),
            }
        }
    }
}

fn slot_key(service_id: u32, generation: u32, slot: u32) -> mesh_common::SlotKey {
    mesh_common::SlotKey {
        service_id,
        generation,
        slot,
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use mesh_common::{AffinityKey, BackendStatsKey, Service};

    use super::*;
    use crate::datapath::SlotBackend;

    fn pair(service_id: u32, backend_id: u32) -> BackendStatsKey {
        BackendStatsKey {
            service_id,
            backend_id,
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    /// What a snapshot taken before `ops` and replayed equals: the same ops on an empty one
    /// after the entries the read saw.
    #[test]
    fn replay_puts_and_deletes_whole_entries() {
        let mut snap = Snapshot::default();
        snap.backends.insert(1, addr(1));
        snap.backends.insert(2, addr(2));
        snap.backend_stats.insert(pair(7, 2), Default::default());
        snap.passive.insert(pair(7, 2), 3);
        snap.slots.insert(slot_key(7, 1, 0), 2);
        snap.slots.insert(slot_key(7, 1, 1), 2);
        snap.active.insert(pair(7, 2), 2);
        snap.affinity.push((
            AffinityKey {
                service_id: 7,
                ..Default::default()
            },
            2,
        ));
        let ops = [
            MapOp::PutBackend {
                id: 3,
                addr: addr(3),
            },
            MapOp::CreateCounter(pair(7, 3)),
            MapOp::PutSlots {
                service_id: 7,
                generation: 2,
                backends: [3, 1]
                    .map(|id| SlotBackend {
                        id,
                        addr: addr(id as u16),
                    })
                    .to_vec(),
            },
            MapOp::PutActive {
                key: pair(7, 3),
                slots: 1,
            },
            MapOp::DeleteActive(pair(7, 2)),
            MapOp::DeleteSlots {
                service_id: 7,
                generation: 1,
                count: 2,
            },
            MapOp::DeleteCounter(pair(7, 2)),
            MapOp::DeleteBackend { id: 2 },
            MapOp::DeleteAffinity(AffinityKey {
                service_id: 7,
                ..Default::default()
            }),
            MapOp::PutName {
                service_id: 7,
                name: "web".into(),
            },
        ];
        snap.replay(&ops);
        let once = format!("{snap:?}");
        // An op the read already saw changes nothing: replaying again is the same.
        snap.replay(&ops);
        assert_eq!(format!("{snap:?}"), once);

        assert_eq!(snap.backends.keys().copied().collect::<Vec<_>>(), [1, 3]);
        assert_eq!(
            snap.backend_stats.keys().copied().collect::<Vec<_>>(),
            [pair(7, 3)]
        );
        assert!(
            snap.passive.is_empty(),
            "DeleteCounter takes the passive state"
        );
        assert_eq!(
            snap.slots.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
            [(slot_key(7, 2, 0), 3), (slot_key(7, 2, 1), 1)]
        );
        assert_eq!(
            snap.active
                .iter()
                .map(|(k, v)| (*k, *v))
                .collect::<Vec<_>>(),
            [(pair(7, 3), 1)]
        );
        assert!(snap.affinity.is_empty());
        assert_eq!(snap.names.get(&7).map(String::as_str), Some("web"));
    }

    #[test]
    fn replay_follows_the_order_of_the_writes() {
        let vip = crate::model::Vip {
            addr: SocketAddr::from(([10, 96, 0, 1], 80)),
            proto: mesh_common::PROTO_TCP,
            external: false,
        };
        let service = Service {
            id: 4,
            ..Default::default()
        };
        let mut snap = Snapshot::default();
        snap.replay(&[
            MapOp::PutService { vip, service },
            MapOp::DeleteService { vip },
        ]);
        assert!(snap.services.is_empty());
        snap.replay(&[
            MapOp::DeleteService { vip },
            MapOp::PutService { vip, service },
        ]);
        assert_eq!(snap.services.get(&vip), Some(&service));
    }
}
