//! The query interpreter: one transaction authenticates its caller and runs one known query,
//! each implemented by hand from its FQL source.

use std::{
    cmp::Ordering,
    collections::{BTreeMap, HashSet},
};

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::{
    database::{Attempt, Db, Key, Policy, Replay, SealedSuccessor, TokenDoc},
    query::Query,
    reply::{Failure, FailureExtra, Stats},
    secret::{decode_token_secret, mint_secret},
    value::{Doc, Value, cmp_strings, fql_cmp, fql_eq, fql_text, strip_nulls},
};

/// Who a query runs as.
#[derive(Debug, Clone)]
pub(super) enum Caller {
    Key,
    /// A token, as authentication found it (`Query.token()`, possibly a node's cached copy).
    Token(Box<TokenDoc>),
}

/// A query's arguments, by name.
pub(super) struct Args<'a>(pub(super) &'a BTreeMap<String, Value>);

impl Args<'_> {
    /// The variable `name`; unbound is a runtime error where the query first uses it.
    fn get(&self, name: &'static str) -> Result<&Value, Failure> {
        self.0.get(name).ok_or_else(|| {
            Failure::new("unbound_variable", format!("Unbound variable `{name}`")).at(name)
        })
    }
}

fn invalid_argument(param: &str, expected: &str, got: &Value, at: &'static str) -> Failure {
    Failure::new(
        "invalid_argument",
        format!(
            "expected value for `{param}` of type {expected}, received {}",
            got.type_name()
        ),
    )
    .at(at)
}

fn expect_str<'v>(v: &'v Value, param: &str, at: &'static str) -> Result<&'v str, Failure> {
    match v {
        Value::Str(s) => Ok(s),
        other => Err(invalid_argument(param, "String", other, at)),
    }
}

/// A whole number of seconds for `Time.add(amount, "seconds")`.
fn expect_seconds(v: &Value, at: &'static str) -> Result<i64, Failure> {
    match v {
        Value::Int(n) => Ok(i64::from(*n)),
        Value::Long(n) => Ok(*n),
        #[allow(clippy::cast_possible_truncation)]
        Value::Double(n) if n.fract() == 0.0 && n.abs() < 9.2e18 => Ok(*n as i64),
        other => Err(invalid_argument("amount", "Number", other, at)),
    }
}

fn expect_bool(v: &Value, at: &'static str) -> Result<bool, Failure> {
    match v {
        Value::Bool(b) => Ok(*b),
        other => Err(Failure::new(
            "type_mismatch",
            format!("expected type: Boolean, received {}", other.type_name()),
        )
        .at(at)),
    }
}

/// An ID for `byId`: a string of digits or a number.
fn expect_id(v: &Value, at: &'static str) -> Result<String, Failure> {
    let invalid = || {
        Failure::new(
            "invalid_argument",
            format!("invalid argument `id`: `{}` is not a valid ID", fql_text(v)),
        )
        .at(at)
    };
    match v {
        Value::Str(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse::<i64>()
            .map(|id| id.to_string())
            .map_err(|_| invalid()),
        Value::Str(_) => Err(invalid()),
        Value::Int(n) if *n >= 0 => Ok(n.to_string()),
        Value::Long(n) if *n >= 0 => Ok(n.to_string()),
        Value::Int(_) | Value::Long(_) => Err(invalid()),
        other => Err(invalid_argument("id", "ID", other, at)),
    }
}

/// `time.add(seconds, "seconds")`, within the years Fauna's `Time` covers.
fn add_seconds(time: i128, seconds: i64, at: &'static str) -> Result<i128, Failure> {
    let sum = time + i128::from(seconds) * 1_000_000_000;
    if OffsetDateTime::from_unix_timestamp_nanos(sum).is_ok() {
        Ok(sum)
    } else {
        Err(Failure::new("invalid_argument", "Time out of bounds.".into()).at(at))
    }
}

/// The values a new pair of tokens is minted from.
struct Mint<'a> {
    account: &'a str,
    family: &'a Value,
    email: &'a Value,
    client_id: &'a Value,
    cognito_sub: &'a Value,
    metadata: &'a Value,
    refresh_ttl: i128,
    access_ttl: i128,
    session_ends: i128,
}

/// How to take back one write of a transaction that aborts.
#[derive(Debug)]
enum Undo {
    /// The token document `id` as it was (or its absence).
    Token(String, Option<TokenDoc>),
    /// The key cache's entry for `id` as it was.
    Deleted(String, Option<(TokenDoc, i128)>),
    /// The account `id` was created.
    Account(String),
    /// The `RotationAttempt` `id` as it was.
    Attempt(String, Option<Attempt>),
    /// The `BrokerPolicy` as it was.
    Policy(Option<Policy>),
    /// The `Replay` document of a row as it was.
    Replay(String, Option<Replay>),
    /// The `Rotation` document of a row as it was.
    Rotation(String, Option<SealedSuccessor>),
}

/// One transaction: the database, the transaction time and what it did.
///
/// It runs on the latest state and records the keys it reads and writes, with an undo log.
/// The server then commits it, or takes it back when it failed or when a key it read was
/// written after its snapshot ([`Txn::conflicts`]): optimistic concurrency as Fauna's, whose
/// transactions read a snapshot and are checked at commit. Running on the latest state gives
/// the same result as running on the snapshot whenever the check passes, since nothing the
/// transaction read has changed since.
pub(super) struct Txn<'a> {
    pub(super) db: &'a mut Db,
    /// `Time.now()`, in nanoseconds.
    pub(super) now: i128,
    pub(super) database_id: i64,
    pub(super) stats: Stats,
    /// An email whose account this transaction's snapshot does not see yet: a concurrent
    /// transaction created it ([`super::Fault::EmailTaken`]).
    pub(super) stale_email: Option<String>,
    /// Whether authentication also accepts tokens deleted in the last 60 s, as a node's key
    /// cache would ([`super::Fault::StaleKeyCache`]).
    pub(super) stale_key_cache: bool,
    reads: HashSet<Key>,
    writes: HashSet<Key>,
    undo: Vec<Undo>,
}

