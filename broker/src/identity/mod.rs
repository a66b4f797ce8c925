//! Who is calling: API keys, Cognito JWTs and client certificates, resolved to a [`Caller`]
//! with roles.

pub mod auth;
mod caller;
pub mod cognito;
mod error;
pub mod subject;

pub use auth::Authenticator;
pub use caller::{Caller, DirectExchange, Role, require};
pub use error::{AuthError, AuthResult};
