//! f32 GEMM throughput (reported as FLOP/s, 2·m·n·k per call) of `kernels::matmul_*` against the
//! `gemm` crate (what the kernels used before their own f32 kernel) and the matrixmultiply crate at the
//! same shapes and thread budget. `xwt` packs the weight inside every call;
//! `xwt_packed` / `dyw_packed` use a [`PackedWeight`] packed once outside the timed loop (how the model
//! should call the forward and input-gradient GEMMs within a step).
//!
//! After the criterion group, [`summary`] prints one side-by-side table for 1024³ on the bench's thread
//! budget: the measured FMA peak (see `peak.rs`), ours, matrixmultiply and numpy/OpenBLAS (timed by
//! `benches/numpy_gemm.py` in a child process, skipped when python3 with numpy is missing), measured in
//! interleaved rounds so that a busy machine slows all of them alike, with the load average.

use criterion::{BenchmarkId, Criterion, Throughput};
use kernels::{
    Accumulate, ExecCtx, PackedWeight, WeightUse, matmul_dytx, matmul_dyw, matmul_dyw_packed,
    matmul_xwt, matmul_xwt_packed,
};
use std::time::Instant;

/// (m, n, k): square sizes and the tiny model's shapes at 256 tokens (q/kv projections, MLP in/out).
pub const SHAPES: &[(usize, usize, usize)] = &[
    (512, 512, 512),
    (1024, 1024, 1024),
    (256, 768, 256),
    (256, 256, 768),
    (256, 512, 256),
    (256, 256, 512),
];

pub fn bench(c: &mut Criterion) {
    // matrixmultiply reads its thread count from the environment once, on first use.
    // SAFETY (edition 2024 `set_var`): no other thread exists yet in this bench binary.
    unsafe { std::env::set_var("MATMUL_NUM_THREADS", crate::THREADS.to_string()) };
    let ctx = ExecCtx::cpu(crate::THREADS);
    let pool = gemm_pool();
    let mut g = c.benchmark_group("gemm");
    for &(m, n, k) in SHAPES {
        let id = format!("{m}x{n}x{k}");
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        let x = crate::data(m * k, 1);
        let w = crate::data(n * k, 2);
        let dy = crate::data(m * n, 3);
        let mut y = vec![0f32; m * n];
        g.bench_function(BenchmarkId::new("xwt", &id), |b| {
            b.iter(|| {
                matmul_xwt(&ctx, &mut y, &x, &w, m, n, k, Accumulate::Overwrite).expect("shapes")
            })
        });
        let pw = PackedWeight::new(&ctx, WeightUse::Xwt, &w, n, k).expect("shapes");
        g.bench_function(BenchmarkId::new("xwt_packed", &id), |b| {
            b.iter(|| {
                matmul_xwt_packed(&ctx, &mut y, &x, &pw, m, Accumulate::Overwrite).expect("shapes")
            })
        });
        g.bench_function(BenchmarkId::new("gemm_crate_xwt", &id), |b| {
            b.iter(|| pool.install(|| gemm_crate_xwt(&mut y, &x, &w, (m, n, k), crate::THREADS)))
        });
        g.bench_function(BenchmarkId::new("matrixmultiply_xwt", &id), |b| {
            b.iter(|| mm_xwt(&mut y, &x, &w, m, n, k))
        });
        if m == n && n == k {
            let mut dx = vec![0f32; m * k];
            g.bench_function(BenchmarkId::new("dyw", &id), |b| {
                b.iter(|| {
                    matmul_dyw(&ctx, &mut dx, &dy, &w, m, n, k, Accumulate::Overwrite)
                        .expect("shapes")
                })
            });
            let pwb = PackedWeight::new(&ctx, WeightUse::Dyw, &w, n, k).expect("shapes");
            g.bench_function(BenchmarkId::new("dyw_packed", &id), |b| {
                b.iter(|| {
                    matmul_dyw_packed(&ctx, &mut dx, &dy, &pwb, m, Accumulate::Overwrite)
                        .expect("shapes")
                })
            });
            let mut dw = vec![0f32; n * k];
            g.bench_function(BenchmarkId::new("dytx", &id), |b| {
                b.iter(|| {
                    matmul_dytx(&ctx, &mut dw, &dy, &x, m, n, k, Accumulate::Overwrite)
                        .expect("shapes")
                })
            });
        }
    }
    g.finish();
    // The summary takes about half a minute: run it unless a filter that cannot mean GEMM was given.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if filters.is_empty() || filters.iter().any(|f| f.contains("gemm")) {
        summary(&ctx, &pool);
    }
}

