//! Helpers for multi-process end-to-end scenarios: locate the `moetrain` binary, start etcd on
//! free loopback ports in a temporary directory, start coordinators and workers as real
//! processes, run CLI commands with a deadline and parse their JSON output.
//!
//! Invariants: every wait has a deadline and fails with a message naming what was awaited; every
//! child process is owned by a [`ChildGuard`] that kills and reaps it on drop, so a failing
//! assertion never leaves etcd, a coordinator or a worker running.

use anyhow::{Context as _, bail};
use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default deadline for one CLI invocation.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// The `moetrain` binary built next to this test executable (`target/<profile>/moetrain`), or
/// `MOETRAIN_BIN` when set. `cargo test --workspace` builds it because the `moetrain` package
/// has integration tests; `cargo test -p e2e` alone needs `cargo build -p moetrain` first.
pub fn moetrain_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("MOETRAIN_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    // The test executable lives in target/<profile>/deps/.
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target/<profile> directory")?;
    let bin = profile_dir.join("moetrain");
    if !bin.is_file() {
        bail!(
            "{} does not exist: build it with `cargo build -p moetrain` (cargo test --workspace does) \
             or point MOETRAIN_BIN at it",
            bin.display()
        );
    }
    Ok(bin)
}

/// A free TCP port on 127.0.0.1 (bound, read and released; a tiny race is accepted for etcd, which
/// cannot take port 0).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(l.local_addr()
        .context("reading the probe socket's address")?
        .port())
}

/// Polls `f` every `every` until it returns `Some`, or fails after `timeout` naming `what`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(every);
    }
}

/// Owns one child process: SIGKILLs and reaps it on drop. Its stdout lines are collected by a
/// reader thread (so the pipe never fills); stderr goes to a log file for post-mortems.
pub struct ChildGuard {
    /// What this process is, for error messages.
    name: String,
    /// `None` once the process has been reaped.
    child: Option<Child>,
    /// Every stdout line so far, appended by the reader thread until the pipe closes.
    stdout: Arc<Mutex<Vec<String>>>,
    /// Where stderr goes.
    log: PathBuf,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout captured and stderr written to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("creating log file {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            let lines = Arc::clone(&stdout);
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(mut v) = lines.lock() {
                        v.push(line);
                    }
                }
            });
        }
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            stdout,
            log: log.to_owned(),
        })
    }

    /// The OS process id, if still running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The stdout lines read so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The stderr log so far (for assertion messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the stderr log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until a stdout line satisfies `pick`, returning what it extracted.
    pub fn wait_stdout<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> anyhow::Result<T> {
        let name = self.name.clone();
        let res = wait_for(what, timeout, Duration::from_millis(20), || {
            for line in self.stdout_lines() {
                if let Some(v) = pick(&line) {
                    return Ok(Some(v));
                }
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait().context("polling child")?
            {
                bail!("{name} exited with {status} before printing {what}");
            }
            Ok(None)
        });
        res.with_context(|| format!("{}; stderr tail:\n{}", self.name, self.log_tail(30)))
    }

    /// Sends `signal` (a `kill` name such as `TERM`, `KILL`, `INT`) to the process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let Some(pid) = self.pid() else {
            bail!("{} already exited", self.name)
        };
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -{signal} {pid} ({}) failed: {status}", self.name);
        }
        Ok(())
    }

    /// Sends SIGTERM and waits up to `grace` for a clean exit; returns the exit code, or kills the
    /// process and fails if it did not stop in time.
    pub fn terminate(&mut self, grace: Duration) -> anyhow::Result<Option<i32>> {
        self.signal("TERM")?;
        let name = self.name.clone();
        let code = wait_for(
            &format!("{name} to exit after SIGTERM"),
            grace,
            Duration::from_millis(20),
            || {
                let Some(c) = self.child.as_mut() else {
                    bail!("no child")
                };
                Ok(c.try_wait().context("polling child")?.map(|s| s.code()))
            },
        );
        match code {
            Ok(code) => {
                self.child = None;
                Ok(code)
            }
            Err(e) => {
                self.kill();
                Err(e)
            }
        }
    }

    /// SIGKILLs and reaps the process (no-op if it already exited).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A throwaway etcd server on free loopback ports with its data in a temporary directory.
