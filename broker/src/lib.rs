//! tokenbroker: a gRPC service that mints, rotates, revokes and introspects refresh and access
//! tokens for accounts identified by email.
//!
//! Layers, outermost first: [`grpc`] (the only module that knows tonic) → [`service`] (roles,
//! lifetimes, idempotency) → [`store`] (an atomic [`store::TokenStore`] with decorators).

pub mod audit;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod cognito;
pub mod config;
pub mod deadline;
pub mod dev;
pub mod error;
pub mod grpc;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod secret;
pub mod service;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use error::{BrokerError, BrokerErrorKind, BrokerResult};
pub use startup::Application;
