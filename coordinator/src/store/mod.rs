//! The coordinator's state store: one trait, two implementations.
//!
//! - [`MemStore`] (the default): keeps records in this process's memory. Everything is lost when
//!   the process exits: a restarted coordinator starts with no jobs and no workers, and workers
//!   that reconnect register as new.
//! - [`EtcdStore`]: keeps records in etcd under the layout of [`keys`]. A coordinator restarted on
//!   the same etcd loads every job, registration, assignment and event and resumes them.
//!
//! The core decides and the store only records: at runtime the coordinator writes (in the order
//! the core emitted its actions) and reads everything once, at start, through `load`.
//! Liveness (heartbeat times) is never stored, so heartbeats cost no store traffic.
//!
//! Invariant: a write either lands completely or returns an error; writers fenced by a newer
//! coordinator get `StoreError::Fenced` and never overwrite its records.

pub mod etcd;
pub mod keys;
pub mod mem;

use std::collections::BTreeMap;
use std::future::Future;

use proto::pb;

pub use etcd::EtcdStore;
pub use mem::MemStore;

/// Failures of a state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd could not be reached or refused a request.
    #[error("etcd {op}: {source}")]
    Etcd {
        /// What the store was doing.
        op: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },
    /// A stored record does not decode.
    #[error("stored record at `{key}` is corrupt: {detail}")]
    Corrupt {
        /// The key.
        key: String,
        /// The decoder's message.
        detail: String,
    },
    /// Another coordinator started on the same store and took over; this one must stop writing.
    #[error(
        "fenced: another coordinator took over the store (our epoch {ours}, store epoch {theirs})"
    )]
    Fenced {
        /// The epoch this coordinator holds.
        ours: u64,
        /// The epoch found in the store.
        theirs: String,
    },
    /// A store call did not finish in time.
    #[error("etcd {op} timed out after {secs:.1}s")]
    Timeout {
        /// What the store was doing.
        op: String,
        /// The limit.
        secs: f64,
    },
}

/// Everything a store holds, as read at start.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Every job.
    pub jobs: Vec<pb::StoredJob>,
    /// Every worker registration.
    pub workers: Vec<pb::StoredWorker>,
    /// The assignment of every held rank.
    pub assignments: Vec<pb::Assignment>,
    /// Events by job, oldest first.
    pub events: BTreeMap<String, Vec<pb::JobEvent>>,
}

/// Where the coordinator keeps what must outlive it. See the module docs.
pub trait StateStore: Send + Sync + 'static {
    /// A short name for logs ("memory", "etcd").
    fn kind(&self) -> &'static str;
    /// Reads everything (once, at start).
    fn load(&self) -> impl Future<Output = Result<Snapshot, StoreError>> + Send;
    /// Writes a job record.
    fn put_job(&self, job: &pb::StoredJob) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Writes a worker registration.
    fn put_worker(
        &self,
        worker: &pb::StoredWorker,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Writes the assignment of one rank.
    fn put_assignment(
        &self,
        assignment: &pb::Assignment,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Removes every assignment of a job.
    fn delete_assignments(&self, job: &str) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Appends one event to a job's log.
    fn append_event(
        &self,
        job: &str,
        event: &pb::JobEvent,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Marks whether a worker has an open session (tied to the coordinator's lease in etcd).
    fn set_presence(
        &self,
        worker: &str,
        present: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}
