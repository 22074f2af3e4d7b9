//! Token embedding gather and its scatter-add backward.
//!
//! Invariant: the backward adds rows in token order on one thread, so repeated ids accumulate
//! deterministically; ids are validated against the table before anything is written.

use crate::real::Real;
use crate::{KernelError, Result, check_len, dims};

fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&i| i as usize >= vocab) {
        Some(at) => Err(KernelError::Index {
            what: "ids",
            index: ids[at] as usize,
            at,
            bound: vocab,
        }),
        None => Ok(()),
    }
}

fn vocab_of(table_len: usize, dim: usize) -> Result<usize> {
    if dim == 0 || !table_len.is_multiple_of(dim) {
        return Err(KernelError::Invalid(format!(
            "table length {table_len} is not a multiple of dim {dim}"
        )));
    }
    Ok(table_len / dim)
}

/// `out[i, :] = table[ids[i], :]` for `out` of shape [ids.len(), dim] and `table` [vocab, dim].
pub fn embedding_forward<T: Real>(
    out: &mut [T],
    table: &[T],
    ids: &[u32],
    dim: usize,
) -> Result<()> {
    let vocab = vocab_of(table.len(), dim)?;
    check_len("out", out.len(), dims(&[ids.len(), dim])?)?;
    check_ids(ids, vocab)?;
    for (o, &id) in out.chunks_exact_mut(dim).zip(ids) {
        let id = id as usize;
        o.copy_from_slice(&table[id * dim..(id + 1) * dim]);
    }
    Ok(())
}

/// `dtable_accum[ids[i], :] += dout[i, :]`, in order of `i`.
pub fn embedding_backward<T: Real>(
    dtable_accum: &mut [T],
    dout: &[T],
    ids: &[u32],
    dim: usize,
) -> Result<()> {
    let vocab = vocab_of(dtable_accum.len(), dim)?;
    check_len("dout", dout.len(), dims(&[ids.len(), dim])?)?;
    check_ids(ids, vocab)?;
    for (d, &id) in dout.chunks_exact(dim).zip(ids) {
        let id = id as usize;
        for (a, &b) in dtable_accum[id * dim..(id + 1) * dim].iter_mut().zip(d) {
            *a += b;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{Rng, fd_check, wsum};

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = Rng::seeded("embedding");
        let (vocab, dim) = (5, 3);
        let table = rng.vec(vocab * dim);
        let ids = [1u32, 4, 1, 0];
        let r = rng.vec(ids.len() * dim);
        let mut g = vec![0.0; vocab * dim];
        embedding_backward(&mut g, &r, &ids, dim).unwrap();
        let f = |t: &[f64]| {
            let mut o = vec![0.0; ids.len() * dim];
            embedding_forward(&mut o, t, &ids, dim).unwrap();
            wsum(&r, &o)
        };
        fd_check(&f, &table, &g, 1e-9, rng.seed, "embedding");
        let mut o = vec![0.0; dim];
        assert!(matches!(
            embedding_forward(&mut o, &table, &[5], dim),
            Err(KernelError::Index { index: 5, .. })
        ));
    }
}
