//! Automatic recovery through the real daemons (`spec.faultTolerance.restartBudget` and
//! `spareWorkers`): `moetrain local` on the micro job (pipeline 4 × data 2 × expert 2, DualPipe,
//! MoE with MTP; 40 steps, a checkpoint every 2) with one spare worker. The worker holding rank 3
//! is SIGKILLed (or, in a second run, SIGSTOPped: then liveness loses it) once the checkpoint after
//! step 1 is committed; the coordinator restarts the job from its last committed checkpoint on the
//! survivors and the spare, and the job Succeeds. Every step's loss terms, gradient norm, learning
//! rate and expert loads equal, bit for bit, those of an uninterrupted run of the same job (resume
//! is bitwise: a step's batch is a pure function of (seed, step), each rank restores exactly what
//! it saved, and the ledger restarts from the bias saved with the checkpoint), and `summary.json`
//! counts one restart.

use anyhow::{Context as _, bail, ensure};
use e2e::{
    ChildGuard, Scratch, cli_json, cli_with_timeout, moetrain_bin, repo_root, same_step_values,
    wait_for,
};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Enough steps that the job is still training when the kill lands (a micro step takes tens of
/// milliseconds, a `describe` and a `kill` about as long as a few).
const STEPS: u64 = 40;

/// The arguments of `moetrain local micro.yaml` for this scenario, writing into `run_dir`.
fn local_args(run_dir: &Path, spares: u32) -> anyhow::Result<Vec<String>> {
    let manifest = repo_root().join("manifests/micro.yaml");
    let manifest = manifest.to_str().context("manifest path is not UTF-8")?;
    let dir = run_dir.to_str().context("run dir is not UTF-8")?;
    Ok([
        "local",
        manifest,
        "--steps",
        &STEPS.to_string(),
        "--set",
        &format!("spec.checkpointing.dir={dir}"),
        "--set",
        "spec.checkpointing.interval=2",
        "--set",
        &format!("spec.faultTolerance.spareWorkers={spares}"),
        "--threads",
        "1",
        "--no-progress",
        "--run-dir",
        dir,
    ]
    .map(String::from)
    .to_vec())
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// The pids of `parent`'s child processes whose command line contains every one of `args`.
fn children_with(parent: u32, args: &[&str]) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised command name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid != Some(parent) {
                return false;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let words: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.iter().all(|a| words.contains(&a.as_bytes()))
        })
        .collect()
}

/// Whether process `pid` has exited (gone, or a zombie not reaped yet).
fn exited(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z")
    })
}

/// `moetrain local` run as a child; on drop its worker processes are killed too (they are in
/// their own process groups, so a SIGKILL of `local` alone would leave them running).
struct LocalRun {
    local: ChildGuard,
    pid: u32,
}

impl Drop for LocalRun {
    fn drop(&mut self) {
        for pid in children_with(self.pid, &["worker"]) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        self.local.kill();
    }
}

/// The outcome of one recovered run: its summary and the restart line it printed.
struct Recovered {
    summary: serde_json::Value,
    restart: String,
}