pub struct Etcd {
    /// The server process; killed on drop before `dir` is removed.
    process: ChildGuard,
    /// `127.0.0.1:PORT` for clients.
    pub endpoint: String,
    /// Data directory and log; removed on drop.
    _dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and waits (at most 20 s) until it answers `endpoint health`.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating etcd temp dir")?;
        let client = free_port()?;
        let peer = free_port()?;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg("e2e")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("e2e={peer_url}"))
            .arg("--log-level")
            .arg("error");
        let process = ChildGuard::spawn("etcd", cmd, &dir.path().join("etcd.log"))
            .context("is Debian's etcd-server installed? (README's test command installs it)")?;
        let endpoint = format!("127.0.0.1:{client}");
        let etcd = Self {
            process,
            endpoint,
            _dir: dir,
        };
        wait_for(
            "etcd to become healthy",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || {
                let out = Command::new("etcdctl")
                    .env("ETCDCTL_API", "3")
                    .arg(format!("--endpoints={}", etcd.endpoint))
                    .arg("--dial-timeout=1s")
                    .arg("--command-timeout=1s")
                    .arg("endpoint")
                    .arg("health")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .context("running etcdctl")?;
                Ok(out.success().then_some(()))
            },
        )
        .with_context(|| format!("etcd log:\n{}", etcd.process.log_tail(30)))?;
        Ok(etcd)
    }
}

/// Which store a coordinator uses.
#[derive(Clone, Debug)]
pub enum Store {
    /// The embedded in-memory store: state dies with the process.
    Memory,
    /// etcd at this endpoint list.
    Etcd(String),
}

/// A scratch directory for one scenario: the stderr log of every process lands here. Failing
/// waits quote the relevant log tails in their errors; set `MOETRAIN_E2E_KEEP=1` to keep the
/// whole directory (its path is printed).
pub struct Scratch {
    /// The directory; removed on drop unless kept.
    dir: Option<tempfile::TempDir>,
    /// Its path.
    path: PathBuf,
}

impl Scratch {
    /// A new empty scratch directory.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("moetrain-e2e-")
            .tempdir()
            .context("creating scratch dir")?;
        let path = dir.path().to_owned();
        Ok(Self {
            dir: Some(dir),
            path,
        })
    }

    /// A path inside the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("MOETRAIN_E2E_KEEP").is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("e2e logs kept in {}", dir.keep().display());
        }
    }
}

/// Extracts `host:port` from a line such as `coordinator listening on 127.0.0.1:7070` or one
/// containing `http://127.0.0.1:7070`.
pub fn parse_addr(line: &str) -> Option<SocketAddr> {
    line.split_whitespace().find_map(|tok| {
        let tok = tok
            .trim_start_matches("http://")
            .trim_matches(|c: char| c == '"' || c == ',');
        tok.parse::<SocketAddr>().ok()
    })
}

