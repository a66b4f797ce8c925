//! Who is calling: API keys, Cognito JWTs and client certificates, resolved to a [`Caller`]
//! with roles.

pub mod auth;
pub mod cognito;
mod error;
pub mod subject;

pub use auth::{Authenticator, Caller, Role, require};
pub use error::{AuthError, AuthResult};
