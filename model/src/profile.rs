//! A tiny wall-time profiler for the training step: per-thread accumulators of the time spent in GEMMs,
//! the attention core and MoE routing, fed by scope guards placed in `precision::Linear`, the MLA
//! attention calls and the router.
//!
//! Invariants: attribution is exclusive — when a scope opens inside another (the router's GEMM inside
//! routing, a projection inside the attention layer's guard), the outer category stops accruing until the
//! inner one closes, so the categories of one thread never add up to more than its wall time. Profiling
//! is off by default; a guard then costs one relaxed atomic load and touches no thread-local state.
//! Accumulators are per thread: [`take`] returns and clears the calling thread's totals only (the trainer
//! runs the whole step on its own thread; worker-pool threads inside a GEMM are covered by the caller's
//! guard).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What a scope's time is counted as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Category {
    /// The three GEMMs of every projection (and its FP8 quantization), head and eh_proj included.
    Gemm,
    /// The attention core: QKᵀ, softmax and PV, forward and backward.
    Attention,
    /// MoE routing: router GEMM, sigmoid, group-limited top-k, balance loss, and their backward.
    Routing,
}

impl Category {
    fn index(self) -> usize {
        match self {
            Category::Gemm => 0,
            Category::Attention => 1,
            Category::Routing => 2,
        }
    }
}

/// Accumulated wall time per category.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    /// Seconds in GEMMs.
    pub gemm_s: f64,
    /// Seconds in the attention core.
    pub attention_s: f64,
    /// Seconds in routing.
    pub routing_s: f64,
}

impl Totals {
    fn from_durations(d: &[Duration; 3]) -> Totals {
        Totals {
            gemm_s: d[Category::Gemm.index()].as_secs_f64(),
            attention_s: d[Category::Attention.index()].as_secs_f64(),
            routing_s: d[Category::Routing.index()].as_secs_f64(),
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);

#[derive(Default)]
struct ThreadState {
    totals: [Duration; 3],
    /// The innermost open scope and the instant it last started accruing.
    current: Option<(Category, Instant)>,
}

thread_local! {
    static STATE: RefCell<ThreadState> = RefCell::new(ThreadState::default());
}

/// Turns profiling on or off for every thread (scopes opened while off record nothing, even if profiling is
/// turned on before they close).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether profiling is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Returns the calling thread's totals since the last `take` and clears them.
pub fn take() -> Totals {
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        // Time of a scope that is still open is split at this instant.
        if let Some((c, t0)) = s.current {
            let now = Instant::now();
            s.totals[c.index()] += now - t0;
            s.current = Some((c, now));
        }
        let t = Totals::from_durations(&s.totals);
        s.totals = [Duration::ZERO; 3];
        t
    })
}

/// An open scope; its time is added to its category when it drops.
#[must_use = "a scope measures until it is dropped"]
#[derive(Debug)]
pub struct Scope {
    /// (own category, the enclosing scope's category) while profiling; None when off.
    open: Option<(Category, Option<Category>)>,
}

/// Opens a scope of category `cat` on the calling thread (a no-op when profiling is off).
#[inline]
pub fn scope(cat: Category) -> Scope {
    if !ENABLED.load(Ordering::Relaxed) {
        return Scope { open: None };
    }
    let parent = STATE.with(|s| {
        let mut s = s.borrow_mut();
        let now = Instant::now();
        let parent = s.current.map(|(c, t0)| {
            s.totals[c.index()] += now - t0;
            c
        });
        s.current = Some((cat, now));
        parent
    });
    Scope {
        open: Some((cat, parent)),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let Some((cat, parent)) = self.open else {
            return;
        };
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let now = Instant::now();
            if let Some((c, t0)) = s.current {
                s.totals[c.index()] += now - t0;
            }
            debug_assert!(s.current.is_none_or(|(c, _)| c == cat));
            s.current = parent.map(|p| (p, now));
        });
    }
}

/// A borrowed value that keeps a scope open while it lives: passing `&timed(cat, &ctx)` as an argument
/// times exactly that call (the temporary drops at the end of the statement).
#[derive(Debug)]
pub struct Timed<'a, T> {
    _scope: Scope,
    inner: &'a T,
}

/// Wraps `inner` in a scope of category `cat` (see [`Timed`]).
#[inline]
pub fn timed<T>(cat: Category, inner: &T) -> Timed<'_, T> {
    Timed {
        _scope: scope(cat),
        inner,
    }
}

impl<T> std::ops::Deref for Timed<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(d: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < d {
            std::hint::spin_loop();
        }
    }

    // One test touches the global switch, so the cases run in sequence inside it.
    #[test]
    fn nested_scopes_are_exclusive_and_off_records_nothing() {
        set_enabled(false);
        take();
        {
            let _g = scope(Category::Gemm);
            spin(Duration::from_millis(2));
        }
        assert_eq!(
            take(),
            Totals::default(),
            "profiling off must record nothing"
        );

        set_enabled(true);
        let t0 = Instant::now();
        {
            let _r = scope(Category::Routing);
            spin(Duration::from_millis(20));
            {
                let _g = scope(Category::Gemm);
                spin(Duration::from_millis(30));
            }
            spin(Duration::from_millis(10));
        }
        let wall = t0.elapsed().as_secs_f64();
        // A scope held by a temporary argument times just that call.
        let x = 5u32;
        let _ = std::hint::black_box(
            *timed(Category::Attention, &x) + {
                spin(Duration::from_millis(5));
                1
            },
        );
        let t = take();
        set_enabled(false);
        // Each part spun for at least its share; an inclusive outer scope would push the sum past the wall.
        assert!(t.gemm_s >= 0.030 && t.routing_s >= 0.030, "{t:?}");
        assert!(t.attention_s >= 0.005, "{t:?}");
        assert!(
            t.gemm_s + t.routing_s <= wall + 1e-6,
            "exclusive attribution: {t:?} over {wall} s"
        );
        assert_eq!(take(), Totals::default(), "take clears the totals");
    }
}