/// A running coordinator process.
pub struct Coordinator {
    /// The process.
    pub process: ChildGuard,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Coordinator {
    /// Starts `moetrain coordinator --listen LISTEN [--etcd EP] EXTRA..` and waits (at most 30 s)
    /// for it to print its bound address on stdout.
    pub fn start(
        scratch: &Scratch,
        log_name: &str,
        listen: &str,
        store: &Store,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(moetrain_bin()?);
        cmd.arg("coordinator").arg("--listen").arg(listen);
        if let Store::Etcd(ep) = store {
            cmd.arg("--etcd").arg(ep);
        }
        cmd.args(extra);
        cmd.env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let mut process = ChildGuard::spawn("coordinator", cmd, &scratch.path(log_name))?;
        let addr = process.wait_stdout(
            "the coordinator's bound address",
            Duration::from_secs(30),
            parse_addr,
        )?;
        Ok(Self { process, addr })
    }

    /// `http://ADDR`, for `--coordinator`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Starts `moetrain worker` offering one CPU device, index `device` on `node`.
pub fn start_worker(
    scratch: &Scratch,
    coordinator_url: &str,
    node: &str,
    worker_id: &str,
    device: u32,
) -> anyhow::Result<ChildGuard> {
    let mut cmd = Command::new(moetrain_bin()?);
    cmd.arg("worker")
        .arg("--coordinator")
        .arg(coordinator_url)
        .arg("--node")
        .arg(node)
        .arg("--worker-id")
        .arg(worker_id)
        .arg("--devices")
        .arg("1")
        .arg("--first-device")
        .arg(device.to_string())
        .arg("--device-kind")
        .arg("cpu")
        .arg("--data-plane-listen")
        .arg("127.0.0.1:0")
        .arg("--max-backoff")
        .arg("1s")
        .arg("--threads")
        .arg("1");
    cmd.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    let log = scratch.path(&format!("worker-{}.log", worker_id.replace('/', "-")));
    ChildGuard::spawn(&format!("worker {worker_id}"), cmd, &log)
}

/// The result of one CLI invocation.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Captured stdout.
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
}

/// Runs `moetrain ARGS..` and waits at most `timeout`; the process is killed if it overruns.
pub fn cli_with_timeout(args: &[&str], timeout: Duration) -> anyhow::Result<CliOutput> {
    let mut child = Command::new(moetrain_bin()?)
        .args(args)
        .env_remove("MOETRAIN_COORDINATOR")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning moetrain {args:?}"))?;
    // Readers on their own threads so a large output never blocks the child.
    let mut out = child.stdout.take().context("no stdout pipe")?;
    let mut err = child.stderr.take().context("no stderr pipe")?;
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().context("polling moetrain")? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("moetrain {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Ok(CliOutput {
        code: status.code(),
        stdout,
        stderr,
    })
}

/// Runs `moetrain ARGS..` with [`CLI_TIMEOUT`].
pub fn cli(args: &[&str]) -> anyhow::Result<CliOutput> {
    cli_with_timeout(args, CLI_TIMEOUT)
}

/// Runs `moetrain ARGS.. --output json`, requires exit code 0 and parses stdout.
pub fn cli_json(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--output", "json"]);
    let out = cli(&full)?;
    if out.code != Some(0) {
        bail!(
            "moetrain {full:?} exited with {:?}: {}",
            out.code,
            out.stderr.trim()
        );
    }
    serde_json::from_str(&out.stdout)
        .with_context(|| format!("parsing JSON from moetrain {full:?}: {}", out.stdout))
}

/// The repository root (for `manifests/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Looks up `key` in a JSON object as a string, or fails naming the key and the object.
pub fn str_field<'a>(v: &'a serde_json::Value, key: &str) -> anyhow::Result<&'a str> {
    v.get(key)
        .and_then(serde_json::Value::as_str)
        .with_context(|| format!("no string `{key}` in {v}"))
}

/// A coordinator and its workers, started together.
pub struct Cluster {
    /// The coordinator process (replaced by [`Cluster::restart_coordinator`]).
    pub coordinator: Coordinator,
    /// Worker processes by id, in start order.
    pub workers: Vec<(String, ChildGuard)>,
    /// The store the coordinator uses.
    pub store: Store,
    /// Restarts counted, for log names.
    restarts: u32,
}

/// Extra coordinator flags every scenario uses: a 2 s failure timeout keeps liveness tests short.
pub const COORDINATOR_FLAGS: [&str; 4] =
    ["--heartbeat-interval", "200ms", "--failure-timeout", "2s"];

impl Cluster {
    /// Starts a coordinator on a free port and `nodes × devices_per_node` single-device worker
    /// processes (worker id `nodeN/D`), then waits until all of them are registered and connected.
    pub fn start(
        scratch: &Scratch,
        store: Store,
        nodes: u32,
        devices_per_node: u32,
    ) -> anyhow::Result<Self> {
        let coordinator = Coordinator::start(
            scratch,
            "coordinator-0.log",
            "127.0.0.1:0",
            &store,
            &COORDINATOR_FLAGS,
        )?;
        let url = coordinator.url();
        let mut workers = Vec::new();
        for n in 0..nodes {
            for d in 0..devices_per_node {
                let node = format!("node{n}");
                let id = format!("{node}/{d}");
                let child = start_worker(scratch, &url, &node, &id, d)?;
                workers.push((id, child));
            }
        }
        let cluster = Self {
            coordinator,
            workers,
            store,
            restarts: 0,
        };
        cluster.wait_workers(
            "all workers registered and connected",
            Duration::from_secs(60),
            |ws| {
                ws.len() == (nodes * devices_per_node) as usize
                    && ws
                        .iter()
                        .all(|w| w["connected"] == true && w["state"] == "Idle")
            },
        )?;
        Ok(cluster)
    }

