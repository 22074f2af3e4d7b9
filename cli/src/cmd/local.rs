//! `moetrain local JOB.yaml`: the whole distributed system on this machine from one command — an
//! embedded coordinator (in-memory store) on a loopback port, one worker process per rank of the
//! job (the machine's cores divided among them), the job submitted to it, a live progress bar fed
//! by the coordinator's per-step summaries, and at the end `summary.json` and a clean shutdown.
//!
//! Invariants: every process this command starts is stopped before it returns, on success,
//! failure or Ctrl-C (first Ctrl-C cancels the job and shuts down cleanly; workers get SIGTERM,
//! then SIGKILL after a grace period); every wait is bounded (worker registration, each RPC, a
//! job that stops making progress for `--stall-timeout`). The workers and the coordinator speak
//! exactly the protocol a cluster uses — nothing here is a shortcut around it.
//!
//! `--resume DIR` continues a run from a committed checkpoint of the same job and parallel
//! layout (`submit::resume_point` reads it): the job trains the steps after the checkpoint's, and
//! the summary covers those steps.
//!
//! `spec.faultTolerance.spareWorkers` more worker processes start idle. When the coordinator
//! restarts the job after a failure (within `restartBudget`, from its last checkpoint), the run
//! keeps following it: the restart's reason is printed, the steps after the restart point are
//! dropped and followed again as the new attempt trains them, and `summary.json` counts the
//! restarts (`restarts`).

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use model::train::LossTerms;
use model::train::{LayerLoad, StepRecord, Summary, TimeSplit};
use proto::pb;
use proto::pb::coordinator_client::CoordinatorClient;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Arguments of `moetrain local`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The TrainingJob manifest.
    #[arg(value_name = "JOB.yaml")]
    pub job: PathBuf,
    /// Override a manifest field, e.g. `--set spec.training.steps=50` (repeatable).
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub set: Vec<String>,
    /// Shorthand for `--set spec.training.steps=N`.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Shorthand for `--set spec.training.precision=P` (fp32, bf16, fp8).
    #[arg(long)]
    pub precision: Option<String>,
    /// Run directory for checkpoints, worker logs and the summary (default: the manifest's
    /// checkpointing.dir, relative to the working directory, else runs/NAME).
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Where to write summary.json (default: RUN_DIR/summary.json).
    #[arg(long, value_name = "PATH")]
    pub summary: Option<PathBuf>,
    /// Compute threads per worker [default: the machine's cores divided by the ranks, at least 1].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Give up when no step finishes for this long.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
    /// Longest wait of a rank for one activation or gradient from a peer.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub recv_timeout: Duration,
    /// No progress bar (one line per step on stderr instead).
    #[arg(long)]
    pub no_progress: bool,
    /// Resume from a committed checkpoint: its step directory (holding `checkpoint.json`) or the
    /// checkpoints root (then its newest complete `step-N`). Same parallel layout only.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

/// Runs the command.
pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let telemetry = crate::telemetry::init("moetrain-local", "warn", &Default::default())?;
        let res = local(args).await;
        telemetry.shutdown().await;
        res
    })
}

/// What the run is about, fixed before anything starts.
struct Plan {
    name: String,
    manifest: String,
    origin: String,
    sets: Vec<String>,
    world: u32,
    /// Idle workers started besides one per rank (`spec.faultTolerance.spareWorkers`).
    spares: u32,
    steps: u64,
    precision: String,
    run_dir: PathBuf,
    summary: PathBuf,
    threads: usize,
    job_json: serde_json::Value,
    model_json: serde_json::Value,
    bias_speed: model::lr::BiasSpeedSchedule,
    /// `cpu`, or `simulated` for the simulated device kind (a test mode).
    device_kind: &'static str,
    /// Where the job resumes (`--resume`).
    resume: Option<pb::ResumePoint>,
}

impl Plan {
    /// The first step this run trains (0, or the one after the resumed checkpoint's).
    fn first_step(&self) -> u64 {
        self.resume.as_ref().map_or(0, |r| r.step + 1)
    }
}

