//! The domain: the [`Broker`] service every protocol adapter calls, its error type, the audit
//! log it writes, and the admission control every adapter puts in front of it.

pub mod admission;
pub mod audit;
pub mod error;
mod metrics;
pub mod service;
mod settings;

pub use error::{BrokerError, BrokerErrorKind, BrokerResult};
pub use metrics::{DomainMetrics, RevokeCause};
pub use service::Broker;
pub use settings::TokenSettings;
