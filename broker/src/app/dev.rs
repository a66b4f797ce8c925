//! Dev mode: with no config at all, the broker generates one API key per role, prints them
//! once and writes them to `<data dir>/dev-keys.env` (mode 0600), like `vault server -dev`.
//! Each start generates new keys; none is valid after the process exits.

use std::{fmt::Write as _, fs, io::Write as _, path::Path};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};

use crate::{
    identity::{Role, auth::ApiKeyConfig},
    model::secret::sha256,
};

/// The file, inside the data directory, that dev mode writes its keys to.
pub const DEV_KEYS_FILE: &str = "dev-keys.env";

/// A generated key and its configuration entry.
pub struct DevKey {
    /// The environment variable name the key is exported as.
    pub variable: &'static str,
    /// The key.
    pub key: SecretString,
    /// The configuration entry (name, roles, digest).
    pub config: ApiKeyConfig,
}

impl std::fmt::Debug for DevKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevKey")
            .field("variable", &self.variable)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Returns a new random API key: `tbk_` and 256 bits in base64url.
pub fn generate_api_key() -> SecretString {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    SecretString::from(format!("tbk_{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// Returns the hex SHA-256 of an API key, as `api_keys[].sha256` wants it.
pub fn api_key_digest(key: &SecretString) -> String {
    hex::encode(sha256(key.expose_secret().as_bytes()))
}

/// Generates one key per role: `dev-admin`, `dev-trigger`, `dev-service`.
pub fn generate_dev_keys() -> Vec<DevKey> {
    [
        ("TB_ADMIN_KEY", "dev-admin", Role::Admin),
        ("TB_TRIGGER_KEY", "dev-trigger", Role::Trigger),
        ("TB_SERVICE_KEY", "dev-service", Role::Service),
    ]
    .into_iter()
    .map(|(variable, name, role)| {
        let key = generate_api_key();
        let config = ApiKeyConfig {
            name: name.into(),
            roles: vec![role],
            sha256: api_key_digest(&key),
        };
        DevKey {
            variable,
            key,
            config,
        }
    })
    .collect()
}

/// Renders the keys as `export NAME=key` lines.
pub fn render_exports(keys: &[DevKey]) -> String {
    keys.iter().fold(String::new(), |mut out, k| {
        let _ = writeln!(out, "export {}={}", k.variable, k.key.expose_secret());
        out
    })
}

/// Writes the keys to `<dir>/dev-keys.env`, readable by the owner only.
///
/// # Errors
///
/// When the file cannot be written.
pub fn write_keys_file(dir: &Path, keys: &[DevKey]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let path = dir.join(DEV_KEYS_FILE);
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(render_exports(keys).as_bytes())
}
