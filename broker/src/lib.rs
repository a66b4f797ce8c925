//! tokenbroker: a gRPC service that mints, rotates, revokes and introspects refresh and access
//! tokens for accounts identified by email, with the OAuth HTTP endpoints (RFC 7662, RFC 7009,
//! forward auth) beside it.
//!
//! The modules are layers; each imports only the ones listed before it (`scripts/check-layers`
//! enforces it):
//!
//! - [`model`]: the values every layer shares (ids, emails, times, token facts, secrets, the
//!   clock and the call's deadline);
//! - [`obs`]: logs, traces, trace context and the metrics registry;
//! - [`store`]: the atomic [`store::TokenStore`], its backends and decorators;
//! - [`identity`]: who is calling (API keys, Cognito JWTs, client certificates) and their roles;
//! - [`domain`]: the [`domain::Broker`] service (roles, lifetimes, idempotency, audit),
//!   [`BrokerError`] and admission control;
//! - [`grpc`]: the tonic adapter and its layers (size limit, tracing, RPC metrics),
//!   the only module besides `app` that knows tonic;
//! - [`http`]: the axum adapter (RFC 7662 introspection, RFC 7009 revocation, forward auth), in
//!   the same layer as `grpc`; neither adapter imports the other;
//! - [`app`]: settings, start-up, the command line, dev mode and the listener's TLS.

pub mod app;
pub mod domain;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod model;
pub mod obs;
pub mod store;

pub use app::Application;
pub use domain::{BrokerError, BrokerErrorKind, BrokerResult};