impl<'a> Txn<'a> {
    /// Starts a transaction at `now` (nanoseconds).
    pub(super) fn new(db: &'a mut Db, now: i128, database_id: i64) -> Self {
        Self {
            db,
            now,
            database_id,
            stats: Stats::default(),
            stale_email: None,
            stale_key_cache: false,
            reads: HashSet::new(),
            writes: HashSet::new(),
            undo: Vec::new(),
        }
    }

    /// Whether a key this transaction read was written by a transaction that committed after
    /// `snapshot`.
    pub(super) fn conflicts(&self, snapshot: i64) -> bool {
        self.db.conflicts(snapshot, self.reads.iter())
    }

    /// Makes the writes visible to the optimistic checks of later transactions.
    pub(super) fn commit(self, at: i64) {
        self.db.stamp(at, &self.writes);
    }

    /// Takes every write back, newest first.
    pub(super) fn rollback(self) {
        let db = self.db;
        for undo in self.undo.into_iter().rev() {
            match undo {
                Undo::Token(id, before) => {
                    if let Some(now) = db.tokens.remove(&id)
                        && let Some(ids) = db.by_document.get_mut(&now.document)
                    {
                        ids.remove(&id);
                    }
                    if let Some(token) = before {
                        db.by_document
                            .entry(token.document.clone())
                            .or_default()
                            .insert(id.clone());
                        db.tokens.insert(id, token);
                    }
                }
                Undo::Deleted(id, before) => {
                    match before {
                        Some(entry) => db.recently_deleted.insert(id, entry),
                        None => db.recently_deleted.remove(&id),
                    };
                }
                Undo::Account(id) => {
                    if let Some(account) = db.accounts.remove(&id) {
                        db.by_email.remove(&account.email);
                    }
                }
                Undo::Attempt(id, before) => {
                    match before {
                        Some(attempt) => db.attempts.insert(id, attempt),
                        None => db.attempts.remove(&id),
                    };
                }
                Undo::Policy(before) => db.policy = before,
                Undo::Rotation(row, before) => {
                    match before {
                        Some(rotation) => db.rotations.insert(row, rotation),
                        None => db.rotations.remove(&row),
                    };
                }
                Undo::Replay(row, before) => {
                    match before {
                        Some(replay) => db.replays.insert(row, replay),
                        None => db.replays.remove(&row),
                    };
                }
            }
        }
    }

    fn read(&mut self, key: Key) {
        self.reads.insert(key);
    }

    fn write(&mut self, key: Key) {
        self.writes.insert(key);
    }

    /// Saves the token document `id` as it is, before a write to it.
    fn save_token(&mut self, id: &str) {
        let before = self.db.tokens.get(id).cloned();
        self.undo.push(Undo::Token(id.to_owned(), before));
        self.write(Key::Token(id.to_owned()));
    }
    /// Resolves a secret to a caller: a configured key, or a live token whose secret matches its
    /// stored hash (`docs/design.md` "Fauna over HTTP › Token secrets" and `docs/design.md`
    /// "Fauna over HTTP › Authentication, expiry and revocation").
    pub(super) fn authenticate(&mut self, keys: &[String], secret: &str) -> Option<Caller> {
        if keys.iter().any(|k| k == secret) {
            return Some(Caller::Key);
        }
        if secret.starts_with("ey") && secret.contains('.') {
            return None; // a JWT; no access providers are configured
        }
        let (id, database, secret) = decode_token_secret(secret)?;
        if database != self.database_id {
            return None;
        }
        let cached = || {
            let (token, deleted_at) = self.db.recently_deleted.get(&id.to_string())?;
            (self.stale_key_cache
                && self.now - deleted_at < 60_000_000_000
                && token.live_at(self.now))
            .then(|| token.clone())
        };
        let token = match cached() {
            Some(token) => token,
            None => self.read_token(&id.to_string())?,
        };
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        (hash == token.secret_hash).then(|| Caller::Token(Box::new(token)))
    }

    /// `Token.byId(id)`: the token if it exists and has not expired.
    fn read_token(&mut self, id: &str) -> Option<TokenDoc> {
        self.read(Key::Token(id.to_owned()));
        let token = self
            .db
            .tokens
            .get(id)
            .filter(|t| t.live_at(self.now))?
            .clone();
        self.stats.reads += 1;
        self.stats.bytes_read += token.size();
        Some(token)
    }

    /// `Token.byDocument(Account.byId(account))`: its live tokens, by id.
    fn tokens_of(&mut self, account: &str) -> Vec<TokenDoc> {
        self.read(Key::TokensOf(account.to_owned()));
        let ids: Vec<String> = self
            .db
            .by_document
            .get(account)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default();
        ids.iter().filter_map(|id| self.read_token(id)).collect()
    }

    /// `Token.byDocument(account).where(.data.family == family)`.
    fn family_of(&mut self, account: &str, family: &Value) -> Vec<TokenDoc> {
        self.tokens_of(account)
            .into_iter()
            .filter(|t| fql_eq(t.data("family"), family))
            .collect()
    }

    /// `Account.byId(id)`: whether it exists.
    fn account_exists(&mut self, id: &str) -> bool {
        self.read(Key::Account(id.to_owned()));
        self.stats.reads += 1;
        self.db.accounts.contains_key(id)
    }

