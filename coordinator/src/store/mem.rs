//! The in-memory store: the default for a single machine and for local mode.
//!
//! It keeps the same records as etcd would, in maps behind a `std::sync::Mutex` (no `.await` while
//! held). Everything is lost when the process exits: a coordinator restarted with a `MemStore`
//! starts empty, so jobs are gone and reconnecting workers register as new workers
//! (`Registered.resumed = false`). Cloning shares the maps, which lets a test hand the same store to
//! a second coordinator in one process to model a restart that keeps memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use proto::pb;

use super::{Snapshot, StateStore, StoreError};

#[derive(Debug, Default)]
struct Maps {
    jobs: BTreeMap<String, pb::StoredJob>,
    workers: BTreeMap<String, pb::StoredWorker>,
    assignments: BTreeMap<(String, u32), pb::Assignment>,
    events: BTreeMap<String, Vec<pb::JobEvent>>,
    presence: BTreeSet<String>,
}

/// See the module docs.
#[derive(Clone, Debug, Default)]
pub struct MemStore {
    maps: Arc<Mutex<Maps>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        // A panic while holding the lock cannot leave the maps half-written (each write is one
        // insert), so a poisoned lock is still safe to use.
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Workers whose presence is set.
    pub fn present(&self) -> Vec<String> {
        self.lock().presence.iter().cloned().collect()
    }
}

impl StateStore for MemStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn load(&self) -> Result<Snapshot, StoreError> {
        let m = self.lock();
        Ok(Snapshot {
            jobs: m.jobs.values().cloned().collect(),
            workers: m.workers.values().cloned().collect(),
            assignments: m.assignments.values().cloned().collect(),
            events: m.events.clone(),
        })
    }

    async fn put_job(&self, job: &pb::StoredJob) -> Result<(), StoreError> {
        let name = job
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default();
        self.lock().jobs.insert(name, job.clone());
        Ok(())
    }

    async fn put_worker(&self, worker: &pb::StoredWorker) -> Result<(), StoreError> {
        self.lock()
            .workers
            .insert(worker.worker_id.clone(), worker.clone());
        Ok(())
    }

    async fn put_assignment(&self, a: &pb::Assignment) -> Result<(), StoreError> {
        self.lock()
            .assignments
            .insert((a.job.clone(), a.rank), a.clone());
        Ok(())
    }

    async fn delete_assignments(&self, job: &str) -> Result<(), StoreError> {
        self.lock().assignments.retain(|(j, _), _| j != job);
        Ok(())
    }

    async fn append_event(&self, job: &str, event: &pb::JobEvent) -> Result<(), StoreError> {
        self.lock()
            .events
            .entry(job.to_owned())
            .or_default()
            .push(event.clone());
        Ok(())
    }

    async fn set_presence(&self, worker: &str, present: bool) -> Result<(), StoreError> {
        let mut m = self.lock();
        if present {
            m.presence.insert(worker.to_owned());
        } else {
            m.presence.remove(worker);
        }
        Ok(())
    }
}
