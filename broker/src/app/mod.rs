//! The application: settings, start-up and shutdown, the command line, dev mode and the
//! listener's caps, TLS and write coalescing.

pub mod cli;
pub mod coalesce;
pub mod dev;
pub mod listener;
pub mod settings;
pub mod startup;
pub mod tls;

pub use startup::Application;
