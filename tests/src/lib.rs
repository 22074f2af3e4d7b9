//! Helpers for multi-process end-to-end scenarios: locate the `moetrain` binary, start etcd,
//! run CLI commands and parse their JSON output.
