//! The SQL of each operation: token rows, inserting a pair, get-or-create of an account,
//! rotation with reuse detection, and revocation. Every function runs on a connection the
//! caller holds (the writer's, inside its transaction, or a reader's).

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, params};
use secrecy::SecretString;
use subtle::ConstantTimeEq;
use tracing::{debug, warn};

use crate::{
    model::secret::{self, SecretDigest},
    model::{
        AccountId, Email, FamilyId, Metadata, MintedPair, MintedToken, NewSession, Rotation,
        TokenId, TokenInfo, TokenKind, TokenRecord, TokenState, UnixMicros,
    },
};

/// Returns the SQL condition for "active now" over `tokens t JOIN accounts a`, with the current
/// time in parameter `now` (such as `?2`). Every query uses this one definition, and it agrees
/// with [`TokenRow::state`].
pub(super) fn active(now: &str) -> String {
    format!(
        "t.revoked_at IS NULL AND t.replaced_by IS NULL \
         AND t.expires_at > {now} AND t.issued_at > a.not_before"
    )
}

/// The columns [`TokenRow::from_row`] reads, in order.
pub(super) const TOKEN_COLUMNS: &str = "t.kind, t.account_id, t.family_id, t.parent_id, t.client_id, \
     t.secret_sha256, t.issued_at, t.expires_at, t.revoked_at, t.rotated_at, t.replaced_by, \
     t.metadata, a.not_before, a.email, a.cognito_sub, t.session_ends_at, t.superseded_at";
pub(super) const TOKEN_COLUMN_COUNT: usize = 17;

/// A token as stored, without its id. The PostgreSQL store reads its rows into this too, so
/// both stores derive a token's state in one place.
#[derive(Debug)]
pub(in crate::store) struct TokenRow {
    pub(in crate::store) kind: TokenKind,
    pub(in crate::store) account_id: AccountId,
    pub(in crate::store) family_id: FamilyId,
    pub(in crate::store) parent_id: Option<TokenId>,
    pub(in crate::store) client_id: Option<String>,
    pub(in crate::store) digest: Vec<u8>,
    pub(in crate::store) issued_at: UnixMicros,
    pub(in crate::store) expires_at: UnixMicros,
    pub(in crate::store) revoked_at: Option<UnixMicros>,
    pub(in crate::store) rotated_at: Option<UnixMicros>,
    pub(in crate::store) replaced_by: Option<TokenId>,
    pub(in crate::store) metadata: String,
    pub(in crate::store) not_before: UnixMicros,
    pub(in crate::store) email: String,
    pub(in crate::store) cognito_sub: Option<String>,
    pub(in crate::store) session_ends_at: Option<UnixMicros>,
    pub(in crate::store) superseded_at: Option<UnixMicros>,
}

