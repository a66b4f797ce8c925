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
        "378fb06704e319924b5ded71185c24284fff5ece2e79c36202559529b8188e51",
    ),
    (
        "issue_for_account",
        "db7ec7dfc8a49dc1a1b5583a158bc802ce8f01431e849373625991efe584eedc",
    ),
    (
        "rotate",
        "162dbdf6a46d57ea6e78be02d01a4cb3280633710addec9ce6b8ab024421df23",
    ),
    (
        "introspect",
        "02cc22e2f5eec9d81b5bc298dd6211ee07cf8a7116d2348776b88bc7f26a855d",
    ),
    (
        "revoke_secret",
        "c696780bf18c3bc8ba3c9e1e5bf3871158875d40d3dc8bb2c98d4b9949f7d6bf",
    ),
    (
        "revoke_token",
        "615378cb7e7ea37fe315eaf89ddce6df644846496ec8f9a0379857aa73c0b88e",
    ),
    (
        "revoke_family",
        "72e99242ce908879817415715fb3a2aafb365dcc8f3f624461aa4c73f9c81574",
    ),
    (
        "revoke_account",
        "2c14b73a9777b75a60639f9750b4544bde6cdc18822b0a734c48fa2079ffbd97",
    ),
    (
        "account_by_email",
        "b952a4113bb6dc756efb6b84b64269984b4103db349053a7c798cef7228718ad",
    ),
    (
        "list_tokens",
        "478b2cdf31fb58f81f7ff65240d4c3c5d2d08212d5463db72bf3e8b0d6ef48ec",
    ),
    (
        "revoke_email",
        "1f5231ebf29bdf4cc83f1153a578f8cf6ca9ef91f833df9b505af815293f505b",
    ),
    (
        "issue_once_by_email",
        "cce53a8c1fd26d34775bd178dfe319b6136a8e256940775e7a8dabf31645c85f",
    ),
    (
        "issue_once_for_account",
        "5cdf987aa8f590060cd76ab147794f0a471a0867df6fe37e81ae92e6dbd392b9",
    ),
    (
        "seal_replay",
        "840de294dfcfd885737f61d03904055233cecc71228ba55f39796a0244ee7371",
    ),
    (
        "replay_state",
        "b035dd0f27e00709b179c8d9cb3c9f8ed6e8448cc63f6b95f0a89c91379514ee",
    ),
    (
        "seal_successor",
        "4a3dfba856cd2a205e133100b1fec9d09f59e5cb46b2e886396a9609d6158b37",
    ),
    (
        "successor_state",
        "24309cd43e48cacb3bf41d891ad90495844c3ae2c679130ca82de3e6ffcefa31",
    ),
    (
        "publish_policy",
        "56f1480f61c09b32767c16e61e952cdee03a9a09e8e3e53cdda0381580559193",
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
    PublishPolicy,
    RevokeEmail,
    IssueOnceByEmail,
    IssueOnceForAccount,
    SealReplay,
    ReplayState,
    SealSuccessor,
    SuccessorState,
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
            "publish_policy" => Self::PublishPolicy,
            "revoke_email" => Self::RevokeEmail,
            "issue_once_by_email" => Self::IssueOnceByEmail,
            "issue_once_for_account" => Self::IssueOnceForAccount,
            "seal_replay" => Self::SealReplay,
            "replay_state" => Self::ReplayState,
            "seal_successor" => Self::SealSuccessor,
            "successor_state" => Self::SuccessorState,
            "original_lookup" => Self::OriginalLookup,
            "original_register" => Self::OriginalRegister,
            "original_create_refresh" => Self::OriginalCreateRefresh,
            "original_create_access" => Self::OriginalCreateAccess,
            _ => return None,
        })
    }

    /// Whether the double runs the text in a typechecked database (without `X-Typecheck:
    /// false`). It cannot type check, so it admits only the plain function calls, which pass
    /// the v10 checker: a call of a schema function with argument variables. The other texts
    /// are not written for the checker (`broker/src/store/fauna/queries.rs` says why), and the
    /// double refuses them as the checker might, so a request that forgets the header fails here
    /// instead of in production.
    pub(super) fn passes_typecheck(self) -> bool {
        matches!(self, Self::Rotate | Self::RevokeSecret)
    }

    /// The text a token is refused at, for the `permission_denied` summary.
    pub(super) fn guarded_call(self) -> &'static str {
        match self {
            Self::IssueByEmail | Self::AccountByEmail | Self::RevokeEmail => {
                "Account.byEmail(email)"
            }
            Self::IssueForAccount | Self::RevokeFamily | Self::RevokeAccount | Self::ListTokens => {
                "Account.byId(account_id)"
            }
            Self::Rotate => {
                "rotateRefreshToken(access_ttl, refresh_ttl, grace, client_id, any_client, session_ttl, attempt, coalesce)"
            }
            Self::RevokeSecret => "revokeCurrentToken(client_id, any_client)",
            Self::Introspect => "Token.byId(caller!.id)",
            Self::RevokeToken => "Token.byId(token_id)",
            Self::PublishPolicy => "BrokerPolicy.byId(\"1\")",
            Self::IssueOnceByEmail
            | Self::IssueOnceForAccount
            | Self::SealReplay
            | Self::ReplayState => "Replay.byRow(row)",
            Self::SealSuccessor | Self::SuccessorState => "Rotation.byRow(row)",
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
