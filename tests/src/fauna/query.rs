//! The query texts the double runs, recognised by the SHA-256 of their exact text: the broker's
//! fixed queries and the original Lambda's four.

use sha2::{Digest, Sha256};

/// The broker's query texts the double implements: the SHA-256 (hex) of each exact text, with
/// the name `queries::ALL` gives it. Computed from `broker/src/store/fauna/queries.rs`; when a
/// text changes there, the double answers it with `invalid_query` until this table and the
/// implementation below are updated.
pub const KNOWN_QUERIES: &[(&str, &str)] = &[
    (
        "original_lookup",
        "548a713760683bbce896b03cab308cac647e81a1d6e3fee65cdf3ab994e6ce96",
    ),
    (
        "original_register",
        "768bf8c922b1ae66a199ae642eb073762874ee028be37355188bdc9a907c1ab0",
    ),
    (
        "original_create_refresh",
        "f68f0923c857eeb5dc53cce6706b09b204337fc461a2b5d2be8abd1ba5793184",
    ),
    (
        "original_create_access",
        "dccc9e2e3ab1c803ebdaa95a11b187d6106e8cdb7e6ce32ff8e31cc6ed1788a0",
    ),
    (
        "issue_by_email",
        "21155c698affe0b48ab52174f150833acfdf62506d5729aba85a4c6079db1e94",
    ),
    (
        "issue_for_account",
        "50920a39155223d1163b245b6619a0d1c8eb97ec90df81bd66a0ddcbd0757728",
    ),
    (
        "rotate",
        "06999130187701c5ee493d938172a40ff7faae423a672c96b2e3dbd32d7e05dc",
    ),
    (
        "introspect",
        "6e30b3a04a69703f3d3f709b4c3e57122237eba70c7788dfff42221650454672",
    ),
    (
        "revoke_secret",
        "e82506d60b113101d4e328370bfa20fa0c0245bfc1c4ee85c3ce820fae41d0ca",
    ),
    (
        "revoke_token",
        "5a23596ad197050b5ac2a6b1d92db0157d7f7e6f076dd9086dee1fbb80237e15",
    ),
    (
        "revoke_family",
        "e315f29dfb89c1e6ecc1f128c9cd7868bdca31498a535611c1962767e0e6c22f",
    ),
    (
        "revoke_account",
        "d71a355897dbc1ebd77f3b0a82d1dde0f5ee6e18e5c15ccf1fdbec048c1b1887",
    ),
    (
        "account_by_email",
        "b952a4113bb6dc756efb6b84b64269984b4103db349053a7c798cef7228718ad",
    ),
    (
        "list_tokens",
        "28fe91e6b05fcd4704af9e74384d47eda415551f3a28979809716ad8261eb503",
    ),
];

/// The query pattern of the Cognito trigger Lambda that tokenbroker replaces: four sequential
/// requests per sign-in (look the account up, register it if missing, create a refresh token,
/// create an access token). The double runs them so the benchmark can time that pattern next to
/// the broker's one request, against the same server with the same added latency. They are not
/// the broker's queries; `KNOWN_QUERIES` lists them under `original_*`.
pub mod original_lambda {
    /// `original_lookup`.
    pub const LOOKUP: &str = r#"Account.byEmail(email).first()"#;
    /// `original_register`.
    pub const REGISTER: &str = r#"Account.create({ email: email })"#;
    /// `original_create_refresh`.
    pub const CREATE_REFRESH: &str = r#"Token.create({ document: Account.byId(account_id), ttl: Time.now().add(ttl, "seconds"), data: { kind: "refresh" } })"#;
    /// `original_create_access`.
    pub const CREATE_ACCESS: &str = r#"Token.create({ document: Account.byId(account_id), ttl: Time.now().add(ttl, "seconds"), data: { kind: "access", parent: parent } })"#;
}

/// The broker's queries, and the original Lambda's, one per [`KNOWN_QUERIES`] row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Query {
    IssueByEmail,
    IssueForAccount,
    Rotate,
    Introspect,
    RevokeSecret,
    RevokeToken,
    RevokeFamily,
    RevokeAccount,
    AccountByEmail,
    ListTokens,
    OriginalLookup,
    OriginalRegister,
    OriginalCreateRefresh,
    OriginalCreateAccess,
}

impl Query {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "issue_by_email" => Self::IssueByEmail,
            "issue_for_account" => Self::IssueForAccount,
            "rotate" => Self::Rotate,
            "introspect" => Self::Introspect,
            "revoke_secret" => Self::RevokeSecret,
            "revoke_token" => Self::RevokeToken,
            "revoke_family" => Self::RevokeFamily,
            "revoke_account" => Self::RevokeAccount,
            "account_by_email" => Self::AccountByEmail,
            "list_tokens" => Self::ListTokens,
            "original_lookup" => Self::OriginalLookup,
            "original_register" => Self::OriginalRegister,
            "original_create_refresh" => Self::OriginalCreateRefresh,
            "original_create_access" => Self::OriginalCreateAccess,
            _ => return None,
        })
    }

    /// The text a token is refused at, for the `permission_denied` summary.
    pub(super) fn guarded_call(self) -> &'static str {
        match self {
            Self::IssueByEmail | Self::AccountByEmail => "Account.byEmail(email)",
            Self::IssueForAccount | Self::RevokeFamily | Self::RevokeAccount | Self::ListTokens => {
                "Account.byId(account_id)"
            }
            Self::Rotate => "rotateRefreshToken(access_ttl, refresh_ttl, grace, client_id)",
            Self::RevokeSecret => "revokeCurrentToken(client_id)",
            Self::Introspect => "Query.token()",
            Self::RevokeToken => "Token.byId(token_id)",
            Self::OriginalLookup => "Account.byEmail(email)",
            Self::OriginalRegister => "Account.create(",
            Self::OriginalCreateRefresh | Self::OriginalCreateAccess => "Token.create(",
        }
    }
}

/// Returns the known query with this exact text (and its name), or the text's SHA-256 in hex.
pub(super) fn recognise(text: &str) -> Result<(&'static str, Query), String> {
    let digest = hex_digest(text.as_bytes());
    KNOWN_QUERIES
        .iter()
        .find(|(_, hash)| *hash == digest)
        .and_then(|(name, _)| Query::from_name(name).map(|q| (*name, q)))
        .ok_or(digest)
}

pub(super) fn hex_digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use tokenbroker::store::fauna::queries;

    use super::*;

    #[test]
    fn every_broker_query_text_is_known() {
        let broker_rows = KNOWN_QUERIES
            .iter()
            .filter(|(name, _)| !name.starts_with("original_"))
            .count();
        assert_eq!(broker_rows, queries::ALL.len());
        for (name, text) in queries::ALL.iter().chain(&[
            ("original_lookup", original_lambda::LOOKUP),
            ("original_register", original_lambda::REGISTER),
            ("original_create_refresh", original_lambda::CREATE_REFRESH),
            ("original_create_access", original_lambda::CREATE_ACCESS),
        ]) {
            let recognised = recognise(text).map(|(name, _)| name);
            assert_eq!(
                recognised,
                Ok(*name),
                "queries::{name} changed: update KNOWN_QUERIES and the double"
            );
        }
    }
}
