//! What the client subcommands (`submit`, `get`, `describe`, `cancel`, `experts`) share: the coordinator
//! address and output flags, one RPC helper with a deadline, the exit-code policy, the
//! serialisable views of wire messages, and the table / JSON / YAML printers.
//!
//! Exit codes (stable, documented in `moetrain --help` of each client command and the README):
//! 0 success; 1 any other error; 2 usage error (clap); 3 not found (unknown job);
//! 4 invalid manifest or argument (the message names field, line and column);
//! 5 coordinator unreachable, unavailable or timed out; 6 conflict (job name taken, or the job
//! is already finished).
//!
//! Invariants: stdout carries only the requested output (logs go to stderr), so
//! `--output json` is always parseable; every RPC runs under `--timeout`; YAML is emitted by a
//! small writer for JSON values here, never parsed (only the `manifest` crate parses YAML).

use proto::pb;
use proto::pb::coordinator_client::CoordinatorClient;
use serde::Serialize;
use std::fmt::Write as _;
use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: any error not covered below.
pub const EXIT_ERROR: u8 = 1;
/// Exit code: the command line or configuration is wrong (clap uses 2 as well).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the named job does not exist.
pub const EXIT_NOT_FOUND: u8 = 3;
/// Exit code: the manifest (or another argument) was rejected as invalid.
pub const EXIT_INVALID: u8 = 4;
/// Exit code: the coordinator could not be reached, was unavailable or did not answer in time.
pub const EXIT_UNREACHABLE: u8 = 5;
/// Exit code: the request conflicts with the current state (name taken, job already finished).
pub const EXIT_CONFLICT: u8 = 6;

/// Text appended to the help of every client command.
pub const EXIT_CODES_HELP: &str = "Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 invalid manifest/argument, \
5 coordinator unreachable or timed out, 6 conflict (name taken or job finished).";

/// Where the output goes and in which format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// Aligned columns for people.
    #[default]
    Table,
    /// One JSON document (stable field names, for scripts and tests).
    Json,
    /// The same document as YAML.
    Yaml,
}

/// Flags every client command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Coordinator URL.
    #[arg(
        long,
        env = "MOETRAIN_COORDINATOR",
        default_value = "http://127.0.0.1:7070",
        value_name = "URL"
    )]
    pub coordinator: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Deadline of each RPC (and of connecting), e.g. `10s`, `500ms`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// A failure of a client command, carrying its exit code.
#[derive(Debug)]
pub struct ClientError {
    /// The process exit code.
    pub code: u8,
    /// What went wrong, for stderr.
    pub message: String,
}

impl ClientError {
    /// An error with an explicit code.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Maps a gRPC status to the exit-code policy.
    pub fn from_status(what: &str, status: &tonic::Status) -> Self {
        use tonic::Code;
        let code = match status.code() {
            Code::NotFound => EXIT_NOT_FOUND,
            Code::InvalidArgument => EXIT_INVALID,
            Code::Unavailable | Code::DeadlineExceeded => EXIT_UNREACHABLE,
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => EXIT_CONFLICT,
            _ => EXIT_ERROR,
        };
        let msg = if status.message().is_empty() {
            format!("{what}: {}", status.code())
        } else {
            format!("{what}: {}", status.message())
        };
        Self { code, message: msg }
    }
}

/// Builds a runtime, runs `body` on it and turns its result into an exit code, printing the
/// error (if any) on stderr. Client commands keep logs at `warn` unless `RUST_LOG` says otherwise.
pub fn run_client<F, Fut>(service: &str, body: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), ClientError>>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the async runtime: {e}"))?;
    rt.block_on(async {
        let telemetry = crate::telemetry::init(service, "warn", &Default::default())?;
        let res = body().await;
        telemetry.shutdown().await;
        Ok(match res {
            Ok(()) => ExitCode::from(EXIT_OK),
            Err(e) => {
                eprintln!("error: {}", e.message);
                ExitCode::from(e.code)
            }
        })
    })
}