    /// `Account.byEmail(email).first()`.
    fn account_by_email(&mut self, email: &Value) -> Option<String> {
        self.stats.reads += 1;
        if let Value::Str(email) = email {
            self.read(Key::Email(email.clone()));
        }
        match email {
            Value::Str(email) if self.stale_email.as_ref() == Some(email) => None,
            Value::Str(email) => self.db.by_email.get(email).cloned(),
            _ => None,
        }
    }

    /// `Account.create({ email, cognito_sub })`: the unique check reads the email's index term.
    fn create_account(
        &mut self,
        email: &str,
        cognito_sub: Option<String>,
    ) -> Result<String, Failure> {
        self.read(Key::Email(email.to_owned()));
        self.stats.writes += 1;
        let id = self.db.create_account(email, cognito_sub, self.now)?;
        self.undo.push(Undo::Account(id.clone()));
        self.write(Key::Email(email.to_owned()));
        self.write(Key::Account(id.clone()));
        Ok(id)
    }

    /// `Token.create({ document, ttl, data })`: returns the id and the secret, which is shown
    /// only here.
    fn create_token(&mut self, document: &str, ttl: i128, data: Value) -> (String, String) {
        let id = self.db.next_id();
        self.save_token(&id.to_string());
        self.write(Key::TokensOf(document.to_owned()));
        let secret = mint_secret(id, self.database_id);
        let token = TokenDoc {
            id: id.to_string(),
            document: document.to_owned(),
            ttl: Some(ttl),
            data: strip_nulls(data),
            ts: self.now,
            secret_hash: Sha256::digest(secret.as_bytes()).into(),
        };
        self.stats.writes += 1;
        self.stats.bytes_written += token.size();
        self.db
            .by_document
            .entry(document.to_owned())
            .or_default()
            .insert(token.id.clone());
        self.db.tokens.insert(token.id.clone(), token);
        (id.to_string(), secret)
    }

    fn delete_token(&mut self, id: &str) {
        if let Some(document) = self.db.tokens.get(id).map(|t| t.document.clone()) {
            self.save_token(id);
            let cached = self.db.recently_deleted.get(id).cloned();
            self.undo.push(Undo::Deleted(id.to_owned(), cached));
            self.write(Key::TokensOf(document));
        }
        if let Some(token) = self.db.tokens.remove(id) {
            self.stats.writes += 1;
            self.db
                .recently_deleted
                .insert(id.to_owned(), (token.clone(), self.now));
            if let Some(ids) = self.db.by_document.get_mut(&token.document) {
                ids.remove(id);
            }
        }
    }

    /// Deletes `tokens` and returns how many of them were live: neither consumed nor superseded
    /// (`.where(t => t.data.replaced_by == null && t.data.superseded != true).count()`).
    fn delete_counting_unconsumed(&mut self, tokens: &[TokenDoc]) -> Value {
        let revoked = tokens.iter().filter(|t| is_live(t)).count();
        for token in tokens {
            self.delete_token(&token.id);
        }
        Value::Int(i32::try_from(revoked).unwrap_or(i32::MAX))
    }

    /// The minting half of the issue texts and of `rotateRefreshToken`: a refresh token and
    /// its access token, and the result's `refresh` and `access` objects.
    fn mint_pair(&mut self, mint: &Mint<'_>) -> (Value, Value) {
        let now = self.now;
        let data = |kind: &str, parent: Option<&str>| {
            let mut data = BTreeMap::from([
                ("kind".to_owned(), Value::Str(kind.to_owned())),
                ("family".to_owned(), mint.family.clone()),
                ("email".to_owned(), mint.email.clone()),
                ("client_id".to_owned(), mint.client_id.clone()),
                ("issued_at".to_owned(), Value::Time(now)),
                ("session_ends".to_owned(), Value::Time(mint.session_ends)),
                ("metadata".to_owned(), mint.metadata.clone()),
            ]);
            // `cognito_sub: account.cognito_sub`: a null field is not stored (FQL drops it).
            if !mint.cognito_sub.is_null() {
                data.insert("cognito_sub".to_owned(), mint.cognito_sub.clone());
            }
            if let Some(parent) = parent {
                data.insert("parent".to_owned(), Value::Str(parent.to_owned()));
            }
            Value::Object(data)
        };
        let minted = |id: String, secret: String, ttl: i128| {
            Value::Object(BTreeMap::from([
                ("id".to_owned(), Value::Str(id)),
                ("secret".to_owned(), Value::Str(secret)),
                ("ttl".to_owned(), Value::Time(ttl)),
            ]))
        };
        let refresh_data = data("refresh", None);
        let (refresh_id, refresh_secret) =
            self.create_token(mint.account, mint.refresh_ttl, refresh_data);
        let access_data = data("access", Some(&refresh_id));
        let (access_id, access_secret) =
            self.create_token(mint.account, mint.access_ttl, access_data);
        (
            minted(refresh_id, refresh_secret, mint.refresh_ttl),
            minted(access_id, access_secret, mint.access_ttl),
        )
    }

