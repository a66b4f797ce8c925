//! The database's state: `Account` documents with their unique email, `Token` documents, and
//! the transaction clock that orders them and mints their ids.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::json;

use super::{
    reply::{Failure, FailureExtra},
    value::{Doc, Value, encode_simple},
};

/// An `Account` document. No query reads its fields back; they are what `Account.create` writes.
#[derive(Debug, Clone)]
#[allow(dead_code)]
pub(super) struct Account {
    pub(super) email: String,
    pub(super) cognito_sub: Option<String>,
    pub(super) ts: i128,
}

#[derive(Debug, Clone)]
pub(super) struct TokenDoc {
    pub(super) id: String,
    /// The account's id.
    pub(super) document: String,
    /// Expiry, in nanoseconds since the epoch.
    pub(super) ttl: Option<i128>,
    pub(super) data: Value,
    pub(super) ts: i128,
    pub(super) secret_hash: [u8; 32],
}

impl TokenDoc {
    /// Whether the token is visible at `now`: gone at and after its ttl (`docs/design.md`
    /// "Fauna over HTTP › Authentication, expiry and revocation").
    pub(super) fn live_at(&self, now: i128) -> bool {
        self.ttl.is_none_or(|ttl| ttl > now)
    }

    pub(super) fn data(&self, key: &str) -> &Value {
        self.data.field(key)
    }

    /// The document as a read returns it: no secret, which only its creation shows
    /// (`docs/design.md` "Fauna over HTTP › Token secrets").
    pub(super) fn to_value(&self) -> Value {
        let mut fields = vec![(
            "document",
            Value::Ref {
                coll: "Account".into(),
                id: self.document.clone(),
            },
        )];
        if let Some(ttl) = self.ttl {
            fields.push(("ttl", Value::Time(ttl)));
        }
        if matches!(&self.data, Value::Object(d) if !d.is_empty()) {
            fields.push(("data", self.data.clone()));
        }
        Value::Doc(Box::new(Doc {
            coll: "Token",
            id: self.id.clone(),
            ts: self.ts,
            fields,
        }))
    }

    pub(super) fn size(&self) -> u64 {
        serde_json::to_vec(&encode_simple(&self.to_value())).map_or(0, |b| b.len() as u64)
    }
}

/// The `BrokerPolicy` document (`deploy/fauna/schema.fsl`): the broker's limits, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Policy {
    pub(super) access_ttl: i64,
    pub(super) refresh_ttl: i64,
    pub(super) grace: i64,
    pub(super) session_ttl: i64,
    pub(super) any_client: bool,
}

/// A `RotationAttempt` document: the nonce of the call that last rotated a token, until the
/// token's ttl.
#[derive(Debug, Clone)]
pub(super) struct Attempt {
    pub(super) attempt: String,
    pub(super) ttl: Option<i128>,
}

/// A `Replay` document: an idempotency key's claim, until its ttl.
#[derive(Debug, Clone)]
pub(super) struct Replay {
    pub(super) nonce: String,
    pub(super) account: String,
    pub(super) family: Value,
    /// The window's end, in nanoseconds since the epoch.
    pub(super) expires_at: i128,
    /// The document's ttl (nanoseconds): gone from reads, and from the unique index, at and
    /// after it.
    pub(super) ttl: i128,
    /// The sealed pair, null until the claiming call writes it.
    pub(super) sealed: Value,
}

/// A `Rotation` document: a rotation's sealed successor, until the grace window's end (its ttl).
#[derive(Debug, Clone)]
pub(super) struct SealedSuccessor {
    pub(super) successor: String,
    pub(super) sealed: Value,
    pub(super) refresh_expires: i128,
    pub(super) access_expires: i128,
    pub(super) ttl: i128,
}

/// What a transaction reads or writes, for the optimistic check at its commit: a document, or
/// the index entries a read of an index covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Key {
    /// `Account.byEmail(email)` and the unique constraint on `email`: one index term.
    Email(String),
    /// An `Account` document, by id.
    Account(String),
    /// A `Token` document, by id.
    Token(String),
    /// `Token.byDocument(account)`: the index term of one account's tokens.
    TokensOf(String),
    /// The `BrokerPolicy` document.
    Policy,
    /// A `RotationAttempt` document, by id.
    Attempt(String),
    /// `Replay.byRow(row)` and the unique constraint on `row`: one index term, which covers
    /// the one document it may hold.
    ReplayRow(String),
    /// `Rotation.byRow(row)`, likewise.
    RotationRow(String),
}

