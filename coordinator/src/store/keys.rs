//! The whole key layout of the coordinator's state store, in one place (docs/store-layout.md
//! explains it for operators).
//!
//! Every key lives under a root prefix (default `/moetrain/v1`, so several installations can share
//! one etcd). Values are protobuf records from `proto/moetrain/v1/store.proto` and `types.proto`.
//!
//! | key                                   | value             | lifetime                         |
//! |---------------------------------------|-------------------|----------------------------------|
//! | `{root}/epoch`                        | decimal u64       | durable; fencing token           |
//! | `{root}/jobs/{job}`                   | `StoredJob`       | durable                          |
//! | `{root}/workers/{worker}`             | `StoredWorker`    | durable (registration)           |
//! | `{root}/presence/{worker}`            | empty             | lease of the coordinator session |
//! | `{root}/assignments/{job}/{rank:06}`  | `Assignment`      | until the job ends               |
//! | `{root}/events/{job}/{seq:010}`       | `JobEvent`        | durable                          |
//!
//! Invariant: numbers in keys are zero-padded so that a prefix scan returns them in order; job
//! names never contain `/` (checked by `check_name`), so `{job}/` prefixes never overlap. Worker ids
//! may contain `/` and `:` (e.g. `node0/0`): they only ever end a key.

/// The default root prefix.
pub const DEFAULT_ROOT: &str = "/moetrain/v1";

/// Builds keys under one root prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new(DEFAULT_ROOT)
    }
}

impl Keys {
    /// Keys under `root` (a trailing `/` is removed).
    pub fn new(root: &str) -> Self {
        Self {
            root: root.trim_end_matches('/').to_owned(),
        }
    }

    /// The root prefix.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The fencing epoch; every write compares it with the writer's epoch.
    pub fn epoch(&self) -> String {
        format!("{}/epoch", self.root)
    }

    /// Prefix of all jobs.
    pub fn jobs(&self) -> String {
        format!("{}/jobs/", self.root)
    }

    /// One job.
    pub fn job(&self, job: &str) -> String {
        format!("{}{job}", self.jobs())
    }

    /// Prefix of all workers.
    pub fn workers(&self) -> String {
        format!("{}/workers/", self.root)
    }

    /// One worker's registration.
    pub fn worker(&self, worker: &str) -> String {
        format!("{}{worker}", self.workers())
    }

    /// Prefix of presence keys.
    pub fn presences(&self) -> String {
        format!("{}/presence/", self.root)
    }

    /// A worker's presence key (exists while its session is open and the coordinator lives).
    pub fn presence(&self, worker: &str) -> String {
        format!("{}{worker}", self.presences())
    }

    /// Prefix of all assignments.
    pub fn assignments(&self) -> String {
        format!("{}/assignments/", self.root)
    }

    /// Prefix of one job's assignments.
    pub fn job_assignments(&self, job: &str) -> String {
        format!("{}{job}/", self.assignments())
    }

    /// One rank's assignment.
    pub fn assignment(&self, job: &str, rank: u32) -> String {
        format!("{}{rank:06}", self.job_assignments(job))
    }

    /// Prefix of all events.
    pub fn events(&self) -> String {
        format!("{}/events/", self.root)
    }

    /// One event of a job.
    pub fn event(&self, job: &str, seq: u64) -> String {
        format!("{}{job}/{seq:010}", self.events())
    }
}

/// Checks that a job name can be a key segment: non-empty, at most 253 characters of
/// `[A-Za-z0-9._-]` (like a Kubernetes name, plus upper case).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    check_chars(what, name, "")
}

/// Checks a worker id: like [`check_name`], and `/` and `:` are also allowed.
pub fn check_worker_id(what: &str, name: &str) -> Result<(), String> {
    check_chars(what, name, "/:")
}

fn check_chars(what: &str, name: &str, extra: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > 253 {
        return Err(format!("{what} `{name}` is longer than 253 characters"));
    }
    if let Some(c) = name.chars().find(|c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') || extra.contains(*c))
    }) {
        let extra: String = extra.chars().map(|c| format!(", `{c}`")).collect();
        return Err(format!(
            "{what} `{name}` contains `{c}`; use letters, digits, `.`, `_`{extra} and `-`"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_numerically_and_share_prefixes() {
        let k = Keys::new("/x/");
        assert_eq!(k.job("a"), "/x/jobs/a");
        assert_eq!(k.assignment("a", 7), "/x/assignments/a/000007");
        assert!(k.assignment("a", 7).starts_with(&k.job_assignments("a")));
        assert!(k.event("j", 9) < k.event("j", 10));
        assert_eq!(k.presence("w1"), "/x/presence/w1");
    }

    #[test]
    fn names_with_slashes_are_rejected() {
        assert!(check_name("job name", "dsv3-tiny_1.0").is_ok());
        assert_eq!(
            check_name("job name", "a/b").unwrap_err(),
            "job name `a/b` contains `/`; use letters, digits, `.`, `_` and `-`"
        );
        assert!(check_worker_id("worker id", "node0/0").is_ok());
        assert_eq!(
            check_worker_id("worker id", "n 0").unwrap_err(),
            "worker id `n 0` contains ` `; use letters, digits, `.`, `_`, `/`, `:` and `-`"
        );
        assert_eq!(check_name("job name", "").unwrap_err(), "job name is empty");
    }
}