    /// Runs a known query as `caller`. A failure is taken back whole by the server
    /// ([`Txn::rollback`]), as Fauna aborts the whole transaction.
    pub(super) fn run(
        &mut self,
        query: Query,
        caller: &Caller,
        args: &Args<'_>,
    ) -> Result<Value, Failure> {
        // The roles judge the authenticated token; the queries and functions read the stored
        // document (`Token.byId(Query.token()!.id)`), which a cached copy may outlive.
        let token = match caller {
            Caller::Key => None,
            Caller::Token(cached) => self.read_token(&cached.id),
        };
        if let Caller::Token(token) = caller {
            let kind = token.data("kind");
            let allowed = match query {
                Query::Introspect => true,
                Query::RevokeSecret => {
                    fql_eq(kind, &Value::Str("access".into()))
                        || fql_eq(kind, &Value::Str("refresh".into()))
                }
                Query::Rotate => fql_eq(kind, &Value::Str("refresh".into())),
                _ => false,
            };
            if !allowed {
                return Err(Failure::new(
                    "permission_denied",
                    "Insufficient privileges to perform the action.".into(),
                )
                .at(query.guarded_call()));
            }
        }
        match query {
            Query::IssueByEmail | Query::IssueForAccount => self.issue(query, args),
            Query::IssueOnceByEmail | Query::IssueOnceForAccount => self.issue_once(query, args),
            Query::SealReplay => self.seal_replay(args),
            Query::SealSuccessor => self.seal_successor(args),
            Query::SuccessorState => self.successor_state(args),
            Query::ReplayState => {
                let row = expect_str(args.get("row")?, "row", BY_ROW)?.to_owned();
                Ok(match self.replay_by_row(&row) {
                    Some(claim) if claim.expires_at > self.now => claim_value(&claim),
                    _ => Value::Null,
                })
            }
            Query::Rotate => self.rotate(token, args),
            Query::Introspect => Ok(token.map_or(Value::Null, |t| t.to_value())),
            Query::RevokeSecret => self.revoke_secret(token, args),
            Query::RevokeToken => self.revoke_token(args),
            Query::RevokeFamily | Query::RevokeAccount => self.revoke_account(query, args),
            Query::AccountByEmail => {
                let email = args.get("email")?;
                Ok(self.account_by_email(email).map_or(Value::Null, Value::Str))
            }
            Query::ListTokens => self.list_tokens(args),
            Query::RevokeEmail => {
                let email = args.get("email")?;
                let Some(account) = self.account_by_email(email) else {
                    return Ok(Value::Null);
                };
                let tokens = self.tokens_of(&account);
                let revoked = self.delete_counting_unconsumed(&tokens);
                Ok(Value::Object(BTreeMap::from([
                    ("account".to_owned(), Value::Str(account)),
                    ("revoked".to_owned(), revoked),
                ])))
            }
            Query::PublishPolicy => self.publish_policy(args),
            Query::OriginalLookup => {
                let email = args.get("email")?;
                Ok(self
                    .account_by_email(email)
                    .map_or(Value::Null, |id| self.account_value(&id)))
            }
            Query::OriginalRegister => {
                let email = expect_str(args.get("email")?, "email", "Account.create(")?;
                let id = self.create_account(email, None)?;
                Ok(self.account_value(&id))
            }
            Query::OriginalCreateRefresh | Query::OriginalCreateAccess => {
                const ADD: &str = "Time.now().add(ttl, \"seconds\")";
                let account = expect_id(args.get("account_id")?, "Account.byId(account_id)")?;
                if !self.account_exists(&account) {
                    return Err(Failure::new(
                        "document_not_found",
                        format!(
                            "Collection `Account` does not contain document with id {account}."
                        ),
                    )
                    .at("Account.byId(account_id)"));
                }
                let ttl = add_seconds(self.now, expect_seconds(args.get("ttl")?, ADD)?, ADD)?;
                let mut data = BTreeMap::new();
                if query == Query::OriginalCreateRefresh {
                    data.insert("kind".to_owned(), Value::Str("refresh".into()));
                } else {
                    data.insert("kind".to_owned(), Value::Str("access".into()));
                    data.insert("parent".to_owned(), args.get("parent")?.clone());
                }
                let (id, secret) = self.create_token(&account, ttl, Value::Object(data));
                let mut doc = self.db.tokens[&id].to_value();
                if let Value::Doc(doc) = &mut doc {
                    doc.fields.push(("secret", Value::Str(secret)));
                }
                Ok(doc)
            }
        }
    }

    /// An account document as a read returns it.
    fn account_value(&self, id: &str) -> Value {
        let account = &self.db.accounts[id];
        let mut fields = vec![("email", Value::Str(account.email.clone()))];
        if let Some(sub) = &account.cognito_sub {
            fields.push(("cognito_sub", Value::Str(sub.clone())));
        }
        Value::Doc(Box::new(Doc {
            coll: "Account",
            id: id.to_owned(),
            ts: account.ts,
            fields,
        }))
    }

