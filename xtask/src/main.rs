//! Project chores, written in Rust so they run the same everywhere.
//!
//! - `cargo xtask deps-check`: verifies the dependency invariants of ARCHITECTURE.md from
//!   `cargo metadata` (normal dependencies only; dev-dependencies may use anything).
//! - `cargo xtask ci`: what `.ci/run` runs after installing system packages: fmt, clippy,
//!   deps-check, tests.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// Crates that never reach the async runtime, RPC, the store or YAML (compute threads call them).
const PURE: &[&str] = &[
    "plan", "arch", "kernels", "model", "comm", "executor", "routing",
];
/// What those crates must never reach, directly or transitively.
const IMPURE: &[&str] = &[
    "tokio",
    "tonic",
    "etcd-client",
    "serde-saphyr",
    "prost",
    "opentelemetry",
];
/// Direct dependencies that exactly one crate of ours may list.
const OWNED: &[(&str, &str)] = &[
    ("prost", "proto"),
    ("serde-saphyr", "manifest"),
    ("etcd-client", "coordinator"),
];

fn main() -> Result<()> {
    let task = std::env::args().nth(1).unwrap_or_default();
    match task.as_str() {
        "deps-check" => deps_check(),
        "ci" => ci(),
        _ => bail!("usage: cargo xtask <deps-check|ci>"),
    }
}

fn ci() -> Result<()> {
    run("cargo", &["fmt", "--all", "--check"])?;
    deps_check()?;
    run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    run("cargo", &["test", "--workspace", "--no-fail-fast"])?;
    Ok(())
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    eprintln!("$ {cmd} {}", args.join(" "));
    let status = Command::new(cmd)
        .args(args)
        .status()
        .with_context(|| format!("starting {cmd}"))?;
    if !status.success() {
        bail!("`{cmd} {}` failed with {status}", args.join(" "));
    }
    Ok(())
}

/// The resolved normal-dependency graph of the workspace: package name -> direct deps' names.
struct Graph {
    deps: BTreeMap<String, BTreeSet<String>>,
    members: BTreeSet<String>,
}

fn load_graph() -> Result<Graph> {
    let out = Command::new("cargo")
        .args(["metadata", "--format-version", "1"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let mut id_to_name = BTreeMap::new();
    for pkg in meta["packages"]
        .as_array()
        .context("metadata has no packages")?
    {
        let id = pkg["id"].as_str().context("package without id")?;
        let name = pkg["name"].as_str().context("package without name")?;
        id_to_name.insert(id.to_string(), name.to_string());
    }
    let members = meta["workspace_members"]
        .as_array()
        .context("metadata has no workspace_members")?
        .iter()
        .filter_map(|id| id.as_str().and_then(|id| id_to_name.get(id)).cloned())
        .collect();
    let mut deps: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"]
        .as_array()
        .context("metadata has no resolve graph")?
    {
        let name = id_to_name
            .get(node["id"].as_str().unwrap_or_default())
            .cloned()
            .unwrap_or_default();
        let entry = deps.entry(name).or_default();
        for dep in node["deps"].as_array().into_iter().flatten() {
            let normal = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|k| k["kind"].is_null());
            if normal && let Some(dep_name) = dep["pkg"].as_str().and_then(|id| id_to_name.get(id))
            {
                entry.insert(dep_name.clone());
            }
        }
    }
    Ok(Graph { deps, members })
}

impl Graph {
    fn closure(&self, root: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![root.to_string()];
        while let Some(name) = stack.pop() {
            for dep in self.deps.get(&name).into_iter().flatten() {
                if seen.insert(dep.clone()) {
                    stack.push(dep.clone());
                }
            }
        }
        seen
    }
}

fn deps_check() -> Result<()> {
    let graph = load_graph()?;
    let mut violations = Vec::new();
    for krate in PURE.iter().filter(|k| graph.members.contains(**k)) {
        let reach = graph.closure(krate);
        for bad in IMPURE.iter().filter(|b| reach.contains(**b)) {
            violations.push(format!(
                "synchronous crate `{krate}` depends (transitively) on `{bad}`"
            ));
        }
    }
    let coord = graph.closure("coordinator");
    for bad in ["model", "kernels"] {
        if coord.contains(bad) {
            violations.push(format!(
                "`coordinator` links `{bad}`: the control plane never links compute code"
            ));
        }
    }
    for (dep, owner) in OWNED {
        for member in &graph.members {
            let direct = graph.deps.get(member).is_some_and(|d| d.contains(*dep));
            if direct && member != owner {
                violations.push(format!(
                    "`{member}` lists `{dep}` directly; only `{owner}` may"
                ));
            }
        }
    }
    if violations.is_empty() {
        eprintln!(
            "deps-check: all dependency invariants hold ({} workspace crates)",
            graph.members.len()
        );
        Ok(())
    } else {
        for v in &violations {
            eprintln!("deps-check: {v}");
        }
        bail!("{} dependency invariant(s) violated", violations.len())
    }
}