impl TokenRow {
    pub(super) fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
        let kind: String = r.get(0)?;
        Ok(Self {
            kind: TokenKind::from_stored(&kind).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    0,
                    rusqlite::types::Type::Text,
                    format!("unknown token kind {kind:?}").into(),
                )
            })?,
            account_id: AccountId::from_stored(r.get(1)?),
            family_id: FamilyId::from_stored(r.get(2)?),
            parent_id: r.get::<_, Option<String>>(3)?.map(TokenId::from_stored),
            client_id: r.get(4)?,
            digest: r.get(5)?,
            issued_at: UnixMicros(r.get(6)?),
            expires_at: UnixMicros(r.get(7)?),
            revoked_at: r.get::<_, Option<i64>>(8)?.map(UnixMicros),
            rotated_at: r.get::<_, Option<i64>>(9)?.map(UnixMicros),
            replaced_by: r.get::<_, Option<String>>(10)?.map(TokenId::from_stored),
            metadata: r.get(11)?,
            not_before: UnixMicros(r.get(12)?),
            email: r.get(13)?,
            cognito_sub: r.get(14)?,
            session_ends_at: r.get::<_, Option<i64>>(15)?.map(UnixMicros),
            superseded_at: r.get::<_, Option<i64>>(16)?.map(UnixMicros),
        })
    }

    /// Whether `digest` is this token's secret digest, compared in constant time.
    pub(in crate::store) fn matches(&self, digest: &SecretDigest) -> bool {
        self.digest.as_slice().ct_eq(digest.as_slice()).into()
    }

    /// The token's facts if it is the active token whose secret has `digest`.
    pub(in crate::store) fn active_info(
        self,
        id: TokenId,
        digest: &SecretDigest,
        now: UnixMicros,
    ) -> Option<TokenInfo> {
        if !self.matches(digest) || self.state(now) != TokenState::Active {
            return None;
        }
        Some(TokenInfo {
            id,
            kind: self.kind,
            account_id: self.account_id,
            email: Email::from_stored(self.email),
            cognito_sub: self.cognito_sub,
            family_id: self.family_id,
            client_id: self.client_id,
            issued_at: self.issued_at,
            expires_at: self.expires_at,
        })
    }

    pub(in crate::store) fn state(&self, now: UnixMicros) -> TokenState {
        if self.revoked_at.is_some() || self.issued_at <= self.not_before {
            TokenState::Revoked
        } else if self.replaced_by.is_some() {
            TokenState::Rotated
        } else if self.expires_at <= now {
            TokenState::Expired
        } else {
            TokenState::Active
        }
    }

    pub(in crate::store) fn into_record(self, id: TokenId, now: UnixMicros) -> TokenRecord {
        let state = self.state(now);
        let revoked_at = match state {
            TokenState::Revoked => self.revoked_at.or(Some(self.not_before)),
            TokenState::Rotated => self.rotated_at,
            _ => None,
        };
        TokenRecord {
            id,
            kind: self.kind,
            family_id: self.family_id,
            parent_id: self.parent_id,
            state,
            issued_at: self.issued_at,
            expires_at: self.expires_at,
            revoked_at,
            replaced_by: self.replaced_by,
            client_id: self.client_id,
            metadata: serde_json::from_str::<Metadata>(&self.metadata).unwrap_or_default(),
        }
    }
}

pub(super) fn load_token(conn: &Connection, id: &TokenId) -> rusqlite::Result<Option<TokenRow>> {
    conn.prepare_cached(&format!(
        "SELECT {TOKEN_COLUMNS} FROM tokens t JOIN accounts a ON a.id = t.account_id WHERE t.id = ?1"
    ))?
    .query_row([id.as_str()], TokenRow::from_row)
    .optional()
}

/// A refresh and an access token minted outside the writer (randomness and hashing are the
/// expensive part), waiting for the writer to store their digests.
pub(super) struct FreshPair {
    pub(super) refresh: (TokenId, SecretString, SecretDigest),
    pub(super) access: (TokenId, SecretString, SecretDigest),
}

impl FreshPair {
    pub(super) fn mint() -> Self {
        Self {
            refresh: secret::mint(TokenKind::Refresh),
            access: secret::mint(TokenKind::Access),
        }
    }

    pub(super) fn ids(&self) -> (TokenId, TokenId) {
        (self.refresh.0.clone(), self.access.0.clone())
    }

    pub(super) fn digests(&self) -> (SecretDigest, SecretDigest) {
        (self.refresh.2, self.access.2)
    }

    pub(super) fn into_pair(
        self,
        account_id: AccountId,
        family_id: FamilyId,
        now: UnixMicros,
        (access_ttl, refresh_ttl): (Duration, Duration),
    ) -> MintedPair {
        MintedPair {
            account_id,
            family_id,
            refresh: MintedToken {
                id: self.refresh.0,
                secret: self.refresh.1,
                expires_at: now.plus(refresh_ttl),
            },
            access: MintedToken {
                id: self.access.0,
                secret: self.access.1,
                expires_at: now.plus(access_ttl),
            },
        }
    }
}

/// What the writer needs to insert a pair.
pub(super) struct PairRow<'a> {
    pub(super) ids: &'a (TokenId, TokenId),
    pub(super) digests: &'a (SecretDigest, SecretDigest),
    pub(super) account_id: &'a AccountId,
    pub(super) family_id: &'a FamilyId,
    pub(super) client_id: Option<&'a str>,
    pub(super) metadata: &'a str,
    pub(super) now: UnixMicros,
    pub(super) access_ttl: Duration,
    pub(super) refresh_ttl: Duration,
    pub(super) session_ends_at: UnixMicros,
}