    /// `--coordinator URL` arguments.
    pub fn url(&self) -> String {
        self.coordinator.url()
    }

    /// `moetrain ARGS.. --coordinator URL --output json`.
    pub fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let url = self.url();
        let mut full = args.to_vec();
        full.extend(["--coordinator", url.as_str()]);
        cli_json(&full)
    }

    /// `moetrain ARGS.. --coordinator URL` (any exit code).
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<CliOutput> {
        let url = self.url();
        let mut full = args.to_vec();
        full.extend(["--coordinator", url.as_str()]);
        cli(&full)
    }

    /// Polls `get workers -o json` until `pred` holds.
    pub fn wait_workers(
        &self,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&[serde_json::Value]) -> bool,
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        wait_for(what, timeout, Duration::from_millis(200), || {
            let v = self.json(&["get", "workers"])?;
            let ws = v
                .as_array()
                .cloned()
                .with_context(|| format!("get workers is not a list: {v}"))?;
            Ok(pred(&ws).then_some(ws))
        })
        .with_context(|| {
            format!(
                "coordinator stderr tail:\n{}",
                self.coordinator.process.log_tail(40)
            )
        })
    }

    /// Polls `describe job NAME -o json` until `pred` holds.
    pub fn wait_job(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        wait_for(what, timeout, Duration::from_millis(200), || {
            let v = self.json(&["describe", "job", name])?;
            Ok(pred(&v).then_some(v))
        })
        .with_context(|| {
            format!(
                "coordinator stderr tail:\n{}",
                self.coordinator.process.log_tail(40)
            )
        })
    }

    /// Kills the coordinator (SIGKILL: no goodbye) and starts a new one on the same address and
    /// store; returns how long the new one took to print its address.
    pub fn restart_coordinator(&mut self, scratch: &Scratch) -> anyhow::Result<()> {
        let listen = self.coordinator.addr.to_string();
        self.coordinator.process.kill();
        self.restarts += 1;
        let log = format!("coordinator-{}.log", self.restarts);
        // The old socket may linger for a moment; retry the bind for a few seconds.
        let coordinator = wait_for(
            "the coordinator to restart on its old address",
            Duration::from_secs(15),
            Duration::from_millis(200),
            || match Coordinator::start(scratch, &log, &listen, &self.store, &COORDINATOR_FLAGS) {
                Ok(c) => Ok(Some(c)),
                Err(e) => Err(e),
            },
        )?;
        self.coordinator = coordinator;
        Ok(())
    }

    /// The worker process with this id.
    pub fn worker_mut(&mut self, id: &str) -> anyhow::Result<&mut ChildGuard> {
        self.workers
            .iter_mut()
            .find(|(w, _)| w == id)
            .map(|(_, c)| c)
            .with_context(|| format!("no worker {id}"))
    }
}

/// The phase of the job in a `describe job` JSON document.
pub fn phase(describe: &serde_json::Value) -> &str {
    describe["job"]["phase"].as_str().unwrap_or("")
}

/// Requires one step of a `moetrain local` summary (`got`) to equal another run's same step
/// (`want`) bit for bit in every value training produced: losses, gradient norm, learning rate,
/// tokens, expert loads and the bias update's γ. serde_json prints an f64 as its shortest exact
/// round trip, so equal JSON values are equal bits. `what` names the comparison in the error.
pub fn same_step_values(
    what: &str,
    got: &serde_json::Value,
    want: &serde_json::Value,
) -> anyhow::Result<()> {
    let step = &got["step"];
    if want["step"] != *step {
        bail!("{what}: step {step} against {}", want["step"]);
    }
    for key in [
        "loss",
        "grad_norm",
        "lr",
        "tokens",
        "expert_load",
        "bias_gamma",
    ] {
        if got[key] != want[key] {
            bail!(
                "{what}: step {step}: {key} {}, against {}",
                got[key],
                want[key]
            );
        }
    }
    Ok(())
}
