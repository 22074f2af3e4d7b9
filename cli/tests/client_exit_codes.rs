//! Exit codes and output of the client commands without a coordinator: usage errors are 2, an
//! unreachable coordinator is 5 within `--timeout`, an unreadable manifest is 1; `--help` of
//! every client command documents the codes. (With a coordinator, codes 3, 4 and 6 are checked
//! by the e2e scenarios.) This file also makes `cargo test` build the `moetrain` binary that the
//! `e2e` package drives.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn moetrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moetrain"))
        .args(args)
        .env_remove("MOETRAIN_COORDINATOR")
        .output()
        .expect("running moetrain")
}

/// A loopback URL where nothing listens.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}", l.local_addr().unwrap())
}

#[test]
fn unreachable_coordinator_exits_5_quickly() {
    let url = dead_url();
    for args in [
        vec!["get", "jobs"],
        vec!["get", "workers", "-o", "json"],
        vec!["describe", "job", "x"],
        vec!["cancel", "x"],
    ] {
        let mut full = args.clone();
        full.extend(["--coordinator", &url, "--timeout", "2s"]);
        let t = Instant::now();
        let out = moetrain(&full);
        assert_eq!(
            out.status.code(),
            Some(5),
            "{full:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(t.elapsed() < Duration::from_secs(10));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("cannot reach the coordinator") || err.contains("timed out"),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "stdout must stay clean on errors");
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(moetrain(&["get", "pods"]).status.code(), Some(2));
    assert_eq!(
        moetrain(&["describe", "worker", "x"]).status.code(),
        Some(2)
    );
    assert_eq!(
        moetrain(&["get", "jobs", "--output", "xml"]).status.code(),
        Some(2)
    );
    assert_eq!(
        moetrain(&["worker", "--node", "n", "--device-kind", "tpu"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        moetrain(&["worker", "--node", "n", "--devices", "0"])
            .status
            .code(),
        Some(2)
    );
    let out = moetrain(&[
        "submit",
        "job.yaml",
        "--set",
        "no-equals-sign",
        "--coordinator",
        &dead_url(),
    ]);
    // The manifest is read first: a missing file is a plain error (1).
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn help_documents_exit_codes() {
    for cmd in ["submit", "get", "describe", "cancel"] {
        let out = moetrain(&[cmd, "--help"]);
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Exit codes: 0 ok"),
            "{cmd} --help lacks the exit codes"
        );
        assert!(
            text.contains("MOETRAIN_COORDINATOR"),
            "{cmd} --help lacks the env variable"
        );
    }
}
