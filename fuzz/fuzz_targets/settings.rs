//! The broker's settings: an arbitrary TOML file and arbitrary environment overrides, loaded
//! and checked as at start-up (`Settings::load_with`).
//!
//! The input is the file's text, then (after a NUL byte, when there is one) the environment,
//! one `NAME=VALUE` per line, each name taken after the `TOKENBROKER_` prefix (so
//! `SERVER__LISTEN=…` is `TOKENBROKER_SERVER__LISTEN`). The target asserts that loading never
//! panics: every bad file, variable or value is a `ConfigError`.
//!
//! Loading reads the key files the settings name (`store.fauna.secret_file`,
//! `audit.email_hmac_key_file`). Left to the fuzzer those paths could name `/dev/zero` or a
//! FIFO, which would only test the machine, so the target points any configured key file at a
//! file of its own, holding a key, before the settings are checked.

#![no_main]

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use libfuzzer_sys::fuzz_target;
use tokenbroker::app::settings::{ENV_PREFIX, Settings};

/// The target's files: the TOML it loads and the key file (one pair per fuzzing process).
struct Files {
    toml: PathBuf,
    key: PathBuf,
}

fn files() -> &'static Files {
    static FILES: OnceLock<Files> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = std::env::temp_dir();
        let pid = std::process::id();
        let key = dir.join(format!("tokenbroker-fuzz-settings-{pid}.key"));
        std::fs::write(&key, "fnAEfuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzz\n").expect("temp dir writable");
        Files {
            toml: dir.join(format!("tokenbroker-fuzz-settings-{pid}.toml")),
            key,
        }
    })
}

fn redirect(file: &mut Option<PathBuf>, to: &Path) {
    if file.is_some() {
        *file = Some(to.to_owned());
    }
}

fuzz_target!(|data: &[u8]| {
    let (toml, env) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(env) = std::str::from_utf8(env) else {
        return;
    };
    let env: HashMap<String, String> = env
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (format!("{ENV_PREFIX}{name}"), value.to_owned()))
        .collect();
    let files = files();
    std::fs::write(&files.toml, toml).expect("the temp dir is writable");
    let loaded = Settings::load_with(Some(&files.toml), &env, |settings| {
        redirect(&mut settings.store.fauna.secret_file, &files.key);
        redirect(&mut settings.audit.email_hmac_key_file, &files.key);
    });
    std::hint::black_box(loaded.is_ok());
});