    /// `ISSUE_BY_EMAIL` / `ISSUE_FOR_ACCOUNT`.
    fn issue(&mut self, query: Query, args: &Args<'_>) -> Result<Value, Failure> {
        const ADD: &str = "now.add(refresh_ttl, \"seconds\")";
        const ADD_ACCESS: &str = "now.add(access_ttl, \"seconds\")";
        // `let account = …`: found, to be created, or missing.
        let (existing, email, create) =
            if matches!(query, Query::IssueByEmail | Query::IssueOnceByEmail) {
                let email = args.get("email")?;
                match self.account_by_email(email) {
                    Some(id) => (Some(id), Some(email), None),
                    None => {
                        let address = expect_str(email, "email", "Account.create(")?;
                        let sub = match args.get("cognito_sub")? {
                            Value::Null => None,
                            other => Some(expect_str(other, "cognito_sub", "Account.create(")?),
                        };
                        (None, Some(email), Some((address, sub)))
                    }
                }
            } else {
                let id = expect_id(args.get("account_id")?, "Account.byId(account_id)")?;
                if !self.account_exists(&id) {
                    return Err(Failure::new(
                        "document_not_found",
                        format!("Collection `Account` does not contain document with id {id}."),
                    )
                    .at("(account_id)!"));
                }
                (Some(id), None, None)
            };
        let nonce = expect_str(args.get("nonce")?, "other", "+ nonce")?;
        let retried = expect_bool(args.get("retried")?, "if (retried)")?;
        let refresh_secs = expect_seconds(args.get("refresh_ttl")?, ADD)?;
        let refresh_ttl = add_seconds(self.now, refresh_secs, ADD)?;
        let email = match email {
            Some(email) => email,
            None => args.get("email")?,
        };
        let client_id = args.get("client_id")?;
        let metadata = args.get("metadata")?;
        let access_secs = expect_seconds(args.get("access_ttl")?, ADD_ACCESS)?;
        let access_ttl = add_seconds(self.now, access_secs, ADD_ACCESS)?;
        const ADD_SESSION: &str = "now.add(session_ttl, \"seconds\")";
        let session_secs = expect_seconds(args.get("session_ttl")?, ADD_SESSION)?;
        let session_ends = add_seconds(self.now, session_secs, ADD_SESSION)?;

        // Checks are done: write.
        let account = match (existing, create) {
            (Some(id), _) => id,
            (None, Some((address, sub))) => self.create_account(address, sub.map(str::to_owned))?,
            (None, None) => unreachable!("an account is found or created"),
        };
        let family = Value::Str(format!("fam_{account}_{nonce}"));
        // `if (retried) Token.byDocument(account).where(.data.family == family).forEach(.delete())`:
        // a committed earlier attempt of this call, whose answer was lost.
        if retried {
            for undelivered in self.family_of(&account, &family) {
                self.delete_token(&undelivered.id);
            }
        }
        let cognito_sub = self
            .db
            .accounts
            .get(&account)
            .and_then(|a| a.cognito_sub.clone())
            .map_or(Value::Null, Value::Str);
        let (refresh, access) = self.mint_pair(&Mint {
            account: &account,
            family: &family,
            email,
            client_id,
            cognito_sub: &cognito_sub,
            metadata,
            refresh_ttl,
            access_ttl,
            session_ends,
        });
        Ok(Value::Object(BTreeMap::from([
            ("account".to_owned(), Value::Str(account)),
            ("family".to_owned(), family),
            ("now".to_owned(), Value::Time(self.now)),
            ("refresh".to_owned(), refresh),
            ("access".to_owned(), access),
        ])))
    }

    /// The UDF `rotateRefreshToken(access_ttl, refresh_ttl, grace, client_id, any_client,
    /// session_ttl, attempt, coalesce)`.
    fn rotate(&mut self, token: Option<TokenDoc>, args: &Args<'_>) -> Result<Value, Failure> {
        const CALL: &str = "rotateRefreshToken(access_ttl, refresh_ttl, grace, client_id, any_client, session_ttl, attempt, coalesce)";
        let outcome = |o: &str| {
            Value::Object(BTreeMap::from([(
                "outcome".to_owned(),
                Value::Str(o.to_owned()),
            )]))
        };
        // The call evaluates its arguments first.
        let access_ttl = args.get("access_ttl")?;
        let refresh_ttl = args.get("refresh_ttl")?;
        let grace = args.get("grace")?;
        let client_id = args.get("client_id")?;
        let any_client = expect_bool(args.get("any_client")?, CALL)?;
        let session_ttl = args.get("session_ttl")?;
        let attempt = args.get("attempt")?;
        let coalesce = args.get("coalesce")?;
        // `let policy = BrokerPolicy.byId("1")`
        self.stats.reads += 1;
        self.read(Key::Policy);
        let Some(policy) = self.db.policy else {
            return Ok(outcome("no_policy"));
        };
        let Some(token) = token else {
            return Ok(outcome("inactive"));
        };
        if !fql_eq(token.data("kind"), &Value::Str("refresh".into())) {
            return Ok(outcome("inactive"));
        }
        if !client_allowed(&token, client_id, any_client && policy.any_client) {
            return Ok(outcome("wrong_client"));
        }
        // `Math.min(<argument>, policy.<limit>)`
        let access_ttl = expect_seconds(access_ttl, CALL)?.min(policy.access_ttl);
        let refresh_ttl = expect_seconds(refresh_ttl, CALL)?.min(policy.refresh_ttl);
        let grace = expect_seconds(grace, CALL)?.min(policy.grace);
        let session_ttl = expect_seconds(session_ttl, CALL)?.min(policy.session_ttl);
        // `family` is a set, read only where it is used.
        let family_name = token.data("family").clone();
        let replaced_by = token.data("replaced_by").clone();
        let successor = match &replaced_by {
            Value::Null => None,
            Value::Str(id) => self.read_token(id),
            other => self.read_token(&fql_text(other)),
        };
        let unused = successor.as_ref().is_some_and(is_live);
        // `let prior = RotationAttempt.byId(token.id)`
        self.stats.reads += 1;
        self.read(Key::Attempt(token.id.clone()));
        let prior = self
            .db
            .attempts
            .get(&token.id)
            .filter(|a| a.ttl.is_none_or(|ttl| ttl > self.now))
            .cloned();
        let mine = !replaced_by.is_null()
            && unused
            && prior
                .as_ref()
                .is_some_and(|p| fql_eq(&Value::Str(p.attempt.clone()), attempt));
        let retry = if replaced_by.is_null() || mine {
            false
        } else {
            let rotated_at = match token.data("rotated_at") {
                Value::Time(t) => *t,
                _ => {
                    return Err(Failure::new(
                        "invalid_null_access",
                        "Cannot access `add` on null.".into(),
                    )
                    .at(CALL));
                }
            };
            self.now <= add_seconds(rotated_at, grace, CALL)? && unused
        };
        // `let ends = token.data.session_ends ?? now.add(session_ttl, "seconds")`
        let ends = match token.data("session_ends") {
            Value::Time(t) => *t,
            _ => add_seconds(self.now, session_ttl, CALL)?,
        };
        if is_superseded(&token) || (!replaced_by.is_null() && !retry && !mine) {
            let family = self.family_of(&token.document, &family_name);
            let revoked = self.delete_counting_unconsumed(&family);
            return Ok(Value::Object(BTreeMap::from([
                ("outcome".to_owned(), Value::Str("reuse".into())),
                ("family".to_owned(), family_name),
                ("revoked".to_owned(), revoked),
            ])));
        }
        if ends <= self.now {
            return Ok(outcome("inactive"));
        }
        // `else if (retry && coalesce) { outcome: "coalesce", … }`: nothing written.
        if retry && expect_bool(coalesce, "retry && coalesce")? {
            return Ok(Value::Object(BTreeMap::from([
                ("outcome".to_owned(), Value::Str("coalesce".into())),
                ("account".to_owned(), Value::Str(token.document.clone())),
                ("family".to_owned(), family_name),
                ("rotated_at".to_owned(), token.data("rotated_at").clone()),
                ("successor".to_owned(), replaced_by),
            ])));
        }
        let refresh_ttl = add_seconds(self.now, refresh_ttl, CALL)?.min(ends);
        let access_ttl = add_seconds(self.now, access_ttl, CALL)?.min(ends);
        let Value::Str(attempt) = attempt.clone() else {
            return Err(invalid_argument("attempt", "String", attempt, CALL));
        };

        // Checks are done: write.
        if let Some(successor) = successor.filter(|_| retry || mine) {
            // The successor's access tokens go; the successor is deleted when this very
            // attempt minted it (nobody received it), else kept, marked superseded.
            let successor_id = Value::Str(successor.id.clone());
            for t in &self.family_of(&token.document, &family_name) {
                if fql_eq(t.data("parent"), &successor_id) {
                    self.delete_token(&t.id);
                }
            }
            if mine {
                self.delete_token(&successor.id);
            } else {
                self.update_data(&successor.id, "superseded", Value::Bool(true));
            }
        }
        let (refresh, access) = self.mint_pair(&Mint {
            account: &token.document,
            family: &family_name,
            email: token.data("email"),
            client_id: token.data("client_id"),
            cognito_sub: token.data("cognito_sub"),
            metadata: token.data("metadata"),
            refresh_ttl,
            access_ttl,
            session_ends: ends,
        });
        // `token.update({ data: { replaced_by: refresh.id, rotated_at: data.rotated_at ?? now } })`
        let rotated_at = match token.data("rotated_at") {
            Value::Null => Value::Time(self.now),
            t => t.clone(),
        };
        self.update_data(&token.id, "replaced_by", refresh.field("id").clone());
        self.update_data(&token.id, "rotated_at", rotated_at);
        // `prior!.update({ attempt })` or `RotationAttempt.create({ id: token.id, attempt, ttl: token.ttl })`
        self.stats.writes += 1;
        let before = self.db.attempts.insert(
            token.id.clone(),
            Attempt {
                attempt,
                ttl: token.ttl,
            },
        );
        self.undo.push(Undo::Attempt(token.id.clone(), before));
        self.write(Key::Attempt(token.id.clone()));
        Ok(Value::Object(BTreeMap::from([
            ("outcome".to_owned(), Value::Str("rotated".into())),
            ("account".to_owned(), Value::Str(token.document.clone())),
            ("family".to_owned(), family_name),
            ("now".to_owned(), Value::Time(self.now)),
            ("refresh".to_owned(), refresh),
            ("access".to_owned(), access),
        ])))
    }