/// Connects to the coordinator within `args.timeout`.
pub async fn connect(args: &ClientArgs) -> Result<CoordinatorClient<Channel>, ClientError> {
    let endpoint = Endpoint::from_shared(args.coordinator.clone())
        .map_err(|e| {
            ClientError::new(
                EXIT_USAGE,
                format!("invalid coordinator URL `{}`: {e}", args.coordinator),
            )
        })?
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    let channel = match tokio::time::timeout(args.timeout, endpoint.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(ClientError::new(
                EXIT_UNREACHABLE,
                format!(
                    "cannot reach the coordinator at {}: {e} (set --coordinator or MOETRAIN_COORDINATOR)",
                    args.coordinator
                ),
            ));
        }
        Err(_) => {
            return Err(ClientError::new(
                EXIT_UNREACHABLE,
                format!(
                    "connecting to the coordinator at {} timed out after {:?}",
                    args.coordinator, args.timeout
                ),
            ));
        }
    };
    Ok(CoordinatorClient::new(channel))
}

/// Runs one RPC future under `limit`, mapping timeouts and statuses to exit codes.
pub async fn rpc<T>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(ClientError::from_status(what, &status)),
        Err(_) => Err(ClientError::new(
            EXIT_UNREACHABLE,
            format!("{what}: no answer within {limit:?}"),
        )),
    }
}