fn plan(args: &Args) -> anyhow::Result<Plan> {
    let origin = args.job.display().to_string();
    let manifest =
        std::fs::read_to_string(&args.job).with_context(|| format!("reading {origin}"))?;
    let mut sets = Vec::new();
    if let Some(s) = args.steps {
        sets.push(format!("spec.training.steps={s}"));
    }
    if let Some(p) = &args.precision {
        sets.push(format!("spec.training.precision={p}"));
    }
    sets.extend(args.set.iter().cloned());
    let job = worker::job::parse(&manifest, &origin, &sets)?;
    let base = args.job.parent().unwrap_or(Path::new(""));
    // Output directories are relative to the working directory (inputs such as data files and
    // config paths are relative to the manifest).
    let run_dir = match (&args.run_dir, &job.spec.checkpointing.dir) {
        (Some(d), _) => d.clone(),
        (None, Some(d)) => PathBuf::from(d),
        (None, None) => PathBuf::from("runs").join(&job.metadata.name),
    };
    let run_dir = absolute(&run_dir)?;
    // Workers resolve paths against their own working directory: give them an absolute one.
    if job.spec.checkpointing.dir.is_some() || args.run_dir.is_some() {
        sets.push(format!("spec.checkpointing.dir={}", run_dir.display()));
    }
    let opts = worker::job::train_options(&job, base, &worker::job::Overrides::default())?;
    let par = &job.spec.parallelism;
    let world = par.pipeline * par.data;
    let resume = match &args.resume {
        Some(dir) => {
            let r = super::submit::resume_point(dir, Some(world)).map_err(anyhow::Error::msg)?;
            let steps = job.spec.training.steps;
            if r.step + 1 >= steps {
                bail!(
                    "--resume {}: the checkpoint was taken after step {} (numbered from 0), the job has only {steps} steps: nothing left to train (raise --steps)",
                    r.dir,
                    r.step
                );
            }
            // The resumed job writes its checkpoints into the run directory: refuse to start a
            // run that would fail on an existing one.
            let writes = job.spec.checkpointing.dir.is_some() || args.run_dir.is_some();
            let every = job.spec.checkpointing.interval;
            for step in r.step + 1..steps {
                let done = step + 1;
                let due = done == steps || (every > 0 && done.is_multiple_of(every));
                let dir = run_dir.join(model::checkpoint::step_dir_name(done));
                if writes && due && dir.exists() {
                    bail!(
                        "--resume: the resumed run would write its checkpoint after step {step} into {}, which exists; pass another --run-dir",
                        dir.display()
                    );
                }
            }
            Some(r)
        }
        None => None,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args
        .threads
        .unwrap_or_else(|| (cores / world.max(1) as usize).max(1));
    Ok(Plan {
        name: job.metadata.name.clone(),
        manifest,
        origin,
        sets,
        world,
        spares: job.spec.fault_tolerance.spare_workers,
        steps: job.spec.training.steps,
        precision: opts.precision.name().to_string(),
        summary: args
            .summary
            .clone()
            .unwrap_or_else(|| run_dir.join("summary.json")),
        run_dir,
        threads,
        job_json: serde_json::to_value(&job).unwrap_or(serde_json::Value::Null),
        model_json: serde_json::to_value(&opts.model).unwrap_or(serde_json::Value::Null),
        bias_speed: opts.bias_speed,
        device_kind: match job.spec.resources.device {
            manifest::DeviceKind::Cpu => "cpu",
            manifest::DeviceKind::Simulated => "simulated",
            manifest::DeviceKind::Cuda => {
                bail!("spec.resources.device: cuda is not supported by `moetrain local` yet")
            }
        },
        resume,
    })
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("reading the working directory")?
        .join(p))
}

