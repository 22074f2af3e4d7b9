//! One module per subcommand.
pub mod plan;
pub mod schedule;
pub mod cancel;
pub mod client_common;
pub mod coordinator;
pub mod describe;
pub mod get;
pub mod submit;
pub mod worker;
pub mod fp8;
pub mod step;
pub mod eval;
pub mod train;