/// The database: one `Account` collection with a unique email, the `Token` collection, the
/// `BrokerPolicy` document and the `RotationAttempt` collection.
#[derive(Debug, Default)]
pub(super) struct Db {
    last_txn_micros: i64,
    /// The commit time of the last transaction that wrote each key; a transaction that read a
    /// key written after its snapshot conflicts.
    pub(super) versions: HashMap<Key, i64>,
    last_id: i64,
    pub(super) accounts: BTreeMap<String, Account>,
    pub(super) by_email: HashMap<String, String>,
    pub(super) tokens: BTreeMap<String, TokenDoc>,
    /// `Token.byDocument`: token ids per account id.
    pub(super) by_document: HashMap<String, BTreeSet<String>>,
    /// Deleted tokens with their deletion time, for a node's key cache
    /// ([`super::Fault::StaleKeyCache`]).
    pub(super) recently_deleted: HashMap<String, (TokenDoc, i128)>,
    /// `BrokerPolicy.byId("1")`.
    pub(super) policy: Option<Policy>,
    /// `RotationAttempt` documents, by id (the rotated token's id).
    pub(super) attempts: HashMap<String, Attempt>,
    /// `Replay` documents, by `row` (unique).
    pub(super) replays: HashMap<String, Replay>,
    /// `Rotation` documents, by `row` (unique).
    pub(super) rotations: HashMap<String, SealedSuccessor>,
}

/// 2020-01-01T00:00:00Z in microseconds; ids count from here.
const ID_EPOCH_MICROS: i64 = 1_577_836_800_000_000;

impl Db {
    /// Starts a transaction: its time is the clock's, but always after the previous one.
    pub(super) fn tick(&mut self, clock_micros: i64) -> i64 {
        let now = clock_micros.max(self.last_txn_micros + 1);
        self.last_txn_micros = now;
        now
    }

    /// The time of the latest transaction: a snapshot taken now sees everything committed.
    pub(super) fn last_txn(&self) -> i64 {
        self.last_txn_micros
    }

    /// Whether any of `reads` was written by a transaction that committed after `snapshot`.
    pub(super) fn conflicts<'k>(
        &self,
        snapshot: i64,
        mut reads: impl Iterator<Item = &'k Key>,
    ) -> bool {
        reads.any(|key| self.versions.get(key).is_some_and(|&at| at > snapshot))
    }

    /// Records that the transaction of time `at` wrote `keys`.
    pub(super) fn stamp<'k>(&mut self, at: i64, keys: impl IntoIterator<Item = &'k Key>) {
        for key in keys {
            self.versions.insert(key.clone(), at);
        }
    }

    /// A new snowflake-like id: microseconds since 2020 in the high bits, so ids grow with time
    /// and have 18 digits (well below 2^62, so secrets start `fnE`).
    pub(super) fn next_id(&mut self) -> i64 {
        let base = (self.last_txn_micros - ID_EPOCH_MICROS).max(0) << 10;
        self.last_id = base.max(self.last_id + 1);
        self.last_id
    }

    /// `Account.create({ email, cognito_sub })`, with the unique constraint on email and its
    /// violation error (`docs/design.md` "Fauna over HTTP › Unique constraints").
    pub(super) fn create_account(
        &mut self,
        email: &str,
        cognito_sub: Option<String>,
        now: i128,
    ) -> Result<String, Failure> {
        if self.by_email.contains_key(email) {
            let mut failure =
                Failure::new("constraint_failure", "Failed unique constraint.".into())
                    .at("Account.create(");
            failure.extra = Some(Box::new(FailureExtra {
                notes: Some("constraint failures:\n  email: Failed unique constraint".into()),
                summary: None,
                constraint_failures: Some(json!([
                    { "paths": [["email"]], "message": "Failed unique constraint" }
                ])),
            }));
            return Err(failure);
        }
        let id = self.next_id().to_string();
        self.accounts.insert(
            id.clone(),
            Account {
                email: email.to_owned(),
                cognito_sub,
                ts: now,
            },
        );
        self.by_email.insert(email.to_owned(), id.clone());
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use tokenbroker::store::fauna::queries;

    use super::*;

    #[test]
    fn duplicate_email_create_is_a_constraint_failure() {
        let mut db = Db::default();
        db.create_account("dup@example.com", None, 0)
            .expect("first create");
        let failure = db
            .create_account("dup@example.com", None, 0)
            .expect_err("unique email");
        assert_eq!(failure.code, "constraint_failure");
        assert_eq!(failure.message, "Failed unique constraint.");
        assert_eq!(
            failure
                .extra
                .as_ref()
                .and_then(|e| e.constraint_failures.clone()),
            Some(json!([{ "paths": [["email"]], "message": "Failed unique constraint" }]))
        );
        let summary = failure.summary(queries::ISSUE_BY_EMAIL);
        assert!(summary.starts_with(
            "error: Failed unique constraint.\nconstraint failures:\n  email: Failed unique constraint\nat *query*:1:"
        ));
        assert_eq!(db.accounts.len(), 1);
    }

    #[test]
    fn transaction_times_strictly_increase() {
        let mut db = Db::default();
        assert_eq!(db.tick(1_000), 1_000);
        assert_eq!(db.tick(1_000), 1_001);
        assert_eq!(db.tick(500), 1_002);
        assert_eq!(db.tick(5_000), 5_000);
        let (a, b) = (db.next_id(), db.next_id());
        assert!(b > a && a > 0);
    }
}
