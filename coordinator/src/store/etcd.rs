//! The etcd store: the coordinator's records in etcd (v3 API, etcd-client 0.21), laid out as in
//! [`super::keys`].
//!
//! Fencing: `connect` bumps `{root}/epoch` with a compare-and-swap on its mod revision and keeps
//! the new value. Every write is a transaction guarded by `epoch == ours`, so when a second
//! coordinator starts on the same etcd (a restart whose predecessor is not quite dead, or an
//! operator's mistake), the older one's writes fail with `StoreError::Fenced` instead of racing
//! the newer one's.
//!
//! Leases: presence keys (`{root}/presence/{worker}`) are attached to one lease per coordinator
//! process (TTL `PRESENCE_TTL`), renewed by a keep-alive task every third of the TTL. When the
//! coordinator dies they expire on their own; registrations themselves are durable.
//!
//! Invariant: every call has a timeout (`ConnectOptions::with_timeout`), and the keep-alive task
//! ends when the store is dropped.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp,
};
use proto::pb;
use tokio::task::JoinHandle;

use super::keys::Keys;
use super::{Snapshot, StateStore, StoreError};

/// TTL of the coordinator's presence lease (etcd's minimum is 2 s).
pub const PRESENCE_TTL: Duration = Duration::from_secs(6);

/// Limit on every etcd request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn etcd_err(op: impl Into<String>) -> impl FnOnce(etcd_client::Error) -> StoreError {
    let op = op.into();
    move |source| StoreError::Etcd { op, source }
}

/// See the module docs.
pub struct EtcdStore {
    client: Client,
    keys: Keys,
    epoch: u64,
    lease: i64,
    /// Renews `lease`; aborted on drop, after which the presence keys expire within the TTL.
    keep_alive: JoinHandle<()>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("root", &self.keys.root())
            .field("epoch", &self.epoch)
            .field("lease", &self.lease)
            .finish()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.keep_alive.abort();
    }
}

impl EtcdStore {
    /// Connects to `endpoints` (e.g. `["127.0.0.1:2379"]`), takes the next fencing epoch under
    /// `keys`, grants the presence lease and starts renewing it.
    pub async fn connect(endpoints: &[String], keys: Keys) -> Result<Self, StoreError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        let connect = Client::connect(endpoints, Some(opts));
        let client = tokio::time::timeout(REQUEST_TIMEOUT, connect)
            .await
            .map_err(|_| StoreError::Timeout {
                op: format!("connect to {}", endpoints.join(",")),
                secs: REQUEST_TIMEOUT.as_secs_f64(),
            })?
            .map_err(etcd_err(format!("connect to {}", endpoints.join(","))))?;
        let epoch = take_epoch(&client, &keys).await?;
        let mut c = client.clone();
        let ttl = PRESENCE_TTL.as_secs() as i64;
        let lease = c
            .lease_grant(ttl, None)
            .await
            .map_err(etcd_err("grant presence lease"))?
            .id();
        let keep_alive = tokio::spawn(renew(client.clone(), lease));
        tracing::info!(epoch, lease, root = keys.root(), "connected to etcd");
        Ok(Self {
            client,
            keys,
            epoch,
            lease,
            keep_alive,
        })
    }

    /// The fencing epoch this store writes under.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Runs `ops` only while the store's epoch is ours.
    async fn guarded(&self, what: &str, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        let epoch_key = self.keys.epoch();
        let txn = Txn::new()
            .when([Compare::value(
                epoch_key.clone(),
                CompareOp::Equal,
                self.epoch.to_string(),
            )])
            .and_then(ops)
            .or_else([TxnOp::get(epoch_key, None)]);
        let resp = self.client.clone().txn(txn).await.map_err(etcd_err(what))?;
        if resp.succeeded() {
            return Ok(());
        }
        let theirs = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => g
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_else(|| "(absent)".into());
        Err(StoreError::Fenced {
            ours: self.epoch,
            theirs,
        })
    }

    async fn put(
        &self,
        what: &str,
        key: String,
        value: Vec<u8>,
        opts: Option<PutOptions>,
    ) -> Result<(), StoreError> {
        self.guarded(what, vec![TxnOp::put(key, value, opts)]).await
    }

    async fn scan<M: prost_free::Decode>(
        &self,
        prefix: String,
    ) -> Result<Vec<(String, M)>, StoreError> {
        let resp = self
            .client
            .clone()
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd_err(format!("scan {prefix}")))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let msg = M::decode_record(kv.value()).map_err(|e| StoreError::Corrupt {
                    key: key.clone(),
                    detail: e.to_string(),
                })?;
                Ok((key, msg))
            })
            .collect()
    }
}

/// Decoding stored records without naming prost here (only `proto` depends on it).
mod prost_free {
    use proto::pb;

    /// A record type the store can decode.
    pub trait Decode: Sized {
        /// Decodes stored bytes.
        fn decode_record(bytes: &[u8]) -> Result<Self, proto::ConvertError>;
    }

    macro_rules! decodable {
        ($($t:ty => $what:literal),*) => {$(
            impl Decode for $t {
                fn decode_record(bytes: &[u8]) -> Result<Self, proto::ConvertError> {
                    proto::decode($what, bytes)
                }
            }
        )*};
    }

