//! The domain: the [`Broker`] service every protocol adapter calls, its error type, and the
//! audit log it writes.

pub mod audit;
pub mod error;
mod metrics;
pub mod service;
mod settings;

pub use error::{BrokerError, BrokerErrorKind, BrokerResult};
pub use metrics::{DomainMetrics, RevokeCause};
pub use service::Broker;
pub use settings::TokenSettings;
