//! `moetrain plan JOB.yaml [--cluster CLUSTER.yaml]`: what a job would look like before it runs — its
//! placement on the cluster, and for every pipeline schedule it could use (DualPipe, DualPipeV, 1F1B)
//! the simulated bubble and each pipeline rank's memory (parameters, gradients, ZeRO-1 optimizer
//! shard, activations at the schedule's peak), with a verdict against the device memory.
//!
//! Invariant: every number comes from the pure `plan` crate (`plan::memory::estimate`, which generates
//! and simulates the schedule) and the model's `arch` counts; docs/planning.md explains each column.
//! With `--strict` the exit code is 2 when a rank of the job's own schedule would not fit.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::ValueEnum;
use plan::memory::{LayerShape, ModelShape, Precision, ScheduleEstimate, Sharding, estimate};
use plan::parallel::min_micro_batches;
use plan::schedule::ScheduleKind;
use plan::sim::Costs;
use serde_json::{Value, json};

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Output formats.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    /// Human-readable tables.
    Table,
    /// Everything as one JSON document.
    Json,
}

/// Plan a job: placement, schedules, per-rank memory and bubble side by side.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The TrainingJob manifest.
    pub job: PathBuf,
    /// A cluster manifest to place the job on (placement is skipped without one).
    #[arg(long)]
    pub cluster: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub output: Output,
    /// Memory of one device in GiB, for the fit verdict (80 = H800/H100).
    #[arg(long, default_value_t = 80.0)]
    pub device_memory_gib: f64,
    /// Op costs `F,B,I,W,FB,COMM` for the bubble (default 1,2,1,1,3,0: W = B/2, no overlap gain).
    #[arg(long, value_name = "F,B,I,W,FB,COMM")]
    pub costs: Option<String>,
    /// Exit with status 2 when the job's own schedule does not fit the device memory.
    #[arg(long)]
    pub strict: bool,
    /// Override a manifest field, `path.to.field=value` (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub overrides: Vec<String>,
}

/// The fewest valid micro-batches for `kind` that is at least `wanted`.
fn microbatches_for(kind: ScheduleKind, pipeline: u32, wanted: u32) -> u32 {
    let n = wanted.max(min_micro_batches(kind, pipeline)).max(1);
    if kind == ScheduleKind::DualPipe && n % 2 == 1 {
        n + 1
    } else {
        n
    }
}

/// The memory model's view of an `arch` model for a micro-batch of `tokens` tokens.
fn model_shape(
    model: &arch::ModelConfig,
    tokens: u64,
    act_bytes_per_elem: u64,
    mtp_depth: u32,
) -> ModelShape {
    let routed = |layer: usize| match model.layer_kind(layer) {
        arch::LayerKind::Moe => model.n_routed_experts as u64 * model.expert_params(),
        arch::LayerKind::Dense => 0,
    };
    let layer = |l: usize| {
        let expert = routed(l);
        LayerShape {
            dense_params: model.layer_params(l) - expert,
            expert_params: expert,
            activation_bytes: model.activation_bytes_per_token(l, act_bytes_per_elem) * tokens,
        }
    };
    let layers: Vec<LayerShape> = (0..model.num_hidden_layers).map(layer).collect();
    let mut post = LayerShape {
        dense_params: model.head_params() + model.hidden_size as u64,
        expert_params: 0,
        // The logits of the micro-batch are kept for the loss backward.
        activation_bytes: tokens * model.vocab_size as u64 * act_bytes_per_elem,
    };
    for k in 1..=mtp_depth as usize {
        let l = model.num_hidden_layers + k - 1;
        let expert = routed(l);
        post.dense_params += model.mtp_module_params(k) - expert;
        post.expert_params += expert;
        post.activation_bytes += model.activation_bytes_per_token(l, act_bytes_per_elem) * tokens
            + tokens * model.vocab_size as u64 * act_bytes_per_elem;
    }
    let pre = LayerShape {
        dense_params: model.embedding_params(),
        expert_params: 0,
        activation_bytes: 0,
    };
    ModelShape { pre, layers, post }
}

struct Column {
    kind: ScheduleKind,
    microbatches: u32,
    result: std::result::Result<ScheduleEstimate, String>,
}