/// Prints `view` as JSON or YAML, or calls `table` for the table format.
pub fn print<T: Serialize>(
    format: OutputFormat,
    view: &T,
    table: impl FnOnce(&T) -> String,
) -> Result<(), ClientError> {
    let text = match format {
        OutputFormat::Table => table(view),
        OutputFormat::Json => {
            let mut s = serde_json::to_string_pretty(view)
                .map_err(|e| ClientError::new(EXIT_ERROR, format!("encoding JSON: {e}")))?;
            s.push('\n');
            s
        }
        OutputFormat::Yaml => {
            let v = serde_json::to_value(view)
                .map_err(|e| ClientError::new(EXIT_ERROR, format!("encoding output: {e}")))?;
            to_yaml(&v)
        }
    };
    print!("{text}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Views: the stable, serialisable shape of what the commands print.

/// A job as `get jobs` prints it.
#[derive(Serialize, Debug, Clone)]
pub struct JobView {
    pub name: String,
    pub phase: String,
    pub reason: String,
    pub origin: String,
    pub world_size: u32,
    pub pipeline: u32,
    pub data: u32,
    pub expert: u32,
    pub schedule: String,
    pub micro_batches: u32,
    pub steps: u64,
    pub ready_ranks: u32,
    pub device_kind: String,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub progress: Option<ProgressView>,
    /// The latest checkpoint every rank wrote.
    pub last_checkpoint: Option<CheckpointView>,
    /// Automatic restarts done so far and allowed in all.
    pub restarts: u32,
    pub restart_budget: u32,
}

/// A complete checkpoint.
#[derive(Serialize, Debug, Clone)]
pub struct CheckpointView {
    /// The step after which it was written (steps numbered from 0).
    pub step: u64,
    pub dir: String,
    pub unix_ms: u64,
    pub ranks: u32,
    pub bytes: u64,
}

/// One named loss term.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct LossView {
    pub name: String,
    pub value: f64,
}

/// Training progress of a job.
#[derive(Serialize, Debug, Clone)]
pub struct ProgressView {
    /// Steps every rank finished.
    pub step: u64,
    /// Total loss of the latest finished step.
    pub loss: f64,
    pub tokens: u64,
    pub tokens_per_second: f64,
    pub updated_unix_ms: u64,
    /// Loss terms of the latest finished step ("main", "mtp", "balance", "total").
    pub losses: Vec<LossView>,
    pub step_seconds: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

impl From<&pb::Job> for JobView {
    fn from(j: &pb::Job) -> Self {
        Self {
            name: j.name.clone(),
            phase: phase_name(j.phase),
            reason: j.reason.clone(),
            origin: j.origin.clone(),
            world_size: j.world_size,
            pipeline: j.pipeline,
            data: j.data,
            expert: j.expert,
            schedule: j.schedule.clone(),
            micro_batches: j.micro_batches,
            steps: j.steps,
            ready_ranks: j.ready_ranks,
            device_kind: device_kind_name(j.device_kind),
            created_unix_ms: j.created_unix_ms,
            updated_unix_ms: j.updated_unix_ms,
            progress: j.progress.as_ref().map(|p| ProgressView {
                step: p.step,
                loss: p.loss,
                tokens: p.tokens,
                tokens_per_second: p.tokens_per_second,
                updated_unix_ms: p.updated_unix_ms,
                losses: p
                    .losses
                    .iter()
                    .map(|l| LossView {
                        name: l.name.clone(),
                        value: l.value,
                    })
                    .collect(),
                step_seconds: p.step_seconds,
                grad_norm: p.grad_norm,
                lr: p.lr,
            }),
            last_checkpoint: j.last_checkpoint.as_ref().map(|c| CheckpointView {
                step: c.step,
                dir: c.dir.clone(),
                unix_ms: c.unix_ms,
                ranks: c.ranks,
                bytes: c.bytes,
            }),
            restarts: j.restarts,
            restart_budget: j.restart_budget,
        }
    }
}

/// A worker as `get workers` prints it.
#[derive(Serialize, Debug, Clone)]
pub struct WorkerView {
    pub worker_id: String,
    pub node: String,
    pub state: String,
    pub reason: String,
    pub connected: bool,
    pub devices: Vec<DeviceView>,
    pub data_plane_addr: String,
    pub registered_unix_ms: u64,
    pub last_heartbeat_unix_ms: u64,
    pub held: Vec<HeldView>,
}

/// One device of a worker.
#[derive(Serialize, Debug, Clone)]
pub struct DeviceView {
    pub kind: String,
    pub index: u32,
    pub memory_bytes: u64,
}

/// One (job, rank) a worker holds.
#[derive(Serialize, Debug, Clone)]
pub struct HeldView {
    pub job: String,
    pub rank: u32,
    pub device_index: u32,
}

impl From<&pb::Worker> for WorkerView {
    fn from(w: &pb::Worker) -> Self {
        Self {
            worker_id: w.worker_id.clone(),
            node: w.node.clone(),
            state: pb::WorkerState::try_from(w.state)
                .map(|s| s.name().to_owned())
                .unwrap_or_else(|_| format!("Unknown({})", w.state)),
            reason: w.reason.clone(),
            connected: w.connected,
            devices: w
                .devices
                .iter()
                .map(|d| DeviceView {
                    kind: device_kind_name(d.kind),
                    index: d.index,
                    memory_bytes: d.memory_bytes,
                })
                .collect(),
            data_plane_addr: w.data_plane_addr.clone(),
            registered_unix_ms: w.registered_unix_ms,
            last_heartbeat_unix_ms: w.last_heartbeat_unix_ms,
            held: w
                .held
                .iter()
                .map(|h| HeldView {
                    job: h.job.clone(),
                    rank: h.rank,
                    device_index: h.device_index,
                })
                .collect(),
        }
    }
}

/// Everything `describe job` prints.
#[derive(Serialize, Debug, Clone)]
pub struct DescribeView {
    pub job: Option<JobView>,
    pub transitions: Vec<TransitionView>,
    pub events: Vec<EventView>,
    pub placement: Option<PlacementView>,
    pub manifest_yaml: String,
    pub overrides: Vec<String>,
    /// Per MoE layer max/mean of the latest finished step (absent without expert telemetry).
    pub imbalance: Option<ImbalanceView>,
}

/// The expert-load balance of one step.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ImbalanceView {
    pub step: u64,
    pub layers: Vec<LayerLoadView>,
}

/// One MoE layer's load in one step.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct LayerLoadView {
    pub layer: u32,
    /// Largest per-expert token count.
    pub max: u64,
    /// Mean per-expert token count.
    pub mean: f64,
    /// max / mean (1 is perfectly balanced; 0 when nothing was routed).
    pub max_over_mean: f64,
}