    decodable!(
        pb::StoredJob => "StoredJob",
        pb::StoredWorker => "StoredWorker",
        pb::Assignment => "Assignment",
        pb::JobEvent => "JobEvent"
    );
}

/// Increments the epoch with a compare-and-swap on its mod revision (create-if-absent the first
/// time), retrying when another coordinator bumped it in between.
async fn take_epoch(client: &Client, keys: &Keys) -> Result<u64, StoreError> {
    let key = keys.epoch();
    for _ in 0..16 {
        let mut c = client.clone();
        let resp = c
            .get(key.clone(), None)
            .await
            .map_err(etcd_err("read epoch"))?;
        let (current, compare) = match resp.kvs().first() {
            None => (
                0,
                Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            ),
            Some(kv) => {
                let text = String::from_utf8_lossy(kv.value()).into_owned();
                let n = text.parse::<u64>().map_err(|e| StoreError::Corrupt {
                    key: key.clone(),
                    detail: format!("epoch `{text}` is not a number: {e}"),
                })?;
                (
                    n,
                    Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision()),
                )
            }
        };
        let next = current + 1;
        let txn =
            Txn::new()
                .when([compare])
                .and_then([TxnOp::put(key.clone(), next.to_string(), None)]);
        if c.txn(txn)
            .await
            .map_err(etcd_err("bump epoch"))?
            .succeeded()
        {
            return Ok(next);
        }
    }
    Err(StoreError::Fenced {
        ours: 0,
        theirs: "epoch kept changing while this coordinator tried to take it".into(),
    })
}

/// Keeps the presence lease alive until aborted.
async fn renew(mut client: Client, lease: i64) {
    let period = PRESENCE_TTL / 3;
    loop {
        match client.lease_keep_alive(lease).await {
            Ok((mut keeper, mut stream)) => loop {
                if let Err(e) = keeper.keep_alive().await {
                    tracing::warn!(error = %e, "presence lease keep-alive failed");
                    break;
                }
                match tokio::time::timeout(REQUEST_TIMEOUT, stream.message()).await {
                    Ok(Ok(Some(_))) => {}
                    Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                        tracing::warn!("presence lease keep-alive stream ended");
                        break;
                    }
                }
                tokio::time::sleep(period).await;
            },
            Err(e) => tracing::warn!(error = %e, "cannot open presence lease keep-alive"),
        }
        tokio::time::sleep(period).await;
    }
}

impl StateStore for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn load(&self) -> Result<Snapshot, StoreError> {
        let jobs = self.scan::<pb::StoredJob>(self.keys.jobs()).await?;
        let workers = self.scan::<pb::StoredWorker>(self.keys.workers()).await?;
        let assignments = self.scan::<pb::Assignment>(self.keys.assignments()).await?;
        let events = self.scan::<pb::JobEvent>(self.keys.events()).await?;
        let prefix = self.keys.events();
        let mut by_job = std::collections::BTreeMap::<String, Vec<pb::JobEvent>>::new();
        for (key, event) in events {
            let job = key
                .strip_prefix(&prefix)
                .and_then(|rest| rest.rsplit_once('/'))
                .map(|(job, _)| job.to_owned())
                .ok_or_else(|| StoreError::Corrupt {
                    key: key.clone(),
                    detail: "event key is not {root}/events/{job}/{seq}".into(),
                })?;
            by_job.entry(job).or_default().push(event);
        }
        Ok(Snapshot {
            jobs: jobs.into_iter().map(|(_, j)| j).collect(),
            workers: workers.into_iter().map(|(_, w)| w).collect(),
            assignments: assignments.into_iter().map(|(_, a)| a).collect(),
            events: by_job,
        })
    }

    async fn put_job(&self, job: &pb::StoredJob) -> Result<(), StoreError> {
        let name = job
            .spec
            .as_ref()
            .map(|s| s.name.as_str())
            .unwrap_or_default();
        self.put("put job", self.keys.job(name), proto::encode(job), None)
            .await
    }

    async fn put_worker(&self, worker: &pb::StoredWorker) -> Result<(), StoreError> {
        self.put(
            "put worker",
            self.keys.worker(&worker.worker_id),
            proto::encode(worker),
            None,
        )
        .await
    }

    async fn put_assignment(&self, a: &pb::Assignment) -> Result<(), StoreError> {
        self.put(
            "put assignment",
            self.keys.assignment(&a.job, a.rank),
            proto::encode(a),
            None,
        )
        .await
    }

    async fn delete_assignments(&self, job: &str) -> Result<(), StoreError> {
        let op = TxnOp::delete(
            self.keys.job_assignments(job),
            Some(DeleteOptions::new().with_prefix()),
        );
        self.guarded("delete assignments", vec![op]).await
    }

    async fn append_event(&self, job: &str, event: &pb::JobEvent) -> Result<(), StoreError> {
        self.put(
            "append event",
            self.keys.event(job, event.seq),
            proto::encode(event),
            None,
        )
        .await
    }

    async fn set_presence(&self, worker: &str, present: bool) -> Result<(), StoreError> {
        let key = self.keys.presence(worker);
        if present {
            let opts = PutOptions::new().with_lease(self.lease);
            self.put("set presence", key, Vec::new(), Some(opts)).await
        } else {
            self.guarded("clear presence", vec![TxnOp::delete(key, None)])
                .await
        }
    }
}
