//! Cross-entropy over vocabulary logits, with its gradient.
//!
//! Invariant: per-row log-sum-exp uses the row max for stability; the mean is accumulated in f64 in
//! row order, so the loss is deterministic and independent of any partitioning.

use crate::real::{Real, max_of, sum_exp_shifted};
use crate::{KernelError, Result, check_len, dims};

fn check(logits: usize, targets: &[u32], rows: usize, vocab: usize) -> Result<()> {
    check_len("logits", logits, dims(&[rows, vocab])?)?;
    check_len("targets", targets.len(), rows)?;
    match targets.iter().position(|&t| t as usize >= vocab) {
        Some(at) => Err(KernelError::Index {
            what: "targets",
            index: targets[at] as usize,
            at,
            bound: vocab,
        }),
        None => Ok(()),
    }
}

/// Returns `(mean over rows of lse − logit[target], lse per row)` for `logits` [rows, vocab].
pub fn cross_entropy_forward<T: Real>(
    logits: &[T],
    targets: &[u32],
    rows: usize,
    vocab: usize,
) -> Result<(T, Vec<T>)> {
    check(logits.len(), targets, rows, vocab)?;
    if vocab == 0 {
        return Err(KernelError::Invalid(
            "cross entropy over an empty vocabulary".into(),
        ));
    }
    let mut lse = Vec::with_capacity(rows);
    let mut total = 0.0f64;
    for (r, row) in logits.chunks_exact(vocab).enumerate() {
        let m = max_of(row);
        let l = m + sum_exp_shifted(row, m).ln();
        lse.push(l);
        total += (l - row[targets[r] as usize]).to_f64();
    }
    let mean = if rows == 0 { 0.0 } else { total / rows as f64 };
    Ok((T::from_f64(mean), lse))
}

/// `dlogits = (softmax(logits) − onehot(target)) · scale` (overwrite); `scale` is typically
/// d(loss)/d(mean) / rows. `lse` comes from [`cross_entropy_forward`].
pub fn cross_entropy_backward<T: Real>(
    dlogits: &mut [T],
    logits: &[T],
    targets: &[u32],
    lse: &[T],
    rows: usize,
    vocab: usize,
    scale: T,
) -> Result<()> {
    check(logits.len(), targets, rows, vocab)?;
    check_len("dlogits", dlogits.len(), logits.len())?;
    check_len("lse", lse.len(), rows)?;
    for r in 0..rows {
        let (l, d) = (
            &logits[r * vocab..(r + 1) * vocab],
            &mut dlogits[r * vocab..(r + 1) * vocab],
        );
        for (o, &v) in d.iter_mut().zip(l) {
            *o = (v - lse[r]).exp_fast() * scale;
        }
        d[targets[r] as usize] -= scale;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Rng, fd_check};

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::seeded("xent");
        let (rows, vocab) = (4, 9);
        let logits: Vec<f64> = rng.vec(rows * vocab).iter().map(|v| v * 5.0).collect();
        let targets = [3u32, 0, 8, 3];
        let (_, lse) = cross_entropy_forward(&logits, &targets, rows, vocab).unwrap();
        let mut d = vec![0.0; rows * vocab];
        cross_entropy_backward(
            &mut d,
            &logits,
            &targets,
            &lse,
            rows,
            vocab,
            1.0 / rows as f64,
        )
        .unwrap();
        let f = |l: &[f64]| cross_entropy_forward(l, &targets, rows, vocab).unwrap().0;
        fd_check(&f, &logits, &d, 1e-8, rng.seed, "cross entropy");
        assert!(cross_entropy_forward(&logits, &[0, 0, 9, 0], rows, vocab).is_err());
    }

    #[test]
    fn known_value() {
        // Uniform logits over 4 classes: loss ln 4.
        let (l, lse) = cross_entropy_forward(&[0.5f32; 8], &[1, 2], 2, 4).unwrap();
        assert!((l - 4f32.ln()).abs() < 1e-6 && (lse[0] - (0.5 + 4f32.ln())).abs() < 1e-6);
    }
}
