//! The database schema: versioned migrations, applied in order at open.

use rusqlite::Connection;
use tracing::info;

use super::super::{StoreError, StoreErrorKind, StoreResult};
use super::{internal, sql_error};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
pub(super) const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE,
    cognito_sub TEXT,
    created_at  INTEGER NOT NULL,
    not_before  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('access', 'refresh')),
    account_id    TEXT NOT NULL REFERENCES accounts (id),
    family_id     TEXT NOT NULL,
    parent_id     TEXT,
    client_id     TEXT,
    secret_sha256 BLOB NOT NULL,
    issued_at     INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    revoked_at    INTEGER,
    rotated_at    INTEGER,
    replaced_by   TEXT,
    metadata      TEXT NOT NULL DEFAULT '{}'
) WITHOUT ROWID;
CREATE INDEX tokens_by_account ON tokens (account_id, issued_at, id);
CREATE INDEX tokens_by_family ON tokens (family_id);
CREATE INDEX tokens_by_expiry ON tokens (expires_at);
",
    // The expiry index cost every sign-in two insertion points, a sixth of the pages each
    // commit writes; cleanup walks the table in id order instead (see `Writer::collect_expired`).
    "DROP INDEX tokens_by_expiry;",
    // Sessions end (`session_ends_at`, copied to every token of a family; NULL for families
    // issued before this, whose end is counted from their next rotation), and a superseded
    // successor is told apart from a revoked token, so that presenting it is reuse.
    "ALTER TABLE tokens ADD COLUMN session_ends_at INTEGER; \
     ALTER TABLE tokens ADD COLUMN superseded_at INTEGER;",
];

/// Applies the migrations this database has not seen yet, each in its own transaction.
pub(super) fn migrate(conn: &Connection) -> StoreResult<()> {
    let version: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql_error)?;
    if version > MIGRATIONS.len() {
        return Err(StoreError::new(
            StoreErrorKind::Internal,
            format!(
                "the database schema is version {version}, newer than this binary knows ({}); \
                 run a newer tokenbroker",
                MIGRATIONS.len()
            ),
            None,
        ));
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let next = index + 1;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {next}; COMMIT;"
        ))
        .map_err(|err| internal(&format!("schema migration {next} failed"), err))?;
        info!(version = next, "schema migrated");
    }
    Ok(())
}
