//! Data-plane throughput over loopback against a plain TCP socket copy of the same bytes, side by
//! side in one process (issue 6, acceptance 4).
//!
//! Columns, for N messages of each size sent one way:
//! - "plain": one `std::net` socket, `write_all` / `read_exact` into one reused buffer.
//! - "plane": rank 0 to rank 1 of two `TcpDataPlane`s (framing, CRC32 on both sides, sender
//!   thread, keyed mailbox), the receiver recycling each buffer after use as the executor does.
//! - "no-recycle": the same without recycling (a fresh buffer, so fresh pages, per message).
//! - "no-CRC": the plane with `payload_checksum: false` (recycling), to show the checksum's cost.
//! - "plain-fresh": the plain copy receiving each message into a new buffer.
//!
//! All send the same distinct, pre-built payloads (built before the clock starts), so no variant
//! gets a cache-resident source buffer that another lacks. Each cell is the best of `REPEATS`
//! interleaved runs (the machine is shared); the load average is printed with the numbers.
//! Run: `cargo bench -p comm --bench throughput` (add `-- quick` for one small run).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use comm::{DataPlane, Kind, Tag, TcpBinding, TcpConfig};

const MIB: usize = 1 << 20;
const REPEATS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(120);

fn payloads(size: usize, count: usize) -> Vec<Vec<u8>> {
    let template: Vec<u8> = (0..size).map(|i| i as u8).collect();
    (0..count).map(|_| template.clone()).collect()
}

/// `fresh_buffers`: the reader receives every message into a newly allocated buffer, as the
/// plane does, instead of reusing one.
fn plain_copy(size: usize, count: usize, fresh_buffers: bool) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
    let addr = listener.local_addr().expect("listener address");
    let reader = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        let mut buf = vec![0u8; size];
        for _ in 0..count {
            if fresh_buffers {
                let mut fresh = Vec::with_capacity(size);
                let read = (&mut stream)
                    .take(size as u64)
                    .read_to_end(&mut fresh)
                    .expect("read_to_end");
                assert_eq!(read, size);
            } else {
                stream.read_exact(&mut buf).expect("read_exact");
            }
        }
        Instant::now()
    });
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let payloads = payloads(size, count);
    let start = Instant::now();
    for payload in &payloads {
        stream.write_all(payload).expect("write_all");
    }
    let end = reader.join().expect("reader thread");
    end - start
}

fn plane_pair(payload_checksum: bool) -> (comm::TcpDataPlane, comm::TcpDataPlane) {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address literal");
    let config = TcpConfig {
        payload_checksum,
        ..TcpConfig::default()
    };
    let b0 = TcpBinding::bind(any, config.clone()).expect("bind rank 0");
    let b1 = TcpBinding::bind(any, config).expect("bind rank 1");
    let peers = vec![b0.local_addr(), b1.local_addr()];
    let p0 = b0.start(0, peers.clone()).expect("start rank 0");
    let p1 = b1.start(1, peers).expect("start rank 1");
    (p0, p1)
}

/// `recycle`: hand every received buffer back to the plane, as the executor does after decoding.
fn plane_copy(
    planes: &(comm::TcpDataPlane, comm::TcpDataPlane),
    round: u64,
    size: usize,
    count: usize,
    recycle: bool,
) -> Duration {
    let (p0, p1) = planes;
    let payloads = payloads(size, count);
    let tag = |i: usize| Tag::new(round, Kind::Control).chunk(i as u32);
    let start = Instant::now();
    for (i, payload) in payloads.into_iter().enumerate() {
        p0.send(1, tag(i), payload).expect("send");
    }
    for i in 0..count {
        let got = p1.recv(0, tag(i), TIMEOUT).expect("recv");
        assert_eq!(got.len(), size);
        if recycle {
            p1.recycle(got);
        }
    }
    start.elapsed()
}

fn gbps(size: usize, count: usize, elapsed: Duration) -> f64 {
    (size * count) as f64 / elapsed.as_secs_f64() / 1e9
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unavailable ({e})"))
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let sizes: &[usize] = if quick {
        &[MIB]
    } else {
        &[MIB, 4 * MIB, 16 * MIB, 64 * MIB]
    };
    let planes = plane_pair(true);
    let unchecked = plane_pair(false);
    // One warm-up message so the connections exist before timing.
    plane_copy(&planes, 0, 1024, 1, false);
    plane_copy(&unchecked, 0, 1024, 1, false);
    println!(
        "loadavg before: {}  (cores: {})",
        loadavg(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:>8} {:>5} {:>7} {:>7} {:>6} {:>11} {:>7} {:>12}   (GB/s; ratio = plane / plain)",
        "size", "msgs", "plain", "plane", "ratio", "no-recycle", "no-CRC", "plain-fresh"
    );
    let mut round = 1;
    for &size in sizes {
        // About 256 MiB per run (at least 4 messages).
        let count = if quick { 4 } else { (256 * MIB / size).max(4) };
        let mut best = [Duration::MAX; 5];
        for _ in 0..if quick { 1 } else { REPEATS } {
            // Interleaved, so that load changes hit every variant alike.
            let runs = [
                plain_copy(size, count, false),
                plane_copy(&planes, round, size, count, true),
                plane_copy(&planes, round + 1, size, count, false),
                plane_copy(&unchecked, round, size, count, true),
                plain_copy(size, count, true),
            ];
            for (b, r) in best.iter_mut().zip(runs) {
                *b = (*b).min(r);
            }
            round += 2;
        }
        let [plain, plane, no_recycle, no_crc, fresh] = best.map(|d| gbps(size, count, d));
        println!(
            "{:>4} MiB {count:>5} {plain:>7.2} {plane:>7.2} {:>6.2} {no_recycle:>11.2} {no_crc:>7.2} {fresh:>12.2}",
            size / MIB,
            plane / plain,
        );
    }
    println!("loadavg after:  {}", loadavg());
    assert_eq!(planes.0.pending_messages() + planes.1.pending_messages(), 0);
    assert_eq!(
        unchecked.0.pending_messages() + unchecked.1.pending_messages(),
        0
    );
}
