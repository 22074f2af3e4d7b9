//! The cluster as the placement sees it: named nodes, each with the devices it offers. Devices on
//! one node share a fast interconnect (NVLink, or shared memory for CPU workers); nodes are joined
//! by a slower network (InfiniBand, or TCP).
//!
//! Invariant: node names are unique and non-empty, device indices are unique within a node, and
//! nodes are kept in natural name order (`node-2` before `node-10`), so a placement never depends on
//! the order in which workers registered.

use std::cmp::Ordering;

use crate::ids::DeviceIdx;
use crate::placement::PlacementError;

/// One machine: its name and the devices the placement may use on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The node's unique name (the worker daemons' `--node` value).
    pub name: String,
    /// The devices offered, ascending.
    pub devices: Vec<DeviceIdx>,
}

impl Node {
    /// A node offering devices `0..count`.
    pub fn uniform(name: impl Into<String>, count: u32) -> Self {
        Self {
            name: name.into(),
            devices: (0..count).map(DeviceIdx).collect(),
        }
    }
}

/// A set of nodes, in natural name order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    nodes: Vec<Node>,
}

impl Cluster {
    /// A cluster from nodes in any order; fails on empty or duplicate names and duplicate devices.
    /// Nodes without devices are kept (they simply hold nothing).
    pub fn new(nodes: Vec<Node>) -> Result<Self, PlacementError> {
        let mut nodes = nodes;
        for node in &mut nodes {
            if node.name.is_empty() {
                return Err(PlacementError::InvalidCluster(
                    "a node has an empty name".to_string(),
                ));
            }
            node.devices.sort_unstable();
            if let Some(pair) = node.devices.windows(2).find(|pair| pair[0] == pair[1]) {
                return Err(PlacementError::InvalidCluster(format!(
                    "node {} lists device {} twice",
                    node.name, pair[0]
                )));
            }
        }
        nodes.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        if let Some(pair) = nodes.windows(2).find(|pair| pair[0].name == pair[1].name) {
            return Err(PlacementError::InvalidCluster(format!(
                "node {} appears twice",
                pair[0].name
            )));
        }
        Ok(Self { nodes })
    }

    /// `count` nodes named `{prefix}{i}`, each offering devices `0..devices_per_node`.
    pub fn uniform(prefix: &str, count: u32, devices_per_node: u32) -> Self {
        let nodes = (0..count)
            .map(|i| Node::uniform(format!("{prefix}{i}"), devices_per_node))
            .collect();
        // Generated names are unique and devices distinct, so `new` cannot fail; sort anyway.
        let mut cluster = Self { nodes };
        cluster.nodes.sort_by(|a, b| natural_cmp(&a.name, &b.name));
        cluster
    }

    /// The nodes, in natural name order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node called `name`, if any.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|node| node.name == name)
    }

    /// Total devices over all nodes.
    pub fn total_devices(&self) -> u64 {
        self.nodes
            .iter()
            .map(|node| node.devices.len() as u64)
            .sum()
    }

    /// The most devices any one node offers.
    pub fn max_devices_per_node(&self) -> u32 {
        self.nodes
            .iter()
            .map(|node| node.devices.len() as u32)
            .max()
            .unwrap_or(0)
    }

    /// How many blocks of `block` devices the cluster holds when every block must sit on one node
    /// (blocks larger than every node may span nodes and are counted from the total).
    pub fn blocks_of(&self, block: u32) -> u64 {
        if block == 0 {
            return 0;
        }
        if block > self.max_devices_per_node() {
            return self.total_devices() / u64::from(block);
        }
        self.nodes
            .iter()
            .map(|node| node.devices.len() as u64 / u64::from(block))
            .sum()
    }
}

/// Natural order of names: runs of digits compare as numbers, so `n2 < n10`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let a_len = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let b_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (a_num, b_num) = (trim_zeros(&a[..a_len]), trim_zeros(&b[..b_len]));
                let order = a_num
                    .len()
                    .cmp(&b_num.len())
                    .then_with(|| a_num.cmp(b_num))
                    .then_with(|| a_len.cmp(&b_len));
                if order != Ordering::Equal {
                    return order;
                }
                a = &a[a_len..];
                b = &b[b_len..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&c| c == b'0').count();
    &digits[zeros..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_sorts_numbers_as_numbers() {
        let mut names = vec!["n10", "n2", "n1", "m3", "n02"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, vec!["m3", "n1", "n2", "n02", "n10"]);
    }

    #[test]
    fn cluster_sorts_nodes_and_rejects_duplicates() {
        let cluster = Cluster::new(vec![Node::uniform("b", 2), Node::uniform("a", 3)]).unwrap();
        assert_eq!(cluster.nodes()[0].name, "a");
        assert_eq!(cluster.total_devices(), 5);
        assert_eq!(cluster.blocks_of(2), 2);
        assert_eq!(cluster.blocks_of(4), 1);
        let err = Cluster::new(vec![Node::uniform("a", 1), Node::uniform("a", 1)]).unwrap_err();
        assert_eq!(err.to_string(), "invalid cluster: node a appears twice");
        let twice = Node {
            name: "x".into(),
            devices: vec![DeviceIdx(1), DeviceIdx(1)],
        };
        assert!(Cluster::new(vec![twice]).is_err());
    }
}
