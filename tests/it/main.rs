//! The tokenbroker integration tests: one binary, one module per area, every test against a
//! real broker over gRPC on loopback.

mod audit;
mod bad_input;
mod cli;
mod cognito;
mod concurrency;
mod deploy;
mod dev_mode;
mod direct_exchange;
mod durability;
mod fauna;
mod flood;
mod grpc_web;
mod grpcurl;
mod h2_limits;
mod http;
mod http_nginx;
mod introspect;
mod issue;
mod limits;
mod list;
mod metrics;
mod otel;
mod postgres;
mod refresh;
mod replicas;
mod revoke;
mod secrets;
mod server;
mod soak;
mod tls;
mod trigger;

use tokenbroker_client::{ClientErrorKind, ClientResult};

/// Returns the error class of a call that must fail.
#[track_caller]
fn kind_of<T: std::fmt::Debug>(result: ClientResult<T>) -> ClientErrorKind {
    result.expect_err("the call must fail").kind()
}
