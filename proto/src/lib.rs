//! The gRPC contract between CLI, coordinator and workers (package `moetrain.v1`).
//!
//! `pb` holds the code generated from `proto/moetrain/v1/*.proto` by `build.rs` (Debian protoc at
//! build time; see README.md for why). `convert` is the only place where wire types meet domain
//! types (durations, times, phase and device names).
//!
//! Invariant: this is the only crate that depends on prost; the generated code is never edited.

pub mod convert;

/// Generated messages, clients and servers of package `moetrain.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("moetrain.v1");
}

pub use convert::ConvertError;

/// Encodes a generated message into its protobuf bytes (used by the coordinator's store).
pub fn encode<M: prost::Message>(msg: &M) -> Vec<u8> {
    msg.encode_to_vec()
}

/// Decodes protobuf bytes into a generated message; `what` names the record for the error.
pub fn decode<M: prost::Message + Default>(
    what: &'static str,
    bytes: &[u8],
) -> Result<M, ConvertError> {
    M::decode(bytes).map_err(|err| ConvertError::Decode {
        what,
        detail: err.to_string(),
    })
}
