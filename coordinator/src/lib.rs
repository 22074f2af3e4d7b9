//! The control plane: accepts jobs, keeps cluster state in a store (etcd or in-memory), places
//! ranks, watches liveness. Never links model or kernel code.
//!
//! # Layout
//! - [`core`]: the sans-IO state machine (`Core::handle(event, now) -> actions`), with the pure
//!   decisions `scheduler::schedule` (gang scheduling + placement) and `liveness::liveness`.
//! - [`store`]: the [`StateStore`] trait, [`MemStore`] (default; lost on exit) and [`EtcdStore`]
//!   (durable; a restarted coordinator resumes everything), and the key layout in `store::keys`.
//! - [`server`]: [`run`] — tonic services (`Coordinator` for clients, `WorkerSession` for workers),
//!   the store writer, the ticker, and bounded shutdown.
//! - [`spec`]: manifest text to the job spec the core schedules.
//! - [`Config`] and [`Error`].

pub mod balance;
pub mod config;
pub mod core;
mod error;
pub mod server;
pub mod spec;
pub mod store;

pub use config::Config;
pub use error::Error;
pub use server::run;
pub use store::{EtcdStore, MemStore, StateStore, StoreError};