async fn local(args: Args) -> anyhow::Result<ExitCode> {
    let plan = plan(&args)?;
    let logs = plan.run_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;

    // The coordinator, in this process, on a free loopback port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the coordinator's port")?;
    let addr = listener.local_addr().context("coordinator address")?;
    let url = format!("http://{addr}");
    let stop_coordinator = CancellationToken::new();
    let coordinator = {
        let token = stop_coordinator.clone();
        tokio::spawn(async move {
            let store = Arc::new(coordinator::MemStore::new());
            coordinator::run(
                listener,
                store,
                coordinator::Config::default(),
                token.cancelled_owned(),
            )
            .await
        })
    };
    eprintln!(
        "local: job {} | {} {} ranks ({} threads each){} | coordinator {url} | logs {}",
        plan.name,
        plan.world,
        plan.device_kind,
        plan.threads,
        match plan.spares {
            0 => String::new(),
            n => format!(" + {n} spare workers"),
        },
        logs.display()
    );

    let mut workers = Workers::default();
    let outcome = drive(&args, &plan, &url, &logs, &mut workers).await;
    workers.stop(Duration::from_secs(5)).await;
    stop_coordinator.cancel();
    match tokio::time::timeout(Duration::from_secs(10), coordinator).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("local: the coordinator ended with an error: {e}"),
        Ok(Err(e)) => eprintln!("local: the coordinator task failed: {e}"),
        Err(_) => eprintln!("local: the coordinator did not stop within 10s"),
    }
    outcome
}

/// The worker processes of the run.
#[derive(Default)]
struct Workers {
    children: Vec<(String, Child)>,
}

impl Workers {
    /// SIGTERM to every worker, then SIGKILL to those still running after `grace`.
    async fn stop(&mut self, grace: Duration) {
        for (_, c) in &self.children {
            if let Some(pid) = c.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        for (name, c) in &mut self.children {
            match tokio::time::timeout_at(deadline, c.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    eprintln!("local: {name} did not exit after SIGTERM; killing it");
                    let _ = c.kill().await;
                }
            }
        }
        self.children.clear();
    }

    /// The first worker that exited, with its status (each is reported once: it leaves the
    /// list).
    fn exited(&mut self) -> Option<String> {
        let i = self
            .children
            .iter_mut()
            .position(|(_, c)| matches!(c.try_wait(), Ok(Some(_))))?;
        let (name, mut c) = self.children.remove(i);
        let status = c
            .try_wait()
            .ok()
            .flatten()
            .map_or("?".to_owned(), |s| s.to_string());
        Some(format!("{name} exited ({status})"))
    }
}

