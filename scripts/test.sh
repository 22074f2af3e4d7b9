#!/usr/bin/env bash
# The test command: installs what the tests need (protoc, etcd), then checks formatting, the
# dependency invariants of ARCHITECTURE.md, clippy, and runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo xtask ci