/// Runs the job with one spare worker in `scratch/<name>`, sends `signal` (`KILL` or `STOP`) to
/// the worker holding rank 3 once the checkpoint after step 1 is committed, and waits for the run
/// to end. Requires exactly one restart and a successful run.
fn recovered_run(scratch: &Scratch, name: &str, signal: &str) -> anyhow::Result<Recovered> {
    let run_dir = scratch.path(name);
    let mut cmd = Command::new(moetrain_bin()?);
    cmd.args(local_args(&run_dir, 1)?).env("RUST_LOG", "warn");
    let log = scratch.path(&format!("{name}.log"));
    let local = ChildGuard::spawn("moetrain local", cmd, &log)?;
    let pid = local.pid().context("moetrain local exited at once")?;
    let mut run = LocalRun { local, pid };
    let url = wait_for(
        "the coordinator's address in local's output",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            Ok(text
                .split_whitespace()
                .find(|w| w.starts_with("http://"))
                .map(str::to_owned))
        },
    )?;
    let committed = run_dir.join("step-00000002").join("checkpoint.json");
    wait_for(
        "the checkpoint after step 1 to be committed",
        Duration::from_secs(300),
        Duration::from_millis(50),
        || {
            if exited(pid) {
                bail!("moetrain local exited");
            }
            Ok(committed.exists().then_some(()))
        },
    )
    .with_context(|| run.local.log_tail(30))?;
    let d = cli_json(&["describe", "job", "micro", "--coordinator", &url])?;
    let victim = d["placement"]["ranks"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["rank"] == 3))
        .and_then(|r| r["worker_id"].as_str())
        .with_context(|| format!("no holder of rank 3 in {}", d["placement"]))?
        .to_owned();
    let pids = children_with(pid, &["worker", "--worker-id", &victim]);
    ensure!(pids.len() == 1, "worker {victim}: pids {pids:?}");
    let victim_pid = pids[0].to_string();
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &victim_pid])
        .status()?;
    ensure!(status.success(), "kill -{signal} {victim_pid}");
    eprintln!(
        "{name}: sent SIG{signal} to worker {victim} (pid {victim_pid}), the holder of rank 3"
    );

    // Its last stdout line says how the job ended; then it stops the workers and exits.
    let end = run
        .local
        .wait_stdout("the job's end", Duration::from_secs(400), |l| {
            l.starts_with("job micro ").then(|| l.to_owned())
        });
    // A stopped worker would ignore local's SIGTERM: it goes now.
    if signal == "STOP" {
        let _ = Command::new("kill").args(["-KILL", &victim_pid]).status();
    }
    let end = end?;
    let code = run.local.terminate(Duration::from_secs(30))?;
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    ensure!(
        end.starts_with(&format!("job micro Succeeded after {STEPS} steps"))
            && end.contains("and 1 restart"),
        "{name}: {end}\nstderr:\n{stderr}"
    );
    ensure!(
        code == Some(0),
        "{name}: the recovered run exited {code:?}\nstderr:\n{stderr}"
    );
    let restart = stderr
        .lines()
        .find(|l| l.starts_with("local: job micro: restart 1 of 3 after"))
        .with_context(|| format!("{name}: local printed no restart:\n{stderr}"))?
        .to_owned();
    eprintln!("{name}: {restart}");
    ensure!(
        restart.contains("; resuming from the checkpoint after step"),
        "{name}: the restart did not resume from a checkpoint: {restart}"
    );
    ensure!(
        !stderr.contains("restart 2 of 3"),
        "{name}: the job restarted more than once:\n{stderr}"
    );
    let summary = read_json(&run_dir.join("summary.json"))?;
    Ok(Recovered { summary, restart })
}

/// Requires every step of `got` to equal `want`'s bit for bit.
fn same_steps(what: &str, got: &serde_json::Value, want: &serde_json::Value) -> anyhow::Result<()> {
    ensure!(
        got["restarts"] == 1,
        "{what}: summary restarts {}",
        got["restarts"]
    );
    ensure!(
        got["start_step"] == 0 && got["end_step"] == STEPS,
        "{what}: the summary covers {}..{}",
        got["start_step"],
        got["end_step"]
    );
    let want_steps = want["steps"].as_array().context("steps")?;
    let got_steps = got["steps"].as_array().context("steps")?;
    ensure!(
        got_steps.len() as u64 == STEPS && want_steps.len() as u64 == STEPS,
        "{what}: {} and {} steps in the summaries",
        got_steps.len(),
        want_steps.len()
    );
    for (g, w) in got_steps.iter().zip(want_steps) {
        same_step_values(&format!("{what}, after the restart vs uninterrupted"), g, w)?;
    }
    Ok(())
}

/// One uninterrupted run, then two runs that lose the holder of rank 3 after the checkpoint of
/// step 1: SIGKILLed (its neighbours' data planes see the connection drop and their ranks fail),
/// and SIGSTOPped (its neighbours wait on it; the coordinator's liveness loses it after the
/// failure timeout and stops the waiting ranks). Both restart once from a checkpoint on the
/// survivors and the spare and train every step exactly as the uninterrupted run.
#[test]
fn a_lost_worker_is_replaced_by_the_spare_and_the_job_trains_on_bit_for_bit() -> anyhow::Result<()>
{
    let scratch = Scratch::new()?;
    let full = scratch.path("full");
    let args = local_args(&full, 0)?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cli_with_timeout(&args, Duration::from_secs(300))?;
    ensure!(
        out.code == Some(0),
        "the uninterrupted run exited {:?}\nstderr:\n{}",
        out.code,
        out.stderr
    );
    let want = read_json(&full.join("summary.json"))?;
    ensure!(
        want["restarts"] == 0,
        "uninterrupted restarts: {}",
        want["restarts"]
    );

    let killed = recovered_run(&scratch, "killed", "KILL")?;
    same_steps("SIGKILL", &killed.summary, &want)?;

    let frozen = recovered_run(&scratch, "frozen", "STOP")?;
    ensure!(
        frozen.restart.contains("(rank 3) lost: silent for"),
        "the frozen worker was not lost by liveness: {}",
        frozen.restart
    );
    same_steps("SIGSTOP", &frozen.summary, &want)?;
    Ok(())
}