/// A rayon pool of the bench's thread budget for the `gemm` crate.
fn gemm_pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(crate::THREADS)
        .build()
        .expect("a thread pool for the gemm crate")
}

/// The `gemm` crate's `y[m,n] = x[m,k] · w[n,k]ᵀ` on `threads` rayon threads (what `matmul_xwt` used
/// before the crate's own kernel; still its path for f64 and CPUs without AVX-512).
fn gemm_crate_xwt(
    y: &mut [f32],
    x: &[f32],
    w: &[f32],
    (m, n, k): (usize, usize, usize),
    threads: usize,
) {
    assert!(y.len() == m * n && x.len() == m * k && w.len() == n * k);
    // SAFETY: the lengths are checked above; y is [m,n] (row-major), x is [m,k], w is [n,k] read
    // transposed through its strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(threads),
        )
    }
}

/// matrixmultiply's `y[m,n] = x[m,k] · w[n,k]ᵀ` (the weight read transposed through its strides).
fn mm_xwt(y: &mut [f32], x: &[f32], w: &[f32], m: usize, n: usize, k: usize) {
    assert!(y.len() == m * n && x.len() == m * k && w.len() == n * k);
    // SAFETY: the lengths are checked above; y is [m,n], x is [m,k], w is [n,k].
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            y.as_mut_ptr(),
            n as isize,
            1,
        )
    }
}

/// A rate measured two ways: GFLOP per wall-clock second (what a user sees on an idle machine) and GFLOP
/// per CPU-second of this process's threads (what the code achieves while it holds a core; it stays
/// meaningful when other jobs share the machine, since time slices given to them are not counted).
#[derive(Clone, Copy)]
struct Rate {
    wall: f64,
    cpu: f64,
}

/// CPU time of this whole process (all threads, including ones that have exited), in seconds.
#[cfg(target_os = "linux")]
fn process_cpu_s() -> f64 {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: i32, out: *mut Timespec) -> i32;
    }
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut t = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `t` is a valid out-pointer for the C `struct timespec` layout on 64-bit Linux.
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    if rc == 0 {
        t.sec as f64 + t.nsec as f64 * 1e-9
    } else {
        f64::NAN
    }
}

#[cfg(not(target_os = "linux"))]
fn process_cpu_s() -> f64 {
    f64::NAN
}

/// Best rates of `reps` timed batches of `calls` calls of `f` (`flop` each), wall and CPU separately.
fn rate(flop: f64, reps: usize, calls: usize, mut f: impl FnMut()) -> Rate {
    f();
    let mut best = Rate {
        wall: 0.0,
        cpu: 0.0,
    };
    for _ in 0..reps {
        let (t0, c0) = (Instant::now(), process_cpu_s());
        for _ in 0..calls {
            f();
        }
        let (dt, dc) = (t0.elapsed().as_secs_f64(), process_cpu_s() - c0);
        best.wall = best.wall.max(flop * calls as f64 / dt / 1e9);
        best.cpu = best.cpu.max(flop * calls as f64 / dc / 1e9);
    }
    best
}

