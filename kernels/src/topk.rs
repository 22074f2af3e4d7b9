//! Top-k selection for the router: plain top-k and DeepSeek-V3's group-limited top-k.
//!
//! Invariant: the order is total and deterministic: higher score first, equal scores by lower index,
//! and NaN ranks below every number (so a NaN score is picked only when nothing else is left).

use crate::{KernelError, Result};

/// `true` when (a, ia) ranks strictly before (b, ib).
#[inline]
fn before(a: f32, ia: usize, b: f32, ib: usize) -> bool {
    match (a.is_nan(), b.is_nan()) {
        (false, true) => true,
        (true, false) => false,
        (true, true) => ia < ib,
        (false, false) => a > b || (a == b && ia < ib),
    }
}

/// Insertion top-k over the indices `cand` yields; writes the winners best-first into `out`.
fn select(scores: &[f32], cand: impl Iterator<Item = usize>, out: &mut [usize]) -> usize {
    let k = out.len();
    let mut len = 0;
    for i in cand {
        let v = scores[i];
        if len == k && !before(v, i, scores[out[k - 1]], out[k - 1]) {
            continue;
        }
        let mut pos = len.min(k - 1);
        if len < k {
            len += 1;
        }
        while pos > 0 && before(v, i, scores[out[pos - 1]], out[pos - 1]) {
            out[pos] = out[pos - 1];
            pos -= 1;
        }
        out[pos] = i;
    }
    len
}

/// Writes the indices of the `out_idx.len()` largest scores into `out_idx`, best first (ties: lower index).
/// `k` must equal `out_idx.len()` and be at most `scores_row.len()`.
pub fn topk(scores_row: &[f32], k: usize, out_idx: &mut [usize]) -> Result<()> {
    if out_idx.len() != k || k > scores_row.len() {
        return Err(KernelError::Invalid(format!(
            "topk: k = {k}, out_idx has {}, row has {}",
            out_idx.len(),
            scores_row.len()
        )));
    }
    if k > 0 {
        select(scores_row, 0..scores_row.len(), out_idx);
    }
    Ok(())
}

/// Group-limited top-k (DeepSeek-V3 router): experts form `n_group` groups of consecutive indices; a
/// group's score is the sum of its two best (biased) scores (its only score if groups have one expert);
/// the `topk_group` best groups are kept (ties: lower group index) and the top-k is taken over experts of
/// kept groups only, best first. Scores of excluded groups act as −∞.
pub fn group_limited_topk(
    biased_scores_row: &[f32],
    n_group: usize,
    topk_group: usize,
    k: usize,
    out_idx: &mut [usize],
) -> Result<()> {
    let n = biased_scores_row.len();
    if n_group == 0 || !n.is_multiple_of(n_group) || topk_group == 0 || topk_group > n_group {
        return Err(KernelError::Invalid(format!(
            "group_limited_topk: {n} experts, n_group {n_group}, topk_group {topk_group}"
        )));
    }
    let gs = n / n_group;
    if out_idx.len() != k || k > topk_group * gs {
        return Err(KernelError::Invalid(format!(
            "group_limited_topk: k = {k} with out_idx of {} and {} selectable experts",
            out_idx.len(),
            topk_group * gs
        )));
    }
    let mut group_scores = Vec::with_capacity(n_group);
    let mut best2 = [0usize; 2];
    for g in 0..n_group {
        let m = select(
            biased_scores_row,
            g * gs..(g + 1) * gs,
            &mut best2[..gs.min(2)],
        );
        group_scores.push(
            best2[..m]
                .iter()
                .map(|&i| biased_scores_row[i])
                .sum::<f32>(),
        );
    }
    let mut kept = vec![0usize; topk_group];
    select(&group_scores, 0..n_group, &mut kept);
    kept.sort_unstable();
    if k > 0 {
        select(
            biased_scores_row,
            kept.iter().flat_map(|&g| g * gs..(g + 1) * gs),
            out_idx,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    fn reference(scores: &[f32], allowed: &[bool], k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..scores.len()).filter(|&i| allowed[i]).collect();
        idx.sort_by(|&a, &b| {
            if before(scores[a], a, scores[b], b) {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            }
        });
        idx.truncate(k);
        idx
    }

    #[test]
    fn ties_lower_index_wins_and_nan_last() {
        let s = [1.0, 3.0, 3.0, f32::NAN, 2.0, 3.0];
        let mut o = [0; 4];
        topk(&s, 4, &mut o).unwrap();
        assert_eq!(o, [1, 2, 5, 4]);
        let mut o = [0; 6];
        topk(&s, 6, &mut o).unwrap();
        assert_eq!(o, [1, 2, 5, 4, 0, 3]);
        assert!(topk(&s, 7, &mut [0; 7]).is_err());
    }

    #[test]
    fn matches_sorting_reference() {
        let mut rng = Rng::seeded("topk");
        for _ in 0..300 {
            let n = 16;
            // Coarse values so ties are common.
            let s: Vec<f32> = (0..n).map(|_| (rng.below(6) as f32) * 0.5).collect();
            let k = 1 + rng.below(6);
            let mut o = vec![0; k];
            topk(&s, k, &mut o).unwrap();
            assert_eq!(o, reference(&s, &[true; 16], k), "seed {}", rng.seed);
            // Group-limited: 4 groups of 4, keep 2.
            let mut gsc: Vec<(f32, usize)> = (0..4)
                .map(|g| {
                    let r = reference(&s[g * 4..g * 4 + 4], &[true; 4], 2);
                    (s[g * 4 + r[0]] + s[g * 4 + r[1]], g)
                })
                .collect();
            gsc.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            let allowed: Vec<bool> = (0..n)
                .map(|i| gsc[..2].iter().any(|g| g.1 == i / 4))
                .collect();
            group_limited_topk(&s, 4, 2, k, &mut o).unwrap();
            assert_eq!(o, reference(&s, &allowed, k), "seed {}", rng.seed);
        }
        assert!(group_limited_topk(&[0.0; 8], 3, 2, 2, &mut [0; 2]).is_err());
        assert!(group_limited_topk(&[0.0; 8], 4, 2, 5, &mut [0; 5]).is_err());
    }
}
