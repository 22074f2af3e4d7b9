//! Execution context: the thread budget an op may use now, and the place a CUDA stream will live later.
//!
//! Invariant: an op run with `ExecCtx::cpu(n)` never uses more than `n` threads, and its result does not
//! depend on `n`.

use std::sync::Arc;

/// Whether an op overwrites its output or adds into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accumulate {
    /// `out = result`.
    Overwrite,
    /// `out += result`.
    Add,
}

/// Where and with how many threads ops run. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct ExecCtx {
    threads: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl std::fmt::Debug for ExecCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecCtx")
            .field("device", &"cpu")
            .field("threads", &self.threads)
            .finish()
    }
}

impl ExecCtx {
    /// A CPU context with a private pool of `threads` worker threads (`0` is treated as 1; 1 runs
    /// everything on the calling thread). If the OS refuses to start the threads, the context falls back to
    /// running on the calling thread, which gives the same results more slowly.
    pub fn cpu(threads: usize) -> Self {
        let threads = threads.max(1);
        if threads == 1 {
            return Self {
                threads: 1,
                pool: None,
            };
        }
        match rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kernels-{i}"))
            .build()
        {
            Ok(pool) => Self {
                threads,
                pool: Some(Arc::new(pool)),
            },
            Err(_) => Self {
                threads: 1,
                pool: None,
            },
        }
    }

    /// The thread budget.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` inside this context's pool (or on the calling thread for a budget of one).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }

    /// The `gemm` crate's parallelism setting for this budget.
    pub(crate) fn gemm_parallelism(&self) -> gemm::Parallelism {
        if self.threads <= 1 {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(self.threads)
        }
    }

    /// Runs `f(scratch, i)` for every `i in 0..n`, spread over the pool, with a per-worker scratch value
    /// built by `init`. Each index runs exactly once; which thread runs it does not matter to the result as
    /// long as `f` writes only the outputs of index `i`.
    pub(crate) fn for_each_index_init<S>(
        &self,
        n: usize,
        init: impl Fn() -> S + Send + Sync,
        f: impl Fn(&mut S, usize) + Send + Sync,
    ) {
        if self.threads <= 1 || n <= 1 {
            let mut s = init();
            (0..n).for_each(|i| f(&mut s, i));
        } else {
            use rayon::prelude::*;
            self.install(|| (0..n).into_par_iter().for_each_init(&init, |s, i| f(s, i)));
        }
    }
}

impl ExecCtx {
    /// Splits `a` into chunks of `ca` and `b` into chunks of `cb` (the same number of chunks) and runs
    /// `f(index, a_chunk, b_chunk)` for each pair, spread over the pool. Chunk sizes must be non-zero.
    pub(crate) fn for_each_chunk_pair<A: Send, B: Send>(
        &self,
        a: &mut [A],
        ca: usize,
        b: &mut [B],
        cb: usize,
        f: impl Fn(usize, &mut [A], &mut [B]) + Send + Sync,
    ) {
        if self.threads <= 1 {
            a.chunks_mut(ca)
                .zip(b.chunks_mut(cb))
                .enumerate()
                .for_each(|(i, (x, y))| f(i, x, y));
        } else {
            use rayon::prelude::*;
            self.install(|| {
                a.par_chunks_mut(ca)
                    .zip(b.par_chunks_mut(cb))
                    .enumerate()
                    .for_each(|(i, (x, y))| f(i, x, y))
            });
        }
    }
}

impl Default for ExecCtx {
    /// A single-threaded CPU context.
    fn default() -> Self {
        Self::cpu(1)
    }
}

/// A raw pointer that may cross threads. Used only where each thread writes a disjoint region of one
/// output buffer; every use states why the regions are disjoint.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: the pointer is only dereferenced on disjoint regions (see each use), and `T: Send`.
unsafe impl<T: Send> Send for SendPtr<T> {}
// SAFETY: as above; shared access never writes overlapping elements.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The wrapped pointer (a method, so closures capture the `Send` wrapper, not the raw field).
    #[inline]
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}