/// Starts the workers, submits the job and follows it to its end.
async fn drive(
    args: &Args,
    plan: &Plan,
    url: &str,
    logs: &Path,
    workers: &mut Workers,
) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the moetrain binary")?;
    for i in 0..plan.world + plan.spares {
        let log_path = logs.join(format!("worker-{i}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut child = Command::new(&exe)
            .arg("worker")
            .args(["--coordinator", url])
            .args(["--node", "local"])
            .args(["--worker-id", &format!("local/{i}")])
            .args(["--first-device", &i.to_string()])
            .args(["--devices", "1"])
            .args(["--device-kind", plan.device_kind])
            .args(["--threads", &plan.threads.to_string()])
            .args([
                "--recv-timeout",
                &humantime::format_duration(args.recv_timeout).to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            // Their own process group: a Ctrl-C in the terminal reaches only this command, which
            // cancels the job and then stops the workers in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting worker {i} ({})", exe.display()))?;
        // The first stdout line says the worker is up; the rest is not needed.
        let stdout = child.stdout.take();
        workers.children.push((format!("worker {i}"), child));
        if let Some(out) = stdout {
            let mut lines = tokio::io::BufReader::new(out).lines();
            match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
                Ok(Ok(Some(_))) => {}
                _ => bail!(
                    "worker {i} did not start within 30s; see {}",
                    log_path.display()
                ),
            }
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        }
    }

    let mut client = connect(url).await?;
    wait_for_workers(&mut client, plan.world + plan.spares, workers).await?;
    let submitted = client
        .submit_job(pb::SubmitJobRequest {
            manifest_yaml: plan.manifest.clone(),
            origin: plan.origin.clone(),
            overrides: plan.sets.clone(),
            resume: plan.resume.clone(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("submitting {}: {}", plan.origin, s.message()))?
        .into_inner();
    let name = submitted.job.map_or(plan.name.clone(), |j| j.name);
    follow(args, plan, &name, &mut client, workers).await
}

async fn connect(url: &str) -> anyhow::Result<CoordinatorClient<Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match endpoint.connect().await {
            Ok(c) => return Ok(CoordinatorClient::new(c)),
            Err(e) if Instant::now() > deadline => {
                bail!("cannot reach the embedded coordinator at {url}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn wait_for_workers(
    client: &mut CoordinatorClient<Channel>,
    world: u32,
    workers: &mut Workers,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = client
            .list_workers(pb::ListWorkersRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("listing workers: {}", s.message()))?
            .into_inner();
        if listed.workers.len() >= world as usize {
            return Ok(());
        }
        if let Some(why) = workers.exited() {
            bail!("{why} before registering");
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {world} workers registered within 60s",
                listed.workers.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Follows the job's steps until it ends (or Ctrl-C), then writes the summary.
async fn follow(
    args: &Args,
    plan: &Plan,
    name: &str,
    client: &mut CoordinatorClient<Channel>,
    workers: &mut Workers,
) -> anyhow::Result<ExitCode> {
    let bar = if args.no_progress {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(plan.steps)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} step {pos}/{len} | {msg} | elapsed {elapsed} | ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(format!("placing {} ranks", plan.world));
    // A resumed job's first step is the one after its checkpoint's.
    let first = plan.first_step();
    bar.set_position(first);
    let started = Instant::now();
    let mut steps: Vec<pb::StepSummary> = Vec::new();
    let mut last_progress = Instant::now();
    let mut interrupted = false;
    // Restarts seen so far (their reasons), and the phase and event seen last.
    let mut restarts: Vec<String> = Vec::new();
    let mut last_phase = pb::JobPhase::Unspecified;
    let mut next_event = 0u64;
    // Ctrl-C, or SIGTERM from a supervisor: cancel the job and shut everything down in order.
    let stop_signal = async {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = term => {}
        }
    };
    tokio::pin!(stop_signal);
    let final_job = loop {
        tokio::select! {
            () = &mut stop_signal, if !interrupted => {
                interrupted = true;
                bar.println("local: interrupted — cancelling the job and shutting down (Ctrl-C again to abort)");
                let _ = client.cancel_job(pb::CancelJobRequest {
                    name: name.to_string(),
                    reason: "interrupted (Ctrl-C or SIGTERM) in `moetrain local`".into(),
                }).await;
                tokio::spawn(async {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        std::process::exit(130);
                    }
                });
            }
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let resp = client
            .job_steps(pb::JobStepsRequest {
                name: name.to_string(),
                from_step: first + steps.len() as u64,
                limit: 0,
            })
            .await
            .map_err(|s| anyhow::anyhow!("following job {name}: {}", s.message()))?
            .into_inner();
        let job = resp.job.clone().unwrap_or_default();
        let phase = pb::JobPhase::try_from(job.phase).unwrap_or(pb::JobPhase::Unspecified);
        // A restart sends the progress back to the restart point: the steps after it are trained
        // again, and followed again.
        let done = job.progress.as_ref().map_or(0, |p| p.step);
        let went_back = done < first + steps.len() as u64;
        if phase != last_phase || went_back {
            last_phase = phase;
            for reason in new_restarts(client, name, &mut next_event).await? {
                let line = format!("local: job {name}: {reason}");
                if args.no_progress {
                    eprintln!("{line}");
                } else {
                    bar.println(line);
                }
                restarts.push(reason);
                last_progress = Instant::now();
            }
        }
        if went_back {
            steps.truncate(done.saturating_sub(first) as usize);
            bar.set_position(first + steps.len() as u64);
            bar.set_message(format!(
                "restarting from step {}",
                first + steps.len() as u64
            ));
            continue;
        }
        for s in resp.steps {
            if s.step != first + steps.len() as u64 {
                continue;
            }
            let loss = |n: &str| {
                s.losses
                    .iter()
                    .find(|l| l.name == n)
                    .map_or(f64::NAN, |l| l.value)
            };
            let tps = if s.step_seconds > 0.0 {
                s.tokens as f64 / s.step_seconds
            } else {
                0.0
            };
            let msg = if s.losses.is_empty() {
                format!("simulated step {:.3}s | {tps:.0} tok/s", s.step_seconds)
            } else {
                format!(
                    "loss {:.4} (main {:.4}) | {tps:.0} tok/s",
                    loss("total"),
                    loss("main"),
                )
            };
            if args.no_progress {
                eprintln!(
                    "step {}/{} | {msg} | lr {:.2e} | gnorm {:.3}",
                    s.step + 1,
                    plan.steps,
                    s.lr,
                    s.grad_norm
                );
            }
            bar.set_message(msg);
            bar.set_position(s.step + 1);
            steps.push(s);
            last_progress = Instant::now();
        }
        if phase.is_terminal() {
            // Restarts not seen yet while following (a restart and the end between two polls).
            restarts.extend(new_restarts(client, name, &mut next_event).await?);
            break job;
        }
        if steps.is_empty() && phase == pb::JobPhase::Running && bar.position() == first {
            bar.set_message("building the model shards".to_string());
        }
        if let Some(why) = workers.exited() {
            if args.no_progress {
                eprintln!("local: {why}");
            } else {
                bar.println(format!("local: {why}"));
            }
        }
        if last_progress.elapsed() > args.stall_timeout {
            let _ = client
                .cancel_job(pb::CancelJobRequest {
                    name: name.to_string(),
                    reason: format!("no step finished for {:?}", args.stall_timeout),
                })
                .await;
            bar.abandon();
            bail!(
                "job {name} made no progress for {:?} (phase {}); see the worker logs in {}",
                args.stall_timeout,
                phase.name(),
                plan.run_dir.join("logs").display()
            );
        }
    };
    bar.finish_and_clear();
    let wall_s = started.elapsed().as_secs_f64();
    // The worker holding rank 0 writes the committed checkpoint's index when the coordinator
    // tells it, just before the job ends: give it a moment before the workers are stopped.
    if let Some(c) = &final_job.last_checkpoint {
        let index = Path::new(&c.dir).join("checkpoint.json");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !index.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !index.exists() {
            eprintln!(
                "local: {} has no checkpoint.json: the checkpoint is incomplete",
                c.dir
            );
        }
    }
    let phase = pb::JobPhase::try_from(final_job.phase).unwrap_or(pb::JobPhase::Unspecified);
    let summary = summary(plan, &steps, &final_job, wall_s, interrupted);
    // The coordinator's count is the authority; the reasons were printed as they came.
    let restart_count = final_job.restarts as usize;
    write_summary(&summary, restart_count, &plan.summary)
        .with_context(|| format!("writing {}", plan.summary.display()))?;
    let first = steps.first().and_then(total);
    println!(
        "job {name} {} after {} steps ({}){} | loss {} -> {} | {:.0} tokens/s | {:.1}s | summary {}{}",
        phase.name(),
        steps.len(),
        plan.precision,
        match restart_count {
            0 => String::new(),
            1 => " and 1 restart".to_owned(),
            n => format!(" and {n} restarts"),
        },
        first.map_or("-".into(), |l| format!("{l:.4}")),
        summary.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.tokens_per_s,
        wall_s,
        plan.summary.display(),
        summary
            .final_checkpoint
            .as_deref()
            .map_or(String::new(), |c| format!(" | checkpoint {c}")),
    );
    if steps.len() > 1 && summary.steps.iter().any(|s| s.step_time_s > 0.0) {
        // Coordinator-owned balancing costs each step one round trip (reports in, bias out).
        let rest = &summary.steps[1..];
        let wait: f64 = rest.iter().map(|s| s.bias_wait_s).sum();
        let step: f64 = rest.iter().map(|s| s.step_time_s).sum();
        println!(
            "routing bias from the coordinator: {:.1} ms per step ({:.2}% of the step time)",
            1e3 * wait / rest.len() as f64,
            100.0 * wait / step.max(1e-12)
        );
    }
    match phase {
        pb::JobPhase::Succeeded => Ok(ExitCode::SUCCESS),
        pb::JobPhase::Cancelled if interrupted => Ok(ExitCode::from(130)),
        _ => {
            eprintln!(
                "local: job {name} ended {}: {}; worker logs in {}",
                phase.name(),
                final_job.reason,
                plan.run_dir.join("logs").display()
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// The reasons of the job's `JobRestarting` events from event `next` on; moves `next` past the
/// events read.
async fn new_restarts(
    client: &mut CoordinatorClient<Channel>,
    name: &str,
    next: &mut u64,
) -> anyhow::Result<Vec<String>> {
    let described = client
        .describe_job(pb::DescribeJobRequest {
            name: name.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("describing job {name}: {}", s.message()))?
        .into_inner();
    let mut out = Vec::new();
    let from = *next;
    for e in described.events.iter().filter(|e| e.seq >= from) {
        if e.kind == "JobRestarting" {
            out.push(e.message.clone());
        }
        *next = e.seq + 1;
    }
    Ok(out)
}

/// Writes `summary.json`: the summary `train --single` writes, plus the run's restart count.
fn write_summary(summary: &Summary, restarts: usize, path: &Path) -> anyhow::Result<()> {
    let mut value = serde_json::to_value(summary).context("encoding the summary")?;
    if let Some(map) = value.as_object_mut() {
        map.insert("restarts".into(), restarts.into());
    }
    let text = serde_json::to_string_pretty(&value).context("encoding the summary")?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, text)?;
    Ok(())
}

/// The step's total loss (none on simulated devices).
fn total(s: &pb::StepSummary) -> Option<f64> {
    s.losses.iter().find(|l| l.name == "total").map(|l| l.value)
}

/// The run's summary in the format `train --single` writes (`mode: "local"`).
fn summary(
    plan: &Plan,
    steps: &[pb::StepSummary],
    job: &pb::Job,
    wall_s: f64,
    interrupted: bool,
) -> Summary {
    let first = plan.first_step();
    // Tokens trained before the first step: the saved ledger's count, else whole steps.
    let mut seen = plan
        .resume
        .as_ref()
        .and_then(|r| r.ledger.as_ref())
        .map_or_else(
            || first * steps.first().map_or(0, |s| s.tokens),
            |l| l.tokens_seen,
        );
    let records: Vec<StepRecord> = steps
        .iter()
        .map(|s| {
            // The same γ rule the coordinator applies after the step (tokens seen before it).
            let bias_gamma = plan.bias_speed.gamma(seen);
            seen += s.tokens;
            let loss = |n: &str| {
                s.losses
                    .iter()
                    .find(|l| l.name == n)
                    .map_or(0.0, |l| l.value)
            };
            StepRecord {
                step: s.step,
                lr: s.lr as f32,
                loss: LossTerms {
                    main: loss("main"),
                    mtp: loss("mtp"),
                    balance: loss("balance"),
                    total: loss("total"),
                },
                grad_norm: s.grad_norm,
                bias_gamma,
                tokens: s.tokens,
                step_time_s: s.step_seconds,
                bias_wait_s: s.bias_wait_seconds,
                tokens_per_s: if s.step_seconds > 0.0 {
                    s.tokens as f64 / s.step_seconds
                } else {
                    0.0
                },
                time: TimeSplit::default(),
                expert_load: s
                    .layer_loads
                    .iter()
                    .map(|l| LayerLoad {
                        layer: l.layer as usize,
                        max: l.max,
                        mean: l.mean,
                    })
                    .collect(),
            }
        })
        .collect();
    let tokens: u64 = steps.iter().map(|s| s.tokens).sum();
    let step_time: f64 = steps.iter().map(|s| s.step_seconds).sum();
    let checkpoint = job.last_checkpoint.as_ref().map(|c| c.dir.clone());
    Summary {
        mode: "local".into(),
        job: plan.job_json.clone(),
        model: plan.model_json.clone(),
        precision: plan.precision.clone(),
        start_step: first,
        end_step: first + steps.len() as u64,
        stopped_early: interrupted || first + (steps.len() as u64) < plan.steps,
        final_loss: steps.last().and_then(total),
        final_eval_loss: None,
        final_eval_main_loss: None,
        tokens,
        wall_s,
        tokens_per_s: if step_time > 0.0 {
            tokens as f64 / step_time
        } else {
            0.0
        },
        checkpoints: checkpoint.iter().cloned().collect(),
        final_checkpoint: checkpoint,
        steps: records,
    }
}
