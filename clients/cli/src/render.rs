//! Output: a table for people and a JSON document for scripts, for every answer.
//!
//! JSON uses the proto's field names (snake_case), enum values as lowercase words (`access`,
//! `revoked`), times as RFC 3339 in UTC, and `null` for what the broker left empty. A secret
//! appears only in `issue`'s answer and only when [`Secrets::Show`] says so.

use std::io::Write as _;

use prost_types::Timestamp;
use secrecy::ExposeSecret as _;
use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokenbroker_client::{IssuedToken, TokenPair, pb};

use crate::Failure;

/// Where results go: a table or JSON on stdout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Printer {
    /// JSON (`--json`) instead of a table.
    pub(crate) json: bool,
}

impl Printer {
    /// Prints the table, or with `--json` the JSON document, on stdout.
    pub(crate) fn emit(self, table: impl FnOnce() -> String, json: impl FnOnce() -> Value) {
        let text = if self.json {
            serde_json::to_string_pretty(&json()).expect("a json value serializes")
        } else {
            table()
        };
        // A closed pipe (`| head`) is not a failure of the command.
        let _ = writeln!(std::io::stdout().lock(), "{}", text.trim_end());
    }
}

/// Whether `issue` prints the secrets it has just minted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Secrets {
    /// Print them (`--print-secrets`).
    Show,
    /// Ids only.
    Hide,
}

/// Returns a failure as `{"error": {...}}`.
pub(crate) fn failure_json(failure: &Failure) -> Value {
    json!({
        "error": {
            "code": failure.code(),
            "message": failure.message(),
            "exit_code": failure.exit() as u8,
        }
    })
}

/// Returns a failure as one line for people: `tokenbroker-admin: permission denied: …`.
pub(crate) fn failure_text(failure: &Failure) -> String {
    format!(
        "tokenbroker-admin: {}: {}",
        failure.code().to_lowercase().replace('_', " "),
        failure.message()
    )
}

pub(crate) fn issue_json(pair: &TokenPair, secrets: Secrets) -> Value {
    let token = |token: &IssuedToken| {
        let mut value = json!({
            "token_id": token.token_id,
            "expires_at": time(token.expires_at.as_ref()),
        });
        if secrets == Secrets::Show {
            value["secret"] = json!(token.secret.expose_secret());
        }
        value
    };
    json!({
        "account_id": pair.account_id,
        "family_id": pair.family_id,
        "replayed": pair.replayed,
        "refresh": token(&pair.refresh),
        "access": token(&pair.access),
    })
}

pub(crate) fn issue_table(pair: &TokenPair, secrets: Secrets) -> String {
    let mut headers = vec!["KIND", "TOKEN ID", "EXPIRES AT"];
    if secrets == Secrets::Show {
        headers.push("SECRET");
    }
    let rows = [("refresh", &pair.refresh), ("access", &pair.access)]
        .into_iter()
        .map(|(kind, token)| {
            let mut row = vec![
                kind.to_owned(),
                token.token_id.clone(),
                text(time(token.expires_at.as_ref())),
            ];
            if secrets == Secrets::Show {
                row.push(token.secret.expose_secret().to_owned());
            }
            row
        })
        .collect::<Vec<_>>();
    format!(
        "{}\n{}",
        fields(&[
            ("account", pair.account_id.clone()),
            ("family", pair.family_id.clone()),
            ("replayed", pair.replayed.to_string()),
        ]),
        table(&headers, &rows)
    )
}

pub(crate) fn introspect_json(info: &pb::IntrospectResponse) -> Value {
    if !info.active {
        return json!({ "active": false });
    }
    json!({
        "active": true,
        "token_id": info.token_id,
        "kind": kind(info.kind),
        "account_id": info.account_id,
        "email": info.email,
        "family_id": info.family_id,
        "client_id": optional(&info.client_id),
        "cognito_sub": optional(&info.cognito_sub),
        "issued_at": time(info.issued_at.as_ref()),
        "expires_at": time(info.expires_at.as_ref()),
    })
}

pub(crate) fn introspect_table(info: &pb::IntrospectResponse) -> String {
    if !info.active {
        return fields(&[("active", "false".into())]);
    }
    fields(&[
        ("active", "true".into()),
        ("token id", info.token_id.clone()),
        ("kind", kind(info.kind).into()),
        ("account id", info.account_id.clone()),
        ("email", info.email.clone()),
        ("family id", info.family_id.clone()),
        ("client id", text(optional(&info.client_id))),
        ("cognito sub", text(optional(&info.cognito_sub))),
        ("issued at", text(time(info.issued_at.as_ref()))),
        ("expires at", text(time(info.expires_at.as_ref()))),
    ])
}

pub(crate) fn revoke_json(revoked_count: u64) -> Value {
    json!({ "revoked_count": revoked_count })
}

pub(crate) fn revoke_table(what: &str, by_secret: bool, revoked_count: u64) -> String {
    if by_secret {
        // The broker reports no count for a revocation by secret (RFC 7009: the holder learns
        // nothing about the token).
        format!("revoked {what} (if it was active)")
    } else {
        let plural = if revoked_count == 1 { "" } else { "s" };
        format!("revoked {revoked_count} token{plural} of {what}")
    }
}