/// Inserts a pair. The writer's inserts are `OR FAIL`: a single-row insert checks every
/// constraint before it writes anything, so failing leaves nothing to undo, and SQLite then
/// keeps no statement journal. With the default `ABORT` it copied every page each statement
/// touched into one, a quarter of the writer's time per sign-in. (For the same reason foreign
/// keys are not enforced: `tokens.account_id` is always written in the transaction that finds
/// or creates its account, and accounts are never deleted.)
pub(super) fn insert_pair(conn: &Connection, row: &PairRow<'_>) -> rusqlite::Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT OR FAIL INTO tokens (id, kind, account_id, family_id, parent_id, client_id, \
         secret_sha256, issued_at, expires_at, metadata, session_ends_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?;
    let (refresh_id, access_id) = row.ids;
    insert.execute(params![
        refresh_id.as_str(),
        TokenKind::Refresh.as_str(),
        row.account_id.as_str(),
        row.family_id.as_str(),
        Option::<&str>::None,
        row.client_id,
        row.digests.0.as_slice(),
        row.now.0,
        row.now.plus(row.refresh_ttl).0,
        row.metadata,
        row.session_ends_at.0,
    ])?;
    insert.execute(params![
        access_id.as_str(),
        TokenKind::Access.as_str(),
        row.account_id.as_str(),
        row.family_id.as_str(),
        Some(refresh_id.as_str()),
        row.client_id,
        row.digests.1.as_slice(),
        row.now.0,
        row.now.plus(row.access_ttl).0,
        row.metadata,
        row.session_ends_at.0,
    ])?;
    Ok(())
}

pub(super) fn upsert_account(
    conn: &Connection,
    session: &NewSession,
    now: UnixMicros,
) -> rusqlite::Result<AccountId> {
    conn.prepare_cached(
        "INSERT OR FAIL INTO accounts (id, email, cognito_sub, created_at) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (email) DO UPDATE SET cognito_sub = coalesce(accounts.cognito_sub, excluded.cognito_sub) \
         RETURNING id",
    )?
    .query_row(
        params![
            AccountId::random().as_str(),
            session.email.as_str(),
            session.cognito_sub,
            now.0
        ],
        |r| r.get(0),
    )
    .map(AccountId::from_stored)
}

/// The writer-side outcome of a rotation (the secrets stay with the caller).
pub(super) enum RotationResult {
    Rotated {
        account_id: AccountId,
        family_id: FamilyId,
        now: UnixMicros,
        /// The new access and refresh lifetimes, cut short at the session's end.
        ttls: (Duration, Duration),
    },
    Inactive,
    WrongClient,
    Reuse {
        family_id: FamilyId,
        revoked: u64,
    },
}

/// Revokes a superseded successor (`?1`) and its access tokens, marking the successor itself
/// superseded. The family (`?3`) narrows the search to its index: `parent_id` has none, and
/// without it this statement scanned the whole table on the writer.
pub(super) const SUPERSEDE: &str = "UPDATE tokens SET revoked_at = ?2, \
     superseded_at = CASE WHEN id = ?1 THEN ?2 END \
     WHERE family_id = ?3 AND (id = ?1 OR parent_id = ?1) AND revoked_at IS NULL";