    /// `Replay.byRow(row).first()`: the row's document if it has not expired.
    fn replay_by_row(&mut self, row: &str) -> Option<Replay> {
        self.read(Key::ReplayRow(row.to_owned()));
        self.stats.reads += 1;
        self.db
            .replays
            .get(row)
            .filter(|r| r.ttl > self.now)
            .cloned()
    }

    /// Writes (or, with `None`, deletes) the `Replay` document of `row`.
    fn put_replay(&mut self, row: &str, replay: Option<Replay>) {
        let before = match replay {
            Some(replay) => self.db.replays.insert(row.to_owned(), replay),
            None => self.db.replays.remove(row),
        };
        self.undo.push(Undo::Replay(row.to_owned(), before));
        self.write(Key::ReplayRow(row.to_owned()));
        self.stats.writes += 1;
    }

    /// `ISSUE_ONCE_BY_EMAIL` / `ISSUE_ONCE_FOR_ACCOUNT`: the issue texts under a claim.
    fn issue_once(&mut self, query: Query, args: &Args<'_>) -> Result<Value, Failure> {
        const CREATE: &str = "Replay.create(";
        let row = expect_str(args.get("row")?, "row", BY_ROW)?.to_owned();
        let claim = self.replay_by_row(&row);
        let nonce = args.get("nonce")?;
        if let Some(claim) = &claim
            && claim.expires_at > self.now
            && !fql_eq(&Value::Str(claim.nonce.clone()), nonce)
        {
            return Ok(Value::Object(BTreeMap::from([(
                "claim".to_owned(),
                claim_value(claim),
            )])));
        }
        if claim.is_some() {
            // `claim!.delete()`: past its window, or this call's own earlier attempt.
            self.put_replay(&row, None);
        }
        let issue = if query == Query::IssueOnceByEmail {
            Query::IssueByEmail
        } else {
            Query::IssueForAccount
        };
        let issued = self.issue(issue, args)?;
        let window = expect_seconds(args.get("window")?, "now.add(window, \"seconds\")")?;
        let closes = add_seconds(self.now, window, "now.add(window, \"seconds\")")?;
        let Value::Str(nonce) = nonce.clone() else {
            return Err(invalid_argument("nonce", "String", nonce, CREATE));
        };
        // The unique constraint on `row`: a live document of the row (which this transaction
        // deleted if it saw it) fails the create.
        if self.db.replays.get(&row).is_some_and(|r| r.ttl > self.now) {
            let mut failure =
                Failure::new("constraint_failure", "Failed unique constraint.".into()).at(CREATE);
            failure.extra = Some(Box::new(FailureExtra {
                notes: Some("constraint failures:\n  row: Failed unique constraint".into()),
                summary: None,
                constraint_failures: Some(serde_json::json!([
                    { "paths": [["row"]], "message": "Failed unique constraint" }
                ])),
            }));
            return Err(failure);
        }
        let account = match issued.field("account") {
            Value::Str(account) => account.clone(),
            other => fql_text(other),
        };
        self.put_replay(
            &row,
            Some(Replay {
                nonce,
                account,
                family: issued.field("family").clone(),
                expires_at: closes,
                ttl: closes,
                sealed: Value::Null,
            }),
        );
        Ok(issued)
    }

