//! The tokenbroker gRPC API (`tokenbroker.v1`), generated from `tokenbroker/v1/broker.proto`.

#![allow(unreachable_pub, missing_debug_implementations)]

pub mod rpc;
pub mod strict;

/// Package `tokenbroker.v1`: messages, the `TokenBroker` client and server.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, rust_2018_idioms)]
    tonic::include_proto!("tokenbroker.v1");
}

/// The encoded `FileDescriptorSet` of every tokenbroker proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("tokenbroker_descriptor");
