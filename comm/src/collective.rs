//! Collectives written once on top of keyed point-to-point messages: all-to-all-v (expert
//! dispatch and combine), reduce-scatter, all-gather and all-reduce of f32 (ZeRO-1 and the
//! DualPipe mirror-stage gradient sum), and a barrier.
//!
//! # Reduction order and the bitwise guarantee
//! A reduction over a group of `G` ranks with inputs `x_0 … x_{G-1}` (indexed by group position,
//! i.e. ascending global rank) computes, for every element `k`,
//!
//! `((x_0[k] + x_1[k]) + x_2[k]) + … + x_{G-1}[k]`
//!
//! in f32 with round-to-nearest-even, starting from `x_0[k]` itself (not from `+0.0`). Each
//! element is summed by exactly one rank, the owner of its shard ([`shard_range`]), after all
//! contributions have arrived, in that fixed order; the all-gather then copies the owner's bits
//! to everyone. So the result is a pure function of the inputs: bitwise identical on every rank,
//! across repeated runs, and whatever order the messages arrive in; it also equals a sequential
//! single-process loop adding the ranks' vectors in group order.
//!
//! Every collective takes one `timeout` for the whole operation; a receive that exceeds what is
//! left fails with [`CommError::Timeout`] naming the peer and key.

use std::ops::Range;
use std::time::{Duration, Instant};

use crate::codec::{f32_from_bytes, f32_to_bytes};
use crate::{CommError, DataPlane, Group, Key, Op, Result, Tag};

/// The elements of a `len`-element buffer owned by group position `index` out of `parts`:
/// contiguous, in position order, the first `len % parts` shards one element longer.
pub fn shard_range(len: usize, parts: usize, index: usize) -> Range<usize> {
    let base = len / parts;
    let extra = len % parts;
    let start = index * base + index.min(extra);
    let size = base + usize::from(index < extra);
    start..start + size
}

fn my_position<P: DataPlane + ?Sized>(plane: &P, group: &Group) -> Result<usize> {
    let rank = plane.rank();
    group.position(rank).ok_or_else(|| {
        CommError::InvalidArgument(format!(
            "rank {rank} is not a member of group {:?}",
            group.ranks()
        ))
    })
}

/// One collective's time budget: receives get what is left of it, and a timeout reports the time
/// since the collective started.
struct Deadline {
    start: Instant,
    end: Option<Instant>,
}

impl Deadline {
    fn new(timeout: Duration) -> Self {
        let start = Instant::now();
        Self {
            start,
            end: start.checked_add(timeout),
        }
    }

    fn recv<P: DataPlane + ?Sized>(&self, plane: &P, peer: usize, key: Key) -> Result<Vec<u8>> {
        let left = match self.end {
            Some(end) => end.saturating_duration_since(Instant::now()),
            None => Duration::MAX,
        };
        plane.recv_keyed(peer, key, left).map_err(|e| match e {
            CommError::Timeout {
                rank, peer, key, ..
            } => CommError::Timeout {
                rank,
                peer,
                key,
                elapsed: self.start.elapsed(),
            },
            other => other,
        })
    }
}

/// Sends `payloads[i]` to group position `i` (any length, zero included; the own entry is kept
/// locally) and returns, indexed by group position, what every member sent to this rank.
///
/// This is the expert-parallel dispatch and combine: the payload lengths are the per-destination
/// counts, and the payload bytes are whatever the caller encoded (FP8 codes with power-of-two
/// scales for dispatch, bf16 for combine; see [`crate::codec`]).
pub fn all_to_all_v<P: DataPlane + ?Sized>(
    plane: &P,
    group: &Group,
    tag: Tag,
    payloads: Vec<Vec<u8>>,
    timeout: Duration,
) -> Result<Vec<Vec<u8>>> {
    let me = my_position(plane, group)?;
    let n = group.len();
    if payloads.len() != n {
        return Err(CommError::InvalidArgument(format!(
            "all_to_all_v got {} payloads for a group of {n}",
            payloads.len()
        )));
    }
    let _span = tracing::trace_span!("dataplane", op = "all_to_all_v", %tag, n).entered();
    let deadline = Deadline::new(timeout);
    let key = Key {
        tag,
        op: Op::AllToAll,
        group: group.id(),
    };
    let mut out: Vec<Vec<u8>> = vec![Vec::new(); n];
    let mut payloads: Vec<Option<Vec<u8>>> = payloads.into_iter().map(Some).collect();
    // Start with the next position so that the ranks do not all send to position 0 first.
    for step in 0..n {
        let dest = (me + step) % n;
        let payload = payloads[dest].take().unwrap_or_default();
        if dest == me {
            out[me] = payload;
        } else {
            plane.send_keyed(group.rank_at(dest), key, payload)?;
        }
    }
    for step in 1..n {
        let src = (me + n - step) % n;
        out[src] = deadline.recv(plane, group.rank_at(src), key)?;
    }
    Ok(out)
}

/// Returns this rank's shard ([`shard_range`] of `data.len()`) of the element-wise sum of every
/// member's `data`, summed in group order (see the module docs). Every member must pass a buffer
/// of the same length.
pub fn reduce_scatter_sum_f32<P: DataPlane + ?Sized>(
    plane: &P,
    group: &Group,
    tag: Tag,
    data: &[f32],
    timeout: Duration,
) -> Result<Vec<f32>> {
    let _span =
        tracing::trace_span!("dataplane", op = "reduce_scatter", %tag, len = data.len()).entered();
    let deadline = Deadline::new(timeout);
    reduce_scatter(
        plane,
        group,
        Key {
            tag,
            op: Op::ReduceScatter,
            group: group.id(),
        },
        data,
        &deadline,
    )
}

