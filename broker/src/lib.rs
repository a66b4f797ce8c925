//! tokenbroker: a gRPC service that mints, rotates, revokes and introspects refresh and access
//! tokens for accounts identified by email.
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
//! - [`app`]: settings, start-up, the command line, dev mode and the listener's TLS.

pub mod app;
pub mod domain;
pub mod grpc;
pub mod identity;
pub mod model;
pub mod obs;
pub mod store;

pub use app::Application;
pub use domain::{BrokerError, BrokerErrorKind, BrokerResult};
