//! Load run (issue 2, acceptance 5): N simulated workers (default 1000), each on its own
//! connection and session stream, register with one coordinator process on loopback and
//! heartbeat once a second. Reports p50/p99/max heartbeat round trip (send → `HeartbeatAck`,
//! which includes the coordinator's handling: liveness bookkeeping and the ack) and the
//! coordinator's CPU time over the measured window, read from `/proc/PID/stat`.
//!
//! Not a timed test: run it by hand, e.g.
//! `cargo build --release -p moetrain && cargo bench -p e2e --bench heartbeat_load -- --workers 1000 --seconds 30`
//! (or point `MOETRAIN_BIN` at any build of the binary). The coordinator uses the in-memory store.

use anyhow::{Context as _, bail};
use e2e::{Coordinator, Scratch, Store};
use proto::pb;
use proto::pb::coordinator_message::Msg as Down;
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

/// Command-line knobs.
struct Opts {
    /// Simulated workers.
    workers: usize,
    /// Measured window after warm-up.
    seconds: u64,
    /// Heartbeat period asked of the coordinator (`--heartbeat-interval`).
    interval: Duration,
}

fn opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        workers: 1000,
        seconds: 20,
        interval: Duration::from_secs(1),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--workers" => o.workers = args.next().context("--workers N")?.parse()?,
            "--seconds" => o.seconds = args.next().context("--seconds S")?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument {other} (use --workers N --seconds S)"),
        }
    }
    Ok(o)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).context("reading /proc/PID/stat")?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    // CLK_TCK is 100 on Linux x86-64.
    Ok(ticks as f64 / 100.0)
}

/// Resident memory of a process in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb / 1024.0)
}

/// One simulated worker: register, then heartbeat every `interval` until `stop` turns true;
/// returns (send time, round trip in µs) of every acknowledged heartbeat.
async fn simulated_worker(
    url: String,
    i: usize,
    interval: Duration,
    registered: mpsc::Sender<()>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<(Instant, u32)>> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connecting")?;
    let mut client = pb::worker_session_client::WorkerSessionClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    let reg = pb::Register {
        worker_id: format!("bench/{i}"),
        node: format!("node{}", i / 8),
        devices: vec![pb::Device {
            kind: pb::DeviceKind::Simulated as i32,
            index: (i % 8) as u32,
            memory_bytes: 0,
            data_plane_addr: String::new(),
        }],
        data_plane_addr: format!("127.0.0.1:{}", 20000 + i),
        version: "bench".into(),
    };
    tx.send(pb::WorkerMessage::register(reg)).await?;
    let mut inbound = tokio::time::timeout(
        Duration::from_secs(30),
        client.session(ReceiverStream::new(rx)),
    )
    .await
    .context("opening the session timed out")??
    .into_inner();
    match tokio::time::timeout(Duration::from_secs(30), inbound.message())
        .await
        .context("Registered timed out")??
    {
        Some(pb::CoordinatorMessage {
            msg: Some(Down::Registered(_)),
        }) => {}
        other => bail!("expected Registered, got {other:?}"),
    }
    let _ = registered.send(()).await;
    // Spread the heartbeats over the period, as independent daemons would be.
    let phase = interval.mul_f64((i as f64 * 0.618_034).fract());
    let mut ticker = tokio::time::interval_at(Instant::now() + phase, interval);
    let mut sent: HashMap<u64, Instant> = HashMap::new();
    let mut rtts = Vec::new();
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = stop.changed() => return Ok(rtts),
            _ = ticker.tick() => {
                seq += 1;
                sent.insert(seq, Instant::now());
                tx.send(pb::WorkerMessage::heartbeat(seq)).await.context("session closed")?;
            }
            m = inbound.message() => match m? {
                Some(pb::CoordinatorMessage { msg: Some(Down::HeartbeatAck(a)) }) => {
                    if let Some(t0) = sent.remove(&a.seq) {
                        rtts.push((t0, t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32));
                    }
                }
                Some(_) => {}
                None => bail!("coordinator closed the session"),
            },
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[idx]) / 1000.0
}

fn main() -> anyhow::Result<()> {
    let o = opts()?;
    let scratch = Scratch::new()?;
    let interval = format!("{}ms", o.interval.as_millis());
    let coordinator = Coordinator::start(
        &scratch,
        "coordinator.log",
        "127.0.0.1:0",
        &Store::Memory,
        &[
            "--heartbeat-interval",
            &interval,
            "--failure-timeout",
            "10s",
        ],
    )?;
    let pid = coordinator.process.pid().context("coordinator exited")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let url = coordinator.url();
        let (reg_tx, mut reg_rx) = mpsc::channel(o.workers);
        // A generous deadline for registering, then a warm-up, then the measured window.
        let setup = Duration::from_secs(60);
        let started = Instant::now();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::with_capacity(o.workers);
        for i in 0..o.workers {
            tasks.push(tokio::spawn(simulated_worker(
                url.clone(),
                i,
                o.interval,
                reg_tx.clone(),
                stop_rx.clone(),
            )));
        }
        drop(reg_tx);
        let mut n = 0;
        while n < o.workers {
            match tokio::time::timeout_at(started + setup, reg_rx.recv()).await {
                Ok(Some(())) => n += 1,
                Ok(None) => break,
                Err(_) => bail!(
                    "only {n} of {} workers registered within {setup:?}",
                    o.workers
                ),
            }
        }
        if n < o.workers {
            bail!(
                "only {n} of {} workers registered; see the first task error below",
                o.workers
            );
        }
        println!("{n} workers registered in {:.2?}", started.elapsed());
        // Warm-up: three periods, so every worker is in its steady rhythm.
        tokio::time::sleep(o.interval * 3).await;
        let measure_from = Instant::now();
        let cpu0 = cpu_seconds(pid)?;
        tokio::time::sleep(Duration::from_secs(o.seconds)).await;
        let cpu1 = cpu_seconds(pid)?;
        let measure_to = Instant::now();
        let wall = (measure_to - measure_from).as_secs_f64();
        let rss = rss_mib(pid)?;
        // Let the acks of the window's last heartbeats arrive, then stop the workers.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = stop_tx.send(true);
        let mut all = Vec::new();
        let mut failed = 0;
        for t in tasks {
            match tokio::time::timeout(Duration::from_secs(10), t).await {
                Ok(Ok(Ok(r))) => all.extend(
                    r.into_iter()
                        .filter(|(t, _)| *t >= measure_from && *t < measure_to)
                        .map(|(_, us)| us),
                ),
                Ok(Ok(Err(e))) => {
                    failed += 1;
                    if failed == 1 {
                        eprintln!("first worker error: {e:#}");
                    }
                }
                _ => failed += 1,
            }
        }
        all.sort_unstable();
        let expected = o.workers as f64 * o.seconds as f64 / o.interval.as_secs_f64();
        println!(
            "heartbeat load: {} workers, 1 heartbeat per {:?}, window {wall:.1}s",
            o.workers, o.interval
        );
        println!(
            "  acked heartbeats   {} (expected ~{expected:.0}), failed workers {failed}",
            all.len()
        );
        println!(
            "  round trip ms      p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
            percentile(&all, 0.50),
            percentile(&all, 0.90),
            percentile(&all, 0.99),
            percentile(&all, 1.0)
        );
        println!(
            "  coordinator CPU    {:.2}s over {wall:.1}s = {:.1}% of one core; RSS {rss:.1} MiB",
            cpu1 - cpu0,
            100.0 * (cpu1 - cpu0) / wall
        );
        Ok(())
    })
}
