//! Test helpers: a tiny seeded RNG, normwise comparison and central finite differences in f64.
//!
//! Invariant: every random test prints its seed on failure; `KERNELS_TEST_SEED` overrides the seed.

use crate::real::Real;

/// SplitMix64 generator; seeded from the test name (or `KERNELS_TEST_SEED`).
pub struct Rng {
    state: u64,
    pub seed: u64,
}

impl Rng {
    pub fn seeded(name: &str) -> Self {
        let seed = std::env::var("KERNELS_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ b as u64).wrapping_mul(0x1000_0000_01b3)
                })
            });
        Self { state: seed, seed }
    }
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.uniform()).collect()
    }
    pub fn vec_f32(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform() as f32).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Normwise relative error ‖got − want‖ / ‖want‖ (absolute when ‖want‖ is tiny).
pub fn rel_err<T: Real>(got: &[T], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let mut num = 0.0;
    let mut den = 0.0;
    for (g, w) in got.iter().zip(want) {
        let d = g.to_f64() - w;
        num += d * d;
        den += w * w;
    }
    num.sqrt() / den.sqrt().max(1e-30)
}

#[track_caller]
pub fn assert_close<T: Real>(got: &[T], want: &[f64], tol: f64, what: &str) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: normwise relative error {e:e} > {tol:e}");
}

/// Central differences of `f` at `x` (step `h` scaled by max(1, |x_i|)), compared normwise with
/// `analytic`. Panics with the seed on mismatch.
#[track_caller]
pub fn fd_check(
    f: &dyn Fn(&[f64]) -> f64,
    x: &[f64],
    analytic: &[f64],
    tol: f64,
    seed: u64,
    what: &str,
) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let mut xp = x.to_vec();
    let mut num = vec![0.0; x.len()];
    for i in 0..x.len() {
        let h = 1e-6 * x[i].abs().max(1.0);
        let orig = xp[i];
        xp[i] = orig + h;
        let fp = f(&xp);
        xp[i] = orig - h;
        let fm = f(&xp);
        xp[i] = orig;
        num[i] = (fp - fm) / (2.0 * h);
    }
    let e = rel_err(analytic, &num);
    assert!(
        e <= tol,
        "{what}: finite-difference mismatch {e:e} > {tol:e} (seed {seed})"
    );
}

/// Σ r_i · y_i, the scalar loss the finite-difference checks differentiate.
pub fn wsum(r: &[f64], y: &[f64]) -> f64 {
    r.iter().zip(y).map(|(a, b)| a * b).sum()
}