/// numpy's rates for `y = x @ w.T` at m×n×k from `numpy_gemm.py`, or `None` without python3/numpy.
fn numpy_rate(m: usize, n: usize, k: usize) -> Option<Rate> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/numpy_gemm.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(format!("{m}x{n}x{k}"))
        .env("OPENBLAS_NUM_THREADS", crate::THREADS.to_string())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("numpy_xwt"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    // "numpy_xwt MxNxK: WALL GFLOP/s (MIN-MAX), CPU GFLOP/cpu-s"
    let wall = words.get(2)?.parse().ok()?;
    let cpu = words.get(5)?.parse().ok()?;
    Some(Rate { wall, cpu })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The side-by-side table at 1024³ (see the module docs): five interleaved rounds, medians. "% peak" and
/// "x numpy" are given per wall-clock second (the acceptance numbers on an idle machine) and per
/// CPU-second (robust to other jobs; the peak per CPU-second is the one-core FMA peak).
fn summary(ctx: &ExecCtx, pool: &rayon::ThreadPool) {
    let (m, n, k) = (1024, 1024, 1024);
    let flop = 2.0 * (m * n * k) as f64;
    let x = crate::data(m * k, 1);
    let w = crate::data(n * k, 2);
    let mut y = vec![0f32; m * n];
    let pw = PackedWeight::new(ctx, WeightUse::Xwt, &w, n, k).expect("shapes");
    let names = [
        "fma_peak",
        "xwt_packed",
        "xwt",
        "gemm_crate",
        "matrixmultiply",
        "numpy",
    ];
    let mut rows: Vec<Vec<Rate>> = vec![Vec::new(); names.len()];
    // The alternatives must compute the same product (up to rounding) for the comparison to mean anything.
    matmul_xwt(ctx, &mut y, &x, &w, m, n, k, Accumulate::Overwrite).expect("shapes");
    let ours = y.clone();
    let max_diff = |y: &[f32]| {
        y.iter()
            .zip(&ours)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    pool.install(|| gemm_crate_xwt(&mut y, &x, &w, (m, n, k), crate::THREADS));
    let d_gemm = max_diff(&y);
    mm_xwt(&mut y, &x, &w, m, n, k);
    let d_mm = max_diff(&y);
    println!("\nmax |difference| from ours: gemm crate {d_gemm:e}, matrixmultiply {d_mm:e}");
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    for _ in 0..5 {
        let iters = 20_000_000;
        let per_call = crate::peak::flop_per_call(crate::THREADS, iters);
        rows[0].push(rate(per_call, 1, 1, || {
            crate::peak::measure_gflops(crate::THREADS, iters);
        }));
        rows[1].push(rate(flop, 5, 4, || {
            matmul_xwt_packed(ctx, &mut y, &x, &pw, m, Accumulate::Overwrite).expect("shapes")
        }));
        rows[2].push(rate(flop, 5, 4, || {
            matmul_xwt(ctx, &mut y, &x, &w, m, n, k, Accumulate::Overwrite).expect("shapes")
        }));
        rows[3].push(rate(flop, 5, 4, || {
            pool.install(|| gemm_crate_xwt(&mut y, &x, &w, (m, n, k), crate::THREADS))
        }));
        rows[4].push(rate(flop, 5, 4, || mm_xwt(&mut y, &x, &w, m, n, k)));
        if let Some(r) = numpy_rate(m, n, k) {
            rows[5].push(r);
        }
    }
    let load1 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let med = |r: &[Rate]| Rate {
        wall: median(r.iter().map(|x| x.wall).collect()),
        cpu: median(r.iter().map(|x| x.cpu).collect()),
    };
    let peak = med(&rows[0]);
    let numpy = (!rows[5].is_empty()).then(|| med(&rows[5]));
    println!(
        "gemm summary, f32 {m}x{n}x{k}, {} threads, median of 5 interleaved rounds",
        crate::THREADS
    );
    println!(
        "load average before: {} after: {}",
        load0.trim(),
        load1.trim()
    );
    println!(
        "{:<16} {:>8} {:>7} {:>7} | {:>9} {:>7} {:>7}",
        "", "GFLOP/s", "%peak", "xnumpy", "GFLOP/cpu", "%peak", "xnumpy"
    );
    for (name, r) in names.iter().zip(&rows) {
        if r.is_empty() {
            println!("{name:<16} (python3 with numpy not found)");
            continue;
        }
        let v = med(r);
        let vs = |a: f64, b: Option<f64>| b.map_or("-".to_string(), |b| format!("{:.2}", a / b));
        println!(
            "{name:<16} {:>8.1} {:>6.1}% {:>7} | {:>9.1} {:>6.1}% {:>7}",
            v.wall,
            100.0 * v.wall / peak.wall,
            vs(v.wall, numpy.map(|r| r.wall)),
            v.cpu,
            100.0 * v.cpu / peak.cpu,
            vs(v.cpu, numpy.map(|r| r.cpu)),
        );
    }
}