impl ImbalanceView {
    /// The latest step of an `ExpertLoads` answer's history, if any.
    pub fn latest(resp: &pb::ExpertLoadsResponse) -> Option<Self> {
        let s = resp.history.last()?;
        Some(Self {
            step: s.step,
            layers: s.layers.iter().map(LayerLoadView::from).collect(),
        })
    }

    /// The layer with the largest max/mean ratio.
    pub fn worst(&self) -> Option<&LayerLoadView> {
        self.layers
            .iter()
            .max_by(|a, b| a.max_over_mean.total_cmp(&b.max_over_mean))
    }
}

impl From<&pb::LayerLoad> for LayerLoadView {
    fn from(l: &pb::LayerLoad) -> Self {
        Self {
            layer: l.layer,
            max: l.max,
            mean: l.mean,
            max_over_mean: if l.mean > 0.0 {
                l.max as f64 / l.mean
            } else {
                0.0
            },
        }
    }
}

/// Everything `experts JOB` prints.
#[derive(Serialize, Debug, Clone)]
pub struct ExpertLoadsView {
    pub job: String,
    /// The step the counts are from (absent before the first finished step).
    pub step: Option<u64>,
    /// Per MoE layer, tokens routed to each expert in that step.
    pub layers: Vec<LayerCountsView>,
    /// Recent steps' per-layer max/mean, oldest first.
    pub history: Vec<ImbalanceView>,
}

/// One layer's per-expert counts.
#[derive(Serialize, Debug, Clone)]
pub struct LayerCountsView {
    pub layer: u32,
    pub counts: Vec<u64>,
}

impl From<&pb::ExpertLoadsResponse> for ExpertLoadsView {
    fn from(r: &pb::ExpertLoadsResponse) -> Self {
        Self {
            job: r.job.as_ref().map(|j| j.name.clone()).unwrap_or_default(),
            step: r.step,
            layers: r
                .layers
                .iter()
                .map(|l| LayerCountsView {
                    layer: l.layer,
                    counts: l.counts.clone(),
                })
                .collect(),
            history: r
                .history
                .iter()
                .map(|s| ImbalanceView {
                    step: s.step,
                    layers: s.layers.iter().map(LayerLoadView::from).collect(),
                })
                .collect(),
        }
    }
}

/// One phase change.
#[derive(Serialize, Debug, Clone)]
pub struct TransitionView {
    pub from: String,
    pub to: String,
    pub unix_ms: u64,
    pub reason: String,
}

/// One job event.
#[derive(Serialize, Debug, Clone)]
pub struct EventView {
    pub seq: u64,
    pub unix_ms: u64,
    pub kind: String,
    pub message: String,
    pub worker_id: String,
}

/// A job's placement.
#[derive(Serialize, Debug, Clone)]
pub struct PlacementView {
    pub ranks: Vec<RankView>,
    pub reasons: Vec<String>,
}

/// Where one rank runs.
#[derive(Serialize, Debug, Clone)]
pub struct RankView {
    pub rank: u32,
    pub worker_id: String,
    pub node: String,
    pub device_index: u32,
    pub pp_idx: u32,
    pub dp_idx: u32,
    pub ep_idx: u32,
    pub stages: Vec<u32>,
    /// Half-open `[begin, end)` of routed experts.
    pub experts: Option<[u32; 2]>,
    pub data_plane_addr: String,
}

