//! One module per subcommand.
pub mod cancel;
pub mod client_common;
pub mod coordinator;
pub mod describe;
pub mod eval;
pub mod experts;
pub mod fp8;
pub mod get;
pub mod local;
pub mod plan;
pub mod schedule;
pub mod step;
pub mod submit;
pub mod train;
pub mod worker;
