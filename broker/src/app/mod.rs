//! The application: settings, start-up and shutdown, the command line, dev mode and the
//! listener's TLS.

pub mod cli;
pub mod dev;
pub mod settings;
pub mod startup;
pub mod tls;

pub use startup::Application;
