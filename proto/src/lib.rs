//! The gRPC contract between CLI, coordinator and workers (package `moetrain.v1`).