impl From<&pb::DescribeJobResponse> for DescribeView {
    fn from(d: &pb::DescribeJobResponse) -> Self {
        Self {
            job: d.job.as_ref().map(JobView::from),
            transitions: d
                .transitions
                .iter()
                .map(|t| TransitionView {
                    from: phase_name(t.from),
                    to: phase_name(t.to),
                    unix_ms: t.unix_ms,
                    reason: t.reason.clone(),
                })
                .collect(),
            events: d
                .events
                .iter()
                .map(|e| EventView {
                    seq: e.seq,
                    unix_ms: e.unix_ms,
                    kind: e.kind.clone(),
                    message: e.message.clone(),
                    worker_id: e.worker_id.clone(),
                })
                .collect(),
            placement: d.placement.as_ref().map(|p| PlacementView {
                ranks: p
                    .ranks
                    .iter()
                    .map(|r| RankView {
                        rank: r.rank,
                        worker_id: r.worker_id.clone(),
                        node: r.node.clone(),
                        device_index: r.device_index,
                        pp_idx: r.pp_idx,
                        dp_idx: r.dp_idx,
                        ep_idx: r.ep_idx,
                        stages: r.stages.clone(),
                        experts: r.experts.as_ref().map(|e| [e.begin, e.end]),
                        data_plane_addr: r.data_plane_addr.clone(),
                    })
                    .collect(),
                reasons: p.reasons.clone(),
            }),
            manifest_yaml: d.manifest_yaml.clone(),
            overrides: d.overrides.clone(),
            imbalance: None,
        }
    }
}

/// The user-facing name of a wire job phase (unknown numbers are shown, not hidden).
pub fn phase_name(v: i32) -> String {
    pb::JobPhase::try_from(v)
        .map(|p| p.name().to_owned())
        .unwrap_or_else(|_| format!("Unknown({v})"))
}

/// The user-facing name of a wire device kind.
pub fn device_kind_name(v: i32) -> String {
    pb::DeviceKind::try_from(v)
        .map(|k| k.name().to_owned())
        .unwrap_or_else(|_| format!("unknown({v})"))
}

// ---------------------------------------------------------------------------------------------
// Text rendering.

/// Renders rows under headers with columns padded to their widest cell (two spaces between).
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            let w = widths.get(i).copied().unwrap_or(0);
            let _ = write!(l, "{c:<w$}");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, &mut headers.iter().copied());
    for row in rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}

