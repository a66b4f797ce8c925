//! What a run reads besides its arguments: the caller's credential (a key file or the
//! environment) and a token secret (stdin). Never the command line: arguments show in `ps` and
//! in shell history. Every copy of a secret read here is zeroized or wrapped in `SecretString`.

use std::{
    io::{BufRead as _, IsTerminal as _, Write as _},
    path::Path,
};

use secrecy::{ExposeSecret as _, SecretString, zeroize::Zeroize as _};

use crate::{
    Failure,
    args::{ENV_API_KEY, ENV_COGNITO_TOKEN},
};

/// Returns the caller's credential: `--api-key-file`, else `TB_API_KEY` or
/// `TB_COGNITO_TOKEN` (not both). `None` when there is none: the broker then decides
/// (UNAUTHENTICATED where one is needed).
pub(crate) fn credential(
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<SecretString>, Failure> {
    if let Some(path) = file {
        let mut text = std::fs::read_to_string(path).map_err(|err| {
            Failure::usage(format!(
                "cannot read the key file {}: {err}",
                path.display()
            ))
        })?;
        let key = SecretString::from(text.trim().to_owned());
        text.zeroize();
        if key.expose_secret().is_empty() {
            return Err(Failure::usage(format!(
                "the key file {} is empty",
                path.display()
            )));
        }
        return Ok(Some(key));
    }
    let present = |name| env(name).filter(|value| !value.trim().is_empty());
    match (present(ENV_API_KEY), present(ENV_COGNITO_TOKEN)) {
        (Some(_), Some(_)) => Err(Failure::usage(format!(
            "both {ENV_API_KEY} and {ENV_COGNITO_TOKEN} are set; unset one"
        ))),
        (Some(value), None) | (None, Some(value)) => {
            Ok(Some(SecretString::from(value.trim().to_owned())))
        }
        (None, None) => Ok(None),
    }
}

/// Reads one line from stdin as a secret; a prompt goes to stderr when stdin is a terminal.
pub(crate) fn read_secret(what: &str) -> Result<SecretString, Failure> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let _ = write!(
            std::io::stderr(),
            "paste {what} and press Enter (it is echoed; a pipe avoids that): "
        );
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|err| Failure::usage(format!("cannot read {what} from stdin: {err}")))?;
    let secret = SecretString::from(line.trim().to_owned());
    line.zeroize();
    if secret.expose_secret().is_empty() {
        return Err(Failure::usage(format!("no {what} on stdin")));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::Exit;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn credential_comes_from_the_file_before_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "tbk_from_file\n").unwrap();
        let key = credential(Some(&file), &env(&[(ENV_API_KEY, "tbk_from_env")]))
            .unwrap()
            .unwrap();
        assert_eq!(key.expose_secret(), "tbk_from_file");
        let key = credential(None, &env(&[(ENV_API_KEY, "tbk_from_env")]))
            .unwrap()
            .unwrap();
        assert_eq!(key.expose_secret(), "tbk_from_env");
        let token = credential(None, &env(&[(ENV_COGNITO_TOKEN, "eyJ.a.b")]))
            .unwrap()
            .unwrap();
        assert_eq!(token.expose_secret(), "eyJ.a.b");
        assert!(credential(None, &env(&[])).unwrap().is_none());
    }

    #[test]
    fn ambiguous_or_empty_credentials_are_usage_errors() {
        let both = env(&[(ENV_API_KEY, "k"), (ENV_COGNITO_TOKEN, "t")]);
        assert_eq!(credential(None, &both).unwrap_err().exit(), Exit::Usage);
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n").unwrap();
        assert_eq!(
            credential(Some(&empty), &env(&[])).unwrap_err().exit(),
            Exit::Usage
        );
        let missing = dir.path().join("missing");
        assert_eq!(
            credential(Some(&missing), &env(&[])).unwrap_err().exit(),
            Exit::Usage
        );
    }
}