/// Runs `moetrain plan`.
pub fn run(args: Args) -> Result<ExitCode> {
    let _span = tracing::info_span!("plan", job = %args.job.display()).entered();
    let origin = args.job.display().to_string();
    let src = std::fs::read_to_string(&args.job)
        .with_context(|| format!("cannot read job manifest {origin}"))?;
    let cluster = match &args.cluster {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read cluster manifest {}", path.display()))?;
            Some(manifest::parse_cluster(&text, &path.display().to_string())?)
        }
        None => None,
    };
    let job = match &cluster {
        Some(c) => manifest::parse_job_for_cluster(&src, &origin, &args.overrides, c)?,
        None => manifest::parse_job(&src, &origin, &args.overrides)?,
    };
    let base = args.job.parent().unwrap_or(Path::new("."));
    let model = job
        .model_config(base)
        .context("cannot resolve the job's model")?;
    let costs = match &args.costs {
        Some(text) => super::schedule::parse_costs(text)?,
        None => Costs::unit(),
    };

    let par = &job.spec.parallelism;
    let training = &job.spec.training;
    let tokens = u64::from(training.seq_len) * u64::from(training.micro_batch_size);
    let (act_bytes, precision) = match training.precision {
        manifest::Precision::Fp8 | manifest::Precision::Fp8Ue8m0 => (1, Precision::v3_mixed()),
        manifest::Precision::Bf16 => (2, Precision::v3_mixed()),
        manifest::Precision::Fp32 => (4, Precision::fp32()),
    };
    let moment = match training.optimizer.moment_dtype {
        manifest::MomentDtype::Bf16 => 2.0,
        manifest::MomentDtype::F32 => 4.0,
    };
    let master = if training.precision == manifest::Precision::Fp32 {
        0.0
    } else {
        4.0
    };
    let precision = Precision {
        optimizer_bytes: master + 2.0 * moment,
        ..precision
    };
    let mtp_depth = training
        .mtp
        .depth
        .unwrap_or(model.num_nextn_predict_layers as u32);
    let shape = model_shape(&model, tokens, act_bytes, mtp_depth);
    let sharding = Sharding {
        data: par.data,
        expert: par.expert,
    };
    let wanted = par.micro_batches();
    let job_kind = par.schedule.kind();

    let placement = match &cluster {
        Some(c) => {
            let req = job.placement_request(&model);
            Some(plan::placement::place(&req, c).context("placement failed")?)
        }
        None => None,
    };

    let columns: Vec<Column> = ScheduleKind::ALL
        .into_iter()
        .map(|kind| {
            let n = microbatches_for(kind, par.pipeline, wanted);
            let result = estimate(kind, par.pipeline, n, &shape, precision, sharding, costs)
                .map_err(|e| e.to_string());
            Column {
                kind,
                microbatches: n,
                result,
            }
        })
        .collect();
    let limit = (args.device_memory_gib * GIB) as u64;
    let job_fits = columns
        .iter()
        .find(|c| c.kind == job_kind)
        .and_then(|c| c.result.as_ref().ok())
        .is_none_or(|e| e.peak_rank().is_none_or(|r| r.total_bytes() <= limit));

    match args.output {
        Output::Json => {
            let doc = json!({
                "job": job.metadata.name,
                "world_size": par.world_size(),
                "pipeline": par.pipeline, "data": par.data, "expert": par.expert,
                "schedule": job_kind.name(),
                "tokens_per_microbatch": tokens,
                "device_memory_bytes": limit,
                "placement": placement.as_ref().map(|p| json!({
                    "decisions": p.decisions,
                    "ranks": p.ranks.iter().map(|r| json!({
                        "rank": r.rank.0, "node": r.node, "device": r.device.0, "pipeline_rank": r.pipeline_rank,
                        "stages": r.stages.iter().map(|s| s.0).collect::<Vec<_>>(), "dp": r.dp, "ep": r.ep,
                        "experts": [r.experts.start, r.experts.end],
                    })).collect::<Vec<_>>(),
                })),
                "schedules": columns.iter().map(|c| column_json(c, limit)).collect::<Vec<_>>(),
                "job_schedule_fits": job_fits,
            });
            emit(&(serde_json::to_string_pretty(&doc)? + "\n"))?;
        }
        Output::Table => {
            let table = render_table(
                &job,
                &model,
                tokens,
                placement.as_ref(),
                &columns,
                limit,
                costs,
                job_kind,
            );
            emit(&table)?;
        }
    }
    Ok(if job_fits || !args.strict {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn column_json(c: &Column, limit: u64) -> Value {
    match &c.result {
        Err(e) => json!({ "kind": c.kind.name(), "microbatches": c.microbatches, "error": e }),
        Ok(e) => json!({
            "kind": c.kind.name(),
            "microbatches": c.microbatches,
            "stages": c.kind.stage_count(e.ranks),
            "makespan": e.makespan,
            "max_idle": e.max_idle,
            "bubble_fraction": e.bubble_fraction,
            "fits": e.per_rank.iter().all(|r| r.total_bytes() <= limit),
            "per_rank": e.per_rank.iter().map(|r| json!({
                "pipeline_rank": r.rank,
                "stages": r.stages,
                "layers": r.stages.iter().map(|&s| { let l = &e.stage_layers[s as usize]; [l.start, l.end] }).collect::<Vec<_>>(),
                "params_bytes": r.params_bytes,
                "grad_bytes": r.grad_bytes,
                "optimizer_bytes": r.optimizer_bytes,
                "activation_bytes": r.activation_bytes,
                "peak_live_chunks": r.peak_live_chunks,
                "total_bytes": r.total_bytes(),
                "idle": r.idle,
                "fits": r.total_bytes() <= limit,
            })).collect::<Vec<_>>(),
        }),
    }
}

/// A byte unit chosen so the largest number of a table reads well.
struct Unit {
    name: &'static str,
    bytes: f64,
}

impl Unit {
    fn for_max(max: u64) -> Self {
        if max as f64 >= GIB {
            Unit {
                name: "GiB",
                bytes: GIB,
            }
        } else {
            Unit {
                name: "MiB",
                bytes: 1024.0 * 1024.0,
            }
        }
    }

    fn of(&self, bytes: u64) -> f64 {
        bytes as f64 / self.bytes
    }
}

/// Parameter counts as `671.0B` or `12.3M`.
fn count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else {
        format!("{:.1}M", n / 1e6)
    }
}

#[allow(clippy::too_many_arguments)]
fn render_table(
    job: &manifest::TrainingJob,
    model: &arch::ModelConfig,
    tokens: u64,
    placement: Option<&plan::placement::Placement>,
    columns: &[Column],
    limit: u64,
    costs: Costs,
    job_kind: ScheduleKind,
) -> String {
    let mut o = String::new();
    let par = &job.spec.parallelism;
    let _ = writeln!(
        o,
        "job {}: {} GPUs = pipeline {} × data {} (expert {}), schedule {}, {} layers, {} parameters, {} tokens per micro-batch",
        job.metadata.name,
        par.world_size(),
        par.pipeline,
        par.data,
        par.expert,
        job_kind.name(),
        model.num_hidden_layers,
        count(model.total_params()),
        tokens
    );
    match placement {
        Some(p) => {
            let nodes: std::collections::BTreeSet<&str> =
                p.ranks.iter().map(|r| r.node.as_str()).collect();
            let _ = writeln!(
                o,
                "placement: {} ranks on {} nodes",
                p.ranks.len(),
                nodes.len()
            );
            for d in &p.decisions {
                let _ = writeln!(o, "  - {d}");
            }
        }
        None => {
            let _ = writeln!(o, "placement: skipped (no --cluster given)");
        }
    }
    let _ = writeln!(
        o,
        "costs: F={} B={} I={} W={} F&B={} comm={} (bubble in these units)\n",
        costs.forward,
        costs.backward,
        costs.backward_input,
        costs.weight,
        costs.overlapped,
        costs.comm
    );
    let max_total = columns
        .iter()
        .filter_map(|c| c.result.as_ref().ok())
        .filter_map(|e| e.peak_rank().map(|r| r.total_bytes()))
        .max()
        .unwrap_or(0);
    let unit = Unit::for_max(max_total);
    let lim = Unit::for_max(limit);
    let _ = writeln!(
        o,
        "{:<10} {:>5} {:>7} {:>8} {:>8} {:>9} {:>10}  verdict",
        "schedule",
        "N",
        "stages",
        "bubble",
        "bubble%",
        "peak act",
        format!("peak {}", unit.name)
    );
    for c in columns {
        let mark = if c.kind == job_kind { "*" } else { "" };
        let name = format!("{}{mark}", c.kind.name());
        match &c.result {
            Err(e) => {
                let _ = writeln!(o, "{name:<10} {:>5}  not possible: {e}", c.microbatches);
            }
            Ok(e) => {
                let peak = e.peak_rank();
                let peak_total = peak.map_or(0, |r| r.total_bytes());
                let verdict = match peak {
                    Some(r) if r.total_bytes() > limit => format!(
                        "DOES NOT FIT: pipeline rank {} needs {:.1} {} > {:.1} {}",
                        r.rank,
                        lim.of(r.total_bytes()),
                        lim.name,
                        lim.of(limit),
                        lim.name
                    ),
                    _ => format!(
                        "fits ({:.1} {} free on the fullest rank)",
                        lim.of(limit - peak_total),
                        lim.name
                    ),
                };
                let _ = writeln!(
                    o,
                    "{name:<10} {:>5} {:>7} {:>8} {:>7.1}% {:>9} {:>10.1}  {verdict}",
                    c.microbatches,
                    c.kind.stage_count(e.ranks),
                    format!("{}", e.max_idle),
                    100.0 * e.bubble_fraction,
                    e.per_rank
                        .iter()
                        .map(|r| r.peak_live_chunks)
                        .max()
                        .unwrap_or(0),
                    unit.of(peak_total),
                );
            }
        }
    }
    let _ = writeln!(o, "(* = the job's schedule)\n");
    let _ = writeln!(
        o,
        "per pipeline rank, {}: params + grads + optimizer + activations = total (same on all {} data ranks)",
        unit.name, par.data
    );
    let ok: Vec<&ScheduleEstimate> = columns
        .iter()
        .filter_map(|c| c.result.as_ref().ok())
        .collect();
    let mut header = format!("{:<5}", "rank");
    for e in &ok {
        header.push_str(&format!(" | {:^41}", e.kind.name()));
    }
    let _ = writeln!(o, "{}", header.trim_end());
    for r in 0..par.pipeline as usize {
        let mut line = format!("{r:<5}");
        for e in &ok {
            let m = &e.per_rank[r];
            let flag = if m.total_bytes() > limit { "!" } else { " " };
            line.push_str(&format!(
                " | {:>6.1} + {:>6.1} + {:>6.1} + {:>6.1} = {:>6.1}{flag}",
                unit.of(m.params_bytes),
                unit.of(m.grad_bytes),
                unit.of(m.optimizer_bytes),
                unit.of(m.activation_bytes),
                unit.of(m.total_bytes())
            ));
        }
        let _ = writeln!(o, "{}", line.trim_end());
    }
    let _ = writeln!(
        o,
        "(! = over the {:.1} {} device memory; docs/planning.md explains every column)\n",
        lim.of(limit),
        lim.name
    );
    let own = columns
        .iter()
        .find(|c| c.kind == job_kind)
        .and_then(|c| c.result.as_ref().ok());
    let fitting: Vec<&str> = ok
        .iter()
        .filter(|e| e.peak_rank().is_none_or(|r| r.total_bytes() <= limit))
        .map(|e| e.kind.name())
        .collect();
    let alternatives = if fitting.is_empty() {
        "none of the schedules fits".to_string()
    } else {
        format!("fitting: {}", fitting.join(", "))
    };
    let _ = match own.and_then(|e| e.peak_rank().map(|r| (e, r))) {
        Some((e, r)) if r.total_bytes() > limit => {
            let over = e
                .per_rank
                .iter()
                .filter(|m| m.total_bytes() > limit)
                .count();
            writeln!(
                o,
                "verdict: the job's schedule {} does NOT fit: {over} of {} pipeline ranks exceed {:.1} {} (worst: rank {} at {:.1} {}); {alternatives}",
                job_kind.name(),
                e.ranks,
                lim.of(limit),
                lim.name,
                r.rank,
                lim.of(r.total_bytes()),
                lim.name
            )
        }
        Some(_) => writeln!(
            o,
            "verdict: the job's schedule {} fits on every rank; {alternatives}",
            job_kind.name()
        ),
        None => writeln!(
            o,
            "verdict: the job's schedule {} cannot be estimated (see above); {alternatives}",
            job_kind.name()
        ),
    };
    o
}

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
pub fn emit(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_shape_accounts_for_every_parameter() {
        let model = arch::ModelConfig::preset("v3-671b").expect("preset");
        let shape = model_shape(&model, 4096, 1, 1);
        let all = |l: &LayerShape| l.dense_params + l.expert_params;
        let total = all(&shape.pre) + shape.layers.iter().map(all).sum::<u64>() + all(&shape.post);
        assert_eq!(total, model.total_params());
        assert_eq!(shape.layers.len(), 61);
        // The first three layers are dense; the others carry 256 routed experts.
        assert_eq!(shape.layers[0].expert_params, 0);
        assert_eq!(shape.layers[3].expert_params, 256 * model.expert_params());
        assert!(shape.layers.iter().all(|l| l.activation_bytes > 0));
    }

    #[test]
    fn microbatches_are_raised_to_each_schedules_minimum() {
        assert_eq!(microbatches_for(ScheduleKind::DualPipe, 16, 120), 120);
        assert_eq!(microbatches_for(ScheduleKind::DualPipe, 4, 9), 10);
        assert_eq!(microbatches_for(ScheduleKind::DualPipeV, 4, 3), 8);
        assert_eq!(microbatches_for(ScheduleKind::OneFOneB, 4, 3), 4);
    }
}