/// `12s`, `5m`, `3h`, `2d` since `unix_ms` (or `-` when 0 or in the future).
pub fn age(unix_ms: u64) -> String {
    let now = proto::convert::now_unix_ms();
    if unix_ms == 0 || unix_ms > now {
        return "-".into();
    }
    let s = (now - unix_ms) / 1000;
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        7200..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Writes a JSON value as a YAML document (block style; strings quoted JSON-style whenever a
/// plain scalar could be misread, which YAML accepts as double-quoted scalars).
pub fn to_yaml(v: &serde_json::Value) -> String {
    let mut out = String::new();
    if is_block(v) {
        yaml_block(&mut out, v, 0);
    } else {
        yaml_inline(&mut out, v, 0);
        out.push('\n');
    }
    out
}

/// Whether `v` is written as an indented block (a non-empty map or list).
fn is_block(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(m) => !m.is_empty(),
        serde_json::Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

/// Appends a non-empty map or list as lines at `indent`, each ending in a newline.
fn yaml_block(out: &mut String, v: &serde_json::Value, indent: usize) {
    use serde_json::Value;
    let pad = " ".repeat(indent);
    match v {
        Value::Object(map) => {
            for (k, val) in map {
                out.push_str(&pad);
                out.push_str(&yaml_scalar_str(k));
                out.push(':');
                match val {
                    Value::Object(_) if is_block(val) => {
                        out.push('\n');
                        yaml_block(out, val, indent + 2);
                    }
                    Value::Array(_) if is_block(val) => {
                        out.push('\n');
                        yaml_block(out, val, indent);
                    }
                    _ => {
                        out.push(' ');
                        yaml_inline(out, val, indent + 2);
                        out.push('\n');
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                out.push_str(&pad);
                out.push_str("- ");
                if is_block(item) {
                    // Write the item one level deeper, then pull its first line up after "- ".
                    let mut inner = String::new();
                    yaml_block(&mut inner, item, indent + 2);
                    out.push_str(&inner[indent + 2..]);
                } else {
                    yaml_inline(out, item, indent + 2);
                    out.push('\n');
                }
            }
        }
        _ => {
            out.push_str(&pad);
            yaml_inline(out, v, indent);
            out.push('\n');
        }
    }
}

/// Appends a scalar or an empty collection (no trailing newline); multi-line strings become
/// literal blocks indented at `indent`.
fn yaml_inline(out: &mut String, v: &serde_json::Value, indent: usize) {
    use serde_json::Value;
    match v {
        Value::Object(_) => out.push_str("{}"),
        Value::Array(_) => out.push_str("[]"),
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s)
            if s.contains('\n')
                && !s.starts_with([' ', '\n'])
                && !s.contains('\r')
                && !s.ends_with("\n\n") =>
        {
            out.push_str(if s.ends_with('\n') { "|" } else { "|-" });
            let pad = " ".repeat(indent);
            for l in s.trim_end_matches('\n').split('\n') {
                out.push('\n');
                if !l.is_empty() {
                    out.push_str(&pad);
                    out.push_str(l);
                }
            }
        }
        Value::String(s) => out.push_str(&yaml_scalar_str(s)),
    }
}

/// A string as a plain YAML scalar when that is unambiguous, else JSON-quoted.
fn yaml_scalar_str(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./@".contains(c))
        && !s.starts_with(['-', '.', '@'])
        && s.parse::<f64>().is_err()
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "true"
                | "false"
                | "null"
                | "yes"
                | "no"
                | "on"
                | "off"
                | "y"
                | "n"
                | "~"
                | ".inf"
                | ".nan"
        );
    if plain {
        s.to_owned()
    } else {
        serde_json::Value::String(s.to_owned()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn yaml_of_nested_values() {
        // serde_json maps are sorted by key, so the YAML lists keys alphabetically.
        let v = json!({
            "name": "job-a",
            "phase": "Running",
            "world": 8,
            "empty": [],
            "odd": "yes",
            "ranks": [{"rank": 0, "stages": [0, 3]}, {"rank": 1, "stages": []}],
            "nested": {"k": "a: b"},
            "text": "line one\nline two\n"
        });
        let expected = "\
empty: []
name: job-a
nested:
  k: \"a: b\"
odd: \"yes\"
phase: Running
ranks:
- rank: 0
  stages:
  - 0
  - 3
- rank: 1
  stages: []
text: |
  line one
  line two
world: 8
";
        assert_eq!(to_yaml(&v), expected);
    }

    #[test]
    fn table_pads_columns() {
        let t = render_table(
            &["NAME", "PHASE"],
            &[
                vec!["a-long-name".into(), "Running".into()],
                vec!["b".into(), "-".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME         PHASE\na-long-name  Running\nb            -\n"
        );
    }

    #[test]
    fn statuses_map_to_exit_codes() {
        let code = |c| ClientError::from_status("x", &tonic::Status::new(c, "m")).code;
        assert_eq!(code(tonic::Code::NotFound), EXIT_NOT_FOUND);
        assert_eq!(code(tonic::Code::InvalidArgument), EXIT_INVALID);
        assert_eq!(code(tonic::Code::Unavailable), EXIT_UNREACHABLE);
        assert_eq!(code(tonic::Code::AlreadyExists), EXIT_CONFLICT);
        assert_eq!(code(tonic::Code::Internal), EXIT_ERROR);
    }
}