    /// `SEAL_REPLAY`: stores the sealed pair in this call's claim.
    fn seal_replay(&mut self, args: &Args<'_>) -> Result<Value, Failure> {
        let row = expect_str(args.get("row")?, "row", BY_ROW)?.to_owned();
        let claim = self.replay_by_row(&row);
        let nonce = args.get("nonce")?;
        let Some(mut claim) = claim.filter(|c| fql_eq(&Value::Str(c.nonce.clone()), nonce)) else {
            return Ok(Value::Bool(false));
        };
        claim.sealed = strip_nulls(args.get("sealed")?.clone());
        self.put_replay(&row, Some(claim));
        Ok(Value::Bool(true))
    }

    /// `Rotation.byRow(row).first()`: the row's document if it has not expired.
    fn rotation_by_row(&mut self, row: &str) -> Option<SealedSuccessor> {
        self.read(Key::RotationRow(row.to_owned()));
        self.stats.reads += 1;
        self.db
            .rotations
            .get(row)
            .filter(|r| r.ttl > self.now)
            .cloned()
    }

    /// `SEAL_SUCCESSOR`: creates or replaces the row's `Rotation` document.
    fn seal_successor(&mut self, args: &Args<'_>) -> Result<Value, Failure> {
        const AT: &str = "Rotation.create(fields)";
        let row = expect_str(args.get("row")?, "row", "Rotation.byRow(row)")?.to_owned();
        self.rotation_by_row(&row);
        let time = |name: &'static str| -> Result<i128, Failure> {
            match args.get(name)? {
                Value::Time(t) => Ok(*t),
                other => Err(invalid_argument(name, "Time", other, AT)),
            }
        };
        let doc = SealedSuccessor {
            successor: expect_str(args.get("successor")?, "successor", AT)?.to_owned(),
            sealed: strip_nulls(args.get("sealed")?.clone()),
            refresh_expires: time("refresh_expires")?,
            access_expires: time("access_expires")?,
            ttl: time("closes")?,
        };
        // The unique `row` holds: the document is created or replaced, never duplicated.
        let before = self.db.rotations.insert(row.clone(), doc);
        self.undo.push(Undo::Rotation(row.clone(), before));
        self.write(Key::RotationRow(row));
        self.stats.writes += 1;
        Ok(Value::Bool(true))
    }

    /// `SUCCESSOR_STATE`: the sealed successor while it is the current refresh token.
    fn successor_state(&mut self, args: &Args<'_>) -> Result<Value, Failure> {
        let row = expect_str(args.get("row")?, "row", "Rotation.byRow(row)")?.to_owned();
        let rotation = self.rotation_by_row(&row);
        let successor = args.get("successor")?;
        let Some(rotation) =
            rotation.filter(|r| fql_eq(&Value::Str(r.successor.clone()), successor))
        else {
            return Ok(Value::Null);
        };
        let current = self.read_token(&rotation.successor);
        if !current.as_ref().is_some_and(is_live) {
            return Ok(Value::Null);
        }
        Ok(Value::Object(BTreeMap::from([
            ("sealed".to_owned(), rotation.sealed),
            (
                "refresh_expires".to_owned(),
                Value::Time(rotation.refresh_expires),
            ),
            (
                "access_expires".to_owned(),
                Value::Time(rotation.access_expires),
            ),
        ])))
    }

    /// `PUBLISH_POLICY`: creates or replaces `BrokerPolicy` "1".
    fn publish_policy(&mut self, args: &Args<'_>) -> Result<Value, Failure> {
        const AT: &str = "BrokerPolicy.create(";
        let number = |name: &'static str| -> Result<i64, Failure> {
            match args.get(name)? {
                Value::Int(n) => Ok(i64::from(*n)),
                Value::Long(n) => Ok(*n),
                other => Err(invalid_argument(name, "Number", other, AT)),
            }
        };
        let policy = Policy {
            access_ttl: number("access_ttl")?,
            refresh_ttl: number("refresh_ttl")?,
            grace: number("grace")?,
            session_ttl: number("session_ttl")?,
            any_client: match args.get("any_client")? {
                Value::Bool(b) => *b,
                other => return Err(invalid_argument("any_client", "Boolean", other, AT)),
            },
        };
        self.stats.reads += 1;
        self.stats.writes += 1;
        self.read(Key::Policy);
        self.undo.push(Undo::Policy(self.db.policy.replace(policy)));
        self.write(Key::Policy);
        Ok(Value::Bool(true))
    }

    /// `token.update({ data: { <field>: value } })`: one field of a token's `data`.
    fn update_data(&mut self, id: &str, field: &str, value: Value) {
        self.save_token(id);
        if let Some(stored) = self.db.tokens.get_mut(id) {
            if let Value::Object(data) = &mut stored.data {
                data.insert(field.to_owned(), value);
            }
            stored.ts = self.now;
            self.stats.writes += 1;
        }
    }

    /// The UDF `revokeCurrentToken(client_id, any_client)`.
    fn revoke_secret(
        &mut self,
        token: Option<TokenDoc>,
        args: &Args<'_>,
    ) -> Result<Value, Failure> {
        let client_id = args.get("client_id")?;
        let any_client = expect_bool(
            args.get("any_client")?,
            "revokeCurrentToken(client_id, any_client)",
        )?;
        // `let any_client = any_client && BrokerPolicy.byId("1")?.any_client == true`
        let any_client = any_client && {
            self.stats.reads += 1;
            self.read(Key::Policy);
            self.db.policy.is_some_and(|p| p.any_client)
        };
        let outcome = |o: &str, revoked: Option<Value>| {
            let mut fields = BTreeMap::from([("outcome".to_owned(), Value::Str(o.to_owned()))]);
            if let Some(revoked) = revoked {
                fields.insert("revoked".to_owned(), revoked);
            }
            Value::Object(fields)
        };
        let Some(token) = token else {
            return Ok(outcome("inactive", None));
        };
        if token.data("kind").is_null() || !is_live(&token) {
            return Ok(outcome("inactive", None));
        }
        if !client_allowed(&token, client_id, any_client) {
            return Ok(outcome("wrong_client", None));
        }
        if fql_eq(token.data("kind"), &Value::Str("refresh".into())) {
            let family = self.family_of(&token.document, token.data("family"));
            let revoked = self.delete_counting_unconsumed(&family);
            Ok(outcome("revoked", Some(revoked)))
        } else {
            self.delete_token(&token.id);
            Ok(outcome("revoked", Some(Value::Int(1))))
        }
    }

    /// `REVOKE_TOKEN`.
    fn revoke_token(&mut self, args: &Args<'_>) -> Result<Value, Failure> {
        let id = expect_id(args.get("token_id")?, "Token.byId(token_id)")?;
        let Some(token) = self.read_token(&id) else {
            return Ok(Value::Int(0));
        };
        if fql_eq(token.data("kind"), &Value::Str("refresh".into())) {
            let family = self.family_of(&token.document, token.data("family"));
            Ok(self.delete_counting_unconsumed(&family))
        } else {
            self.delete_token(&token.id);
            Ok(Value::Int(1))
        }
    }

    /// `REVOKE_FAMILY` and `REVOKE_ACCOUNT`.
    fn revoke_account(&mut self, query: Query, args: &Args<'_>) -> Result<Value, Failure> {
        let id = expect_id(args.get("account_id")?, "Account.byId(account_id)")?;
        if !self.account_exists(&id) {
            return Ok(Value::Int(0));
        }
        let tokens = if query == Query::RevokeFamily {
            let family = args.get("family")?;
            self.family_of(&id, family)
        } else {
            self.tokens_of(&id)
        };
        Ok(self.delete_counting_unconsumed(&tokens))
    }

    /// `LIST_TOKENS`.
    fn list_tokens(&mut self, args: &Args<'_>) -> Result<Value, Failure> {
        const INCLUDE: &str = "(include_consumed ||";
        let id = expect_id(args.get("account_id")?, "Account.byId(account_id)")?;
        if !self.account_exists(&id) {
            return Ok(Value::Array(Vec::new()));
        }
        let tokens = self.tokens_of(&id);
        let mut page = Vec::new();
        for token in tokens {
            // `.where(t => t.data.issued_at < after_issued_at || (… == … && t.id < after_id))`
            let after_issued_at = args.get("after_issued_at")?;
            let issued_at = token.data("issued_at");
            let before = fql_cmp(issued_at, after_issued_at) == Some(Ordering::Less)
                || (fql_eq(issued_at, after_issued_at) && {
                    let after_id = args.get("after_id")?;
                    fql_cmp(&Value::Str(token.id.clone()), after_id) == Some(Ordering::Less)
                });
            if !before {
                continue;
            }
            // `.where(t => t.data.superseded != true && (include_consumed || t.data.replaced_by == null))`:
            // a superseded token is revoked, and this store lists no revoked token.
            if !is_superseded(&token)
                && (expect_bool(args.get("include_consumed")?, INCLUDE)?
                    || token.data("replaced_by").is_null())
            {
                page.push(token);
            }
        }
        // `.order(desc(.data.issued_at), desc(.id))`
        page.sort_by(|a, b| {
            fql_cmp(b.data("issued_at"), a.data("issued_at"))
                .unwrap_or(Ordering::Equal)
                .then_with(|| cmp_strings(&b.id, &a.id))
        });
        let limit = match args.get("limit")? {
            Value::Int(n) if *n >= 0 => usize::try_from(*n).unwrap_or(0),
            Value::Long(n) if *n >= 0 => usize::try_from(*n).unwrap_or(usize::MAX),
            other => return Err(invalid_argument("limit", "Int", other, ".take(limit)")),
        };
        Ok(Value::Array(
            page.iter().take(limit).map(TokenDoc::to_value).collect(),
        ))
    }
}

/// Where the texts that read a `Replay` document look it up.
const BY_ROW: &str = "Replay.byRow(row)";

/// A claim as the texts answer it: `{ account, family, sealed }`.
fn claim_value(claim: &Replay) -> Value {
    Value::Object(BTreeMap::from([
        ("account".to_owned(), Value::Str(claim.account.clone())),
        ("family".to_owned(), claim.family.clone()),
        ("sealed".to_owned(), claim.sealed.clone()),
    ]))
}

/// `t.data.superseded == true`.
fn is_superseded(token: &TokenDoc) -> bool {
    fql_eq(token.data("superseded"), &Value::Bool(true))
}

/// `t.data.replaced_by == null && t.data.superseded != true`: neither consumed nor superseded.
fn is_live(token: &TokenDoc) -> bool {
    token.data("replaced_by").is_null() && !is_superseded(token)
}

/// `!(any_client && client_id == null) && token.data.client_id != client_id` is false.
fn client_allowed(token: &TokenDoc, client_id: &Value, any_client: bool) -> bool {
    (any_client && client_id.is_null()) || fql_eq(token.data("client_id"), client_id)
}