fn reduce_scatter<P: DataPlane + ?Sized>(
    plane: &P,
    group: &Group,
    key: Key,
    data: &[f32],
    deadline: &Deadline,
) -> Result<Vec<f32>> {
    let me = my_position(plane, group)?;
    let n = group.len();
    for step in 1..n {
        let dest = (me + step) % n;
        plane.send_keyed(
            group.rank_at(dest),
            key,
            f32_to_bytes(&data[shard_range(data.len(), n, dest)]),
        )?;
    }
    let mine = shard_range(data.len(), n, me);
    let mut acc: Vec<f32> = Vec::new();
    for src in 0..n {
        let contribution = if src == me {
            data[mine.clone()].to_vec()
        } else {
            let bytes = deadline.recv(plane, group.rank_at(src), key)?;
            if bytes.len() != mine.len() * 4 {
                return Err(CommError::SizeMismatch {
                    rank: plane.rank(),
                    peer: group.rank_at(src),
                    key,
                    expected: mine.len() * 4,
                    got: bytes.len(),
                });
            }
            let values = f32_from_bytes(&bytes)?;
            plane.recycle(bytes);
            values
        };
        if src == 0 {
            acc = contribution;
        } else {
            for (a, c) in acc.iter_mut().zip(&contribution) {
                *a += *c;
            }
        }
    }
    Ok(acc)
}

/// Concatenates every member's `shard` in group order (shards may differ in length).
pub fn all_gather_f32<P: DataPlane + ?Sized>(
    plane: &P,
    group: &Group,
    tag: Tag,
    shard: &[f32],
    timeout: Duration,
) -> Result<Vec<f32>> {
    let _span =
        tracing::trace_span!("dataplane", op = "all_gather", %tag, len = shard.len()).entered();
    let deadline = Deadline::new(timeout);
    all_gather(
        plane,
        group,
        Key {
            tag,
            op: Op::AllGather,
            group: group.id(),
        },
        shard,
        &deadline,
    )
}

fn all_gather<P: DataPlane + ?Sized>(
    plane: &P,
    group: &Group,
    key: Key,
    shard: &[f32],
    deadline: &Deadline,
) -> Result<Vec<f32>> {
    let me = my_position(plane, group)?;
    let n = group.len();
    let bytes = f32_to_bytes(shard);
    for step in 1..n {
        plane.send_keyed(group.rank_at((me + step) % n), key, bytes.clone())?;
    }
    let mut out = Vec::new();
    for src in 0..n {
        if src == me {
            out.extend_from_slice(shard);
        } else {
            let bytes = deadline.recv(plane, group.rank_at(src), key)?;
            out.extend(f32_from_bytes(&bytes)?);
            plane.recycle(bytes);
        }
    }
    Ok(out)
}

/// Replaces `data` by the element-wise sum of every member's `data` in group order: a
/// reduce-scatter (each shard summed once, by its owner) followed by an all-gather, so every
/// member ends with the same bits (see the module docs).
pub fn all_reduce_sum_f32<P: DataPlane + ?Sized>(
    plane: &P,
    group: &Group,
    tag: Tag,
    data: &mut [f32],
    timeout: Duration,
) -> Result<()> {
    let _span =
        tracing::trace_span!("dataplane", op = "all_reduce", %tag, len = data.len()).entered();
    let deadline = Deadline::new(timeout);
    let shard = reduce_scatter(
        plane,
        group,
        Key {
            tag,
            op: Op::AllReduceScatter,
            group: group.id(),
        },
        data,
        &deadline,
    )?;
    let key = Key {
        tag,
        op: Op::AllReduceGather,
        group: group.id(),
    };
    let full = all_gather(plane, group, key, &shard, &deadline)?;
    if full.len() != data.len() {
        // Only possible if some member passed a buffer of another length.
        return Err(CommError::InvalidArgument(format!(
            "all_reduce_sum_f32 {key}: gathered {} values for a buffer of {} (members passed different lengths)",
            full.len(),
            data.len()
        )));
    }
    data.copy_from_slice(&full);
    Ok(())
}

/// Returns once every group member has entered the barrier with the same tag: each member
/// sends an empty message to every other and waits for one from each.
pub fn barrier<P: DataPlane + ?Sized>(
    plane: &P,
    group: &Group,
    tag: Tag,
    timeout: Duration,
) -> Result<()> {
    let me = my_position(plane, group)?;
    let n = group.len();
    let _span = tracing::trace_span!("dataplane", op = "barrier", %tag, n).entered();
    let deadline = Deadline::new(timeout);
    let key = Key {
        tag,
        op: Op::Barrier,
        group: group.id(),
    };
    for step in 1..n {
        plane.send_keyed(group.rank_at((me + step) % n), key, Vec::new())?;
    }
    for step in 1..n {
        deadline.recv(plane, group.rank_at((me + n - step) % n), key)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_tile_the_buffer() {
        for len in [0usize, 1, 5, 8, 13] {
            for parts in 1..5 {
                let ranges: Vec<_> = (0..parts).map(|i| shard_range(len, parts, i)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[parts - 1].end, len);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len() >= w[1].len() && w[0].len() - w[1].len() <= 1);
                }
            }
        }
    }
}