pub(crate) fn list_json(listing: &pb::ListTokensResponse) -> Value {
    let tokens: Vec<Value> = listing
        .tokens
        .iter()
        .map(|token| {
            json!({
                "token_id": token.token_id,
                "kind": kind(token.kind),
                "state": state(token.state),
                "family_id": token.family_id,
                "parent_id": optional(&token.parent_id),
                "client_id": optional(&token.client_id),
                "issued_at": time(token.issued_at.as_ref()),
                "expires_at": time(token.expires_at.as_ref()),
                "revoked_at": time(token.revoked_at.as_ref()),
                "replaced_by": optional(&token.replaced_by),
                "metadata": token.metadata,
            })
        })
        .collect();
    json!({
        "account_id": optional(&listing.account_id),
        "tokens": tokens,
        "next_page_token": optional(&listing.next_page_token),
    })
}

pub(crate) fn list_table(listing: &pb::ListTokensResponse) -> String {
    if listing.account_id.is_empty() {
        return "no account has this email".into();
    }
    let rows: Vec<Vec<String>> = listing
        .tokens
        .iter()
        .map(|token| {
            vec![
                token.token_id.clone(),
                kind(token.kind).into(),
                state(token.state).into(),
                token.family_id.clone(),
                text(optional(&token.client_id)),
                text(time(token.issued_at.as_ref())),
                text(time(token.expires_at.as_ref())),
            ]
        })
        .collect();
    let mut out = format!(
        "{}\n{}",
        fields(&[
            ("account", listing.account_id.clone()),
            ("tokens", listing.tokens.len().to_string()),
        ]),
        table(
            &[
                "TOKEN ID",
                "KIND",
                "STATE",
                "FAMILY",
                "CLIENT",
                "ISSUED AT",
                "EXPIRES AT"
            ],
            &rows
        )
    );
    if !listing.next_page_token.is_empty() {
        out.push_str(&format!(
            "\nmore: --page-token {} (or --all-pages)",
            listing.next_page_token
        ));
    }
    out
}

pub(crate) fn health_json(service: &str, status: &str) -> Value {
    json!({ "service": service, "status": status })
}

fn kind(value: i32) -> &'static str {
    match pb::TokenKind::try_from(value) {
        Ok(pb::TokenKind::Access) => "access",
        Ok(pb::TokenKind::Refresh) => "refresh",
        _ => "unspecified",
    }
}

fn state(value: i32) -> &'static str {
    match pb::TokenState::try_from(value) {
        Ok(pb::TokenState::Active) => "active",
        Ok(pb::TokenState::Expired) => "expired",
        Ok(pb::TokenState::Revoked) => "revoked",
        Ok(pb::TokenState::Rotated) => "rotated",
        _ => "unspecified",
    }
}

/// Returns a timestamp as RFC 3339 in UTC, to the second.
fn time(timestamp: Option<&Timestamp>) -> Option<String> {
    let at = OffsetDateTime::from_unix_timestamp(timestamp?.seconds).ok()?;
    at.format(&Rfc3339).ok()
}

fn optional(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

fn text(value: Option<String>) -> String {
    value.unwrap_or_else(|| "-".into())
}

/// Renders `name  value` lines with the values aligned.
fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(name, value)| format!("{name:<width$}  {value}\n"))
        .collect()
}

/// Renders a table with a header row and columns padded to their widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;

    fn pair() -> TokenPair {
        let token = |id: &str, secret: &str| IssuedToken {
            token_id: id.into(),
            secret: SecretString::from(secret.to_owned()),
            expires_at: Some(Timestamp {
                seconds: 1_800_000_000,
                nanos: 5,
            }),
        };
        TokenPair {
            account_id: "acc1".into(),
            family_id: "fam1".into(),
            refresh: token("r1", "tbr_secret_refresh"),
            access: token("a1", "tba_secret_access"),
            replayed: false,
        }
    }

    #[test]
    fn issue_hides_secrets_unless_asked() {
        let hidden = issue_json(&pair(), Secrets::Hide).to_string();
        let table = issue_table(&pair(), Secrets::Hide);
        for text in [&hidden, &table] {
            assert!(!text.contains("tba_secret"), "{text}");
            assert!(!text.contains("tbr_secret"), "{text}");
        }
        let shown = issue_json(&pair(), Secrets::Show);
        assert_eq!(shown["access"]["secret"], "tba_secret_access");
        assert_eq!(shown["refresh"]["expires_at"], "2027-01-15T08:00:00Z");
        assert!(issue_table(&pair(), Secrets::Show).contains("tbr_secret_refresh"));
    }

    #[test]
    fn inactive_introspection_shows_only_active_false() {
        let info = pb::IntrospectResponse::default();
        assert_eq!(introspect_json(&info), json!({ "active": false }));
        assert_eq!(introspect_table(&info).trim(), "active  false");
    }

    #[test]
    fn tables_align_columns() {
        let out = table(
            &["A", "LONG HEADER"],
            &[vec!["wide cell".into(), "x".into()]],
        );
        assert_eq!(out, "A          LONG HEADER\nwide cell  x\n");
    }
}
