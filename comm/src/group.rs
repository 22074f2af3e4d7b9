//! [`Group`]: the ranks that take part in one collective, in a canonical order.
//!
//! Invariant: a group's members are distinct and sorted ascending, so every member derives the
//! same group positions, the same shard ownership and the same reduction order from the same set
//! of ranks, however the caller listed them; its [`Group::id`] is a function of that list only.

use crate::{CommError, Result};

/// An ordered set of distinct ranks (ascending). Position `i` in the group is "group rank" `i`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Group {
    ranks: Vec<usize>,
    id: u32,
}

impl Group {
    /// A group of `ranks` (any order; they are sorted). Fails if empty or if a rank repeats.
    pub fn new(mut ranks: Vec<usize>) -> Result<Self> {
        if ranks.is_empty() {
            return Err(CommError::InvalidArgument(
                "a group needs at least one rank".into(),
            ));
        }
        ranks.sort_unstable();
        if let Some(pair) = ranks.windows(2).find(|w| w[0] == w[1]) {
            return Err(CommError::InvalidArgument(format!(
                "rank {} appears twice in a group",
                pair[0]
            )));
        }
        let id = fnv1a(&ranks);
        Ok(Self { ranks, id })
    }

    /// The group of all `world_size` ranks.
    pub fn world(world_size: usize) -> Result<Self> {
        Self::new((0..world_size).collect())
    }

    /// The members, ascending.
    pub fn ranks(&self) -> &[usize] {
        &self.ranks
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.ranks.len()
    }

    /// Always false: a group has at least one member.
    pub fn is_empty(&self) -> bool {
        self.ranks.is_empty()
    }

    /// The global rank at group position `index`.
    pub fn rank_at(&self, index: usize) -> usize {
        self.ranks[index]
    }

    /// The group position of global rank `rank`, if it is a member.
    pub fn position(&self, rank: usize) -> Option<usize> {
        self.ranks.binary_search(&rank).ok()
    }

    /// A 32-bit identifier of the member list (FNV-1a), part of every collective message's key so
    /// that collectives of different groups with the same tag never mix.
    pub fn id(&self) -> u32 {
        self.id
    }
}

fn fnv1a(ranks: &[usize]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &rank in ranks {
        for byte in (rank as u64).to_le_bytes() {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    // Zero is reserved for point-to-point keys.
    if hash == 0 { 1 } else { hash }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_canonical_and_duplicates_rejected() {
        let a = Group::new(vec![5, 1, 3]).unwrap();
        let b = Group::new(vec![1, 3, 5]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.position(3), Some(1));
        assert_eq!(a.position(2), None);
        assert_ne!(a.id(), Group::new(vec![1, 3]).unwrap().id());
        let err = Group::new(vec![2, 2]).unwrap_err().to_string();
        assert!(err.contains("rank 2 appears twice"), "{err}");
        assert!(Group::new(vec![]).is_err());
    }
}
