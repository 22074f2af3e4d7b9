//! The worker daemon: registers with the coordinator, heartbeats, receives assignments.