pub(super) fn rotate(
    conn: &Connection,
    now: UnixMicros,
    id: &TokenId,
    digest: &SecretDigest,
    rotation: &Rotation,
    new_ids: &(TokenId, TokenId),
    new_digests: &(SecretDigest, SecretDigest),
) -> rusqlite::Result<RotationResult> {
    let Some(row) = load_token(conn, id)? else {
        return Ok(RotationResult::Inactive);
    };
    if !row.matches(digest) || row.kind != TokenKind::Refresh {
        return Ok(RotationResult::Inactive);
    }
    // An expired token is inactive whatever else happened to it: a consumed refresh token
    // that comes back after its own lifetime is not reuse worth ending the session for.
    let superseded = row.superseded_at.is_some() && row.revoked_at == row.superseded_at;
    match row.state(now) {
        TokenState::Active | TokenState::Rotated if row.expires_at > now => {}
        TokenState::Revoked if superseded && row.expires_at > now => {}
        _ => return Ok(RotationResult::Inactive),
    }
    if !rotation.client.allows(row.client_id.as_deref()) {
        return Ok(RotationResult::WrongClient);
    }
    if superseded {
        // A successor that a retry of its predecessor displaced comes back: its holder and
        // the retry's are two presenters of one session, and one of them is not the user.
        return reuse(conn, now, id, &row);
    }
    let session_ends_at = row
        .session_ends_at
        .unwrap_or_else(|| now.plus(rotation.session_ttl));
    if session_ends_at <= now {
        return Ok(RotationResult::Inactive);
    }
    let left = Duration::from_micros(u64::try_from(session_ends_at.0 - now.0).unwrap_or(0));
    let ttls = (
        rotation.access_ttl.min(left),
        rotation.refresh_ttl.min(left),
    );
    if let Some(successor) = &row.replaced_by {
        // A consumed token came back. Only the immediate predecessor of the family's current
        // refresh token, within the grace window, may rotate again (a retry whose answer was
        // lost); its successor is superseded so the family keeps one live refresh token.
        // Anything else is reuse of a leaked token: end the session.
        let rotated_at = row.rotated_at.unwrap_or(row.issued_at);
        let in_grace = now <= rotated_at.plus(rotation.grace);
        let successor_is_current =
            load_token(conn, successor)?.is_some_and(|s| s.state(now) == TokenState::Active);
        if !(in_grace && successor_is_current) {
            return reuse(conn, now, id, &row);
        }
        debug!(token_id = %id, superseded = %successor, "refresh retried within grace window");
        conn.prepare_cached(SUPERSEDE)?.execute(params![
            successor.as_str(),
            now.0,
            row.family_id.as_str()
        ])?;
    }
    insert_pair(
        conn,
        &PairRow {
            ids: new_ids,
            digests: new_digests,
            account_id: &row.account_id,
            family_id: &row.family_id,
            client_id: row.client_id.as_deref(),
            metadata: &row.metadata,
            now,
            access_ttl: ttls.0,
            refresh_ttl: ttls.1,
            session_ends_at,
        },
    )?;
    conn.prepare_cached(
        "UPDATE tokens SET replaced_by = ?2, rotated_at = coalesce(rotated_at, ?3) WHERE id = ?1",
    )?
    .execute(params![id.as_str(), new_ids.0.as_str(), now.0])?;
    Ok(RotationResult::Rotated {
        account_id: row.account_id,
        family_id: row.family_id,
        now,
        ttls,
    })
}

/// Ends the family of a reused refresh token `id`.
fn reuse(
    conn: &Connection,
    now: UnixMicros,
    id: &TokenId,
    row: &TokenRow,
) -> rusqlite::Result<RotationResult> {
    let revoked = revoke_family(conn, now, &row.family_id)?;
    warn!(family_id = %row.family_id, token_id = %id, revoked, "refresh token reuse detected; family revoked");
    Ok(RotationResult::Reuse {
        family_id: row.family_id.clone(),
        revoked,
    })
}

/// Revokes one token. A refresh token ends its session (RFC 7009 §2.1: the access tokens of
/// the same grant go with it), so its whole family is revoked.
pub(super) fn revoke_token(
    conn: &Connection,
    now: UnixMicros,
    id: &TokenId,
    row: &TokenRow,
) -> rusqlite::Result<u64> {
    if row.kind == TokenKind::Refresh {
        return revoke_family(conn, now, &row.family_id);
    }
    let changed = conn
        .prepare_cached(&format!(
            "UPDATE tokens AS t SET revoked_at = ?2 FROM accounts a \
             WHERE t.id = ?1 AND a.id = t.account_id AND {}",
            active("?2")
        ))?
        .execute(params![id.as_str(), now.0])?;
    Ok(changed as u64)
}

pub(super) fn revoke_family(
    conn: &Connection,
    now: UnixMicros,
    family: &FamilyId,
) -> rusqlite::Result<u64> {
    let changed = conn
        .prepare_cached(&format!(
            "UPDATE tokens AS t SET revoked_at = ?2 FROM accounts a \
             WHERE t.family_id = ?1 AND a.id = t.account_id AND {}",
            active("?2")
        ))?
        .execute(params![family.as_str(), now.0])?;
    Ok(changed as u64)
}
