//! The `Cluster` manifest (`apiVersion: moetrain/v1`, `kind: Cluster`) that `moetrain plan
//! --cluster` reads: explicit nodes and/or generated groups of identical nodes.
//!
//! Invariant: lowering yields a `plan::topology::Cluster`, so duplicate node names are reported
//! with the same located errors as every other field.

use serde::{Deserialize, Serialize};

use crate::de::NodeDe;
use crate::error::ManifestError;
use crate::job::{ApiVersion, Metadata};
use crate::tree::Node as Tree;

/// A cluster description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterManifest {
    /// Always `moetrain/v1`.
    pub api_version: ApiVersion,
    /// Always `Cluster`.
    pub kind: ClusterKind,
    /// Name and labels.
    pub metadata: Metadata,
    /// The nodes.
    pub spec: ClusterSpec,
}

/// The manifest kind of a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterKind {
    /// A cluster description.
    Cluster,
}

/// Nodes, listed one by one or generated in groups.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSpec {
    /// `count` nodes named `{prefix}{i}`, each with `devicesPerNode` devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_groups: Vec<NodeGroup>,
    /// Individually named nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeSpec>,
}

/// A group of identical nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeGroup {
    /// Name prefix; node `i` is `{prefix}{i}`.
    pub prefix: String,
    /// Number of nodes.
    pub count: u32,
    /// Devices per node, numbered from 0.
    pub devices_per_node: u32,
}

/// One node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    /// Unique node name.
    pub name: String,
    /// Devices, numbered from 0.
    pub devices: u32,
}

/// Parses a cluster manifest into the placement's cluster.
pub fn parse_cluster(src: &str, origin: &str) -> Result<plan::topology::Cluster, ManifestError> {
    let tree = Tree::parse(src, origin)?;
    let manifest = ClusterManifest::deserialize(NodeDe::root(&tree))
        .map_err(|err| err.into_manifest_error(origin))?;
    let field = |path: &str, message: String| ManifestError::Field {
        origin: origin.to_string(),
        at: tree.locate(path),
        path: path.to_string(),
        message,
    };
    let mut nodes = Vec::new();
    for (index, group) in manifest.spec.node_groups.iter().enumerate() {
        if group.prefix.is_empty() {
            return Err(field(
                &format!("spec.nodeGroups[{index}].prefix"),
                "must not be empty".into(),
            ));
        }
        for i in 0..group.count {
            nodes.push(plan::topology::Node::uniform(
                format!("{}{i}", group.prefix),
                group.devices_per_node,
            ));
        }
    }
    for node in &manifest.spec.nodes {
        nodes.push(plan::topology::Node::uniform(
            node.name.clone(),
            node.devices,
        ));
    }
    if nodes.is_empty() {
        return Err(field("spec", "lists no nodes".into()));
    }
    plan::topology::Cluster::new(nodes).map_err(|err| ManifestError::Field {
        origin: origin.to_string(),
        at: tree.locate("spec"),
        path: "spec".into(),
        message: err.to_string(),
    })
}
