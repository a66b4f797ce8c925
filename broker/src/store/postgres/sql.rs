//! The PostgreSQL store's SQL: the schema migrations and one statement per operation.
//!
//! Every RPC that matters for latency (issue, refresh, introspect, revoke by secret) is one
//! statement: the reads and writes of an operation are common table expressions of that
//! statement, so the operation costs one round trip and is atomic without a transaction block.
//! The statements are written to run as if alone, which the store gets by running every
//! connection at `SERIALIZABLE` (see the module documentation of `super`); under READ COMMITTED
//! the CTEs that read a token's successor would see the statement's snapshot while the update
//! of the presented token saw its newest version, and two refreshes could both "win".
//!
//! Portability (CockroachDB, YugabyteDB): only plain CTEs, `INSERT … ON CONFLICT`,
//! `UPDATE … FROM`, row comparisons and `IS NOT DISTINCT FROM`; no PL/pgSQL, no advisory
//! locks, no LISTEN/NOTIFY, no sequences (ids are minted by the broker). Every parameter carries
//! an explicit cast, so no engine has to infer a type from context. Times are microseconds since
//! the epoch in `BIGINT`, from the broker's clock, as in the embedded store.
//!
//! Retries after an ambiguous commit are recognised, not repeated: the broker mints the new
//! token ids before the first attempt and sends the same ones on every attempt (an insert that
//! finds its ids is the same call, already committed), and every revocation stamps the rows it
//! revokes with the call's attempt nonce (`revoked_by`), so a retry counts what its earlier
//! attempt revoked instead of answering "nothing to revoke".

/// The table that records applied migrations, one row per version.
pub(super) const SCHEMA_TABLE: &str = "tokenbroker_schema";

/// Schema migrations, applied in order; version `n` is `MIGRATIONS[n - 1]`.
pub(super) const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE accounts (
    id          TEXT PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE,
    cognito_sub TEXT,
    created_at  BIGINT NOT NULL,
    not_before  BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE tokens (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL CHECK (kind IN ('access', 'refresh')),
    account_id      TEXT NOT NULL REFERENCES accounts (id),
    family_id       TEXT NOT NULL,
    parent_id       TEXT,
    client_id       TEXT,
    secret_sha256   BYTEA NOT NULL,
    issued_at       BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    session_ends_at BIGINT NOT NULL,
    revoked_at      BIGINT,
    revoked_by      TEXT,
    rotated_at      BIGINT,
    replaced_by     TEXT,
    superseded_at   BIGINT,
    metadata        TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX tokens_by_account ON tokens (account_id, issued_at, id);
CREATE INDEX tokens_by_family ON tokens (family_id);
",
    r"
CREATE TABLE replays (
    row_digest BYTEA PRIMARY KEY,
    account_id TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    key_id     TEXT NOT NULL,
    nonce      BYTEA NOT NULL,
    sealed     BYTEA NOT NULL
);
CREATE INDEX replays_by_expiry ON replays (expires_at);
",
    r"
CREATE TABLE rotations (
    token_id        TEXT PRIMARY KEY,
    successor_id    TEXT NOT NULL,
    closes_at       BIGINT NOT NULL,
    refresh_expires BIGINT NOT NULL,
    access_expires  BIGINT NOT NULL,
    key_id          TEXT NOT NULL,
    nonce           BYTEA NOT NULL,
    sealed          BYTEA NOT NULL
);
CREATE INDEX rotations_by_closing ON rotations (closes_at);
",
];

/// "Active at `$now`" over `tokens {t} JOIN accounts {a}`; agrees with `TokenRow::state`.
macro_rules! active {
    ($t:literal, $a:literal, $now:literal) => {
        concat!(
            $t,
            ".revoked_at IS NULL AND ",
            $t,
            ".replaced_by IS NULL AND ",
            $t,
            ".expires_at > ",
            $now,
            " AND ",
            $t,
            ".issued_at > ",
            $a,
            ".not_before"
        )
    };
}

/// The columns [`super::token_row`] reads, in order, over `tokens t JOIN accounts a`.
macro_rules! token_columns {
    () => {
        "t.kind, t.account_id, t.family_id, t.parent_id, t.client_id, t.secret_sha256, \
         t.issued_at, t.expires_at, t.revoked_at, t.rotated_at, t.replaced_by, t.metadata, \
         a.not_before, a.email, a.cognito_sub, t.session_ends_at, t.superseded_at, t.id"
    };
}

/// Gets or creates the account and inserts a pair, unless `$guard` (SQL over the CTEs in
/// `$before`) is false; see [`ISSUE`] and [`ISSUE_ONCE`].
macro_rules! issue {
    ($before:literal, $guard:literal, $after:literal) => {
        concat!(
            "WITH ",
            $before,
            "new_account AS (
    INSERT INTO accounts (id, email, cognito_sub, created_at)
    SELECT $1::text, $2::text, $3::text, $4::bigint WHERE $5::text IS NULL AND ",
            $guard,
            "
    ON CONFLICT (email) DO UPDATE SET cognito_sub = excluded.cognito_sub
        WHERE accounts.cognito_sub IS NULL AND excluded.cognito_sub IS NOT NULL
    RETURNING id
), account AS (
    SELECT $5::text AS id WHERE $5::text IS NOT NULL AND ",
            $guard,
            "
    UNION ALL SELECT id FROM new_account
    UNION ALL SELECT id FROM accounts
        WHERE email = $2::text AND $5::text IS NULL AND NOT EXISTS (SELECT 1 FROM new_account)
          AND ",
            $guard,
            "
), minted AS (
    INSERT INTO tokens (id, kind, account_id, family_id, parent_id, client_id, secret_sha256,
                        issued_at, expires_at, session_ends_at, metadata)
    SELECT n.id, n.kind, account.id, $6::text, n.parent_id, $7::text, n.digest,
           $4::bigint, n.expires_at, $14::bigint, $15::text
    FROM account, (VALUES ($8::text, 'refresh', NULL::text, $9::bytea, $10::bigint),
                          ($11::text, 'access', $8::text, $12::bytea, $13::bigint))
         AS n (id, kind, parent_id, digest, expires_at)
    ON CONFLICT (id) DO NOTHING
    RETURNING 1
)",
            $after
        )
    };
}

/// Gets or creates the account and inserts a pair.
///
/// `$1` new account id, `$2` email, `$3` Cognito sub, `$4` now, `$5` known account (or NULL),
/// `$6` family, `$7` client, `$8` refresh id, `$9` its digest, `$10` its expiry, `$11` access
/// id, `$12` its digest, `$13` its expiry, `$14` session end, `$15` metadata JSON.
///
/// The upsert updates the account only to record a first Cognito `sub`: a `DO UPDATE` that
/// always wrote would make every sign-in of one account conflict with every other one. When it
/// writes nothing it returns nothing, and the account comes from the statement's snapshot
/// (where it is, or the upsert would have failed with a serialization error). A retry after an
/// ambiguous commit finds its own tokens (`ON CONFLICT (id) DO NOTHING`) and the account.
pub(super) const ISSUE: &str = issue!("", "TRUE", "\nSELECT id FROM account");

/// [`ISSUE`] under an idempotency claim: `$16` the replay row's digest, `$17` when it closes,
/// `$18` the sealing key's id, `$19` the nonce, `$20` the sealed pair. When the row holds a
/// live replay, nothing is written and the row's sealed pair is answered (`account` is then
/// NULL); otherwise the pair is inserted and the row claimed (or an expired row taken over),
/// and `account` is answered with NULL replay columns. Two brokers claiming one row at once
/// conflict on its key, and the serialization failure's retry finds the winner's row; a retry
/// after an ambiguous commit finds its own row and answers its own pair from it.
pub(super) const ISSUE_ONCE: &str = issue!(
    "existing AS (
    SELECT account_id, key_id, nonce, sealed FROM replays
    WHERE row_digest = $16::bytea AND expires_at > $4::bigint
), ",
    "NOT EXISTS (SELECT 1 FROM existing)",
    ", claimed AS (
    INSERT INTO replays (row_digest, account_id, expires_at, key_id, nonce, sealed)
    SELECT $16::bytea, account.id, $17::bigint, $18::text, $19::bytea, $20::bytea FROM account
    ON CONFLICT (row_digest) DO UPDATE SET account_id = excluded.account_id,
        expires_at = excluded.expires_at, key_id = excluded.key_id, nonce = excluded.nonce,
        sealed = excluded.sealed
        WHERE replays.expires_at <= $4::bigint
    RETURNING 1
)
SELECT (SELECT id FROM account), e.account_id, e.key_id, e.nonce, e.sealed
FROM (SELECT 1) AS one LEFT JOIN existing e ON TRUE"
);

/// Forgets the replays whose window closed: `$1` now.
pub(super) const FORGET_REPLAYS: &str = "DELETE FROM replays WHERE expires_at <= $1::bigint";

/// The rows of tokens with their accounts, by id: `$1` the ids (Introspect's lookups, several
/// callers' at once; see `lookup.rs`). Ids not stored answer no row.
///
/// The account is a `LATERAL` subquery with `LIMIT 1`, which the planner cannot flatten into
/// a join: each token's account is one primary-key lookup. As a plain join, the plan for an
/// array of unknown length hashes the whole `accounts` table whenever it is small, several
/// times the cost of the lookups.
pub(super) const LOAD_TOKENS: &str = concat!(
    "SELECT ",
    token_columns!(),
    " FROM tokens t JOIN LATERAL (SELECT not_before, email, cognito_sub FROM accounts \
     WHERE id = t.account_id LIMIT 1) a ON TRUE WHERE t.id = ANY($1::text[])"
);

/// Rotates a refresh token with reuse detection: the embedded store's `rotate`, as one
/// statement. Answers one row (`action`, account, family, the new expiries, `revoked`, and for
/// `replay` the sealed successor's key id, nonce and ciphertext, and when the presented token
/// was rotated), or none for an unknown, forged, expired or non-refresh token.
///
/// `$1` presented id, `$2` its digest, `$3` now, `$4` grace (µs), `$5` any client, `$6` the
/// client, `$7` access TTL (µs), `$8` refresh TTL (µs), `$9` new refresh id, `$10` its digest,
/// `$11` new access id, `$12` its digest, `$13` the attempt nonce, `$14` the replay key's id
/// (NULL: keep no sealed successor), `$15` the seal's nonce, `$16` the sealed new pair.
///
/// Rotation across replicas: a rotation with a replay key keeps its sealed pair in `rotations`,
/// keyed by the presented token, in the same statement. A presentation that would supersede
/// the successor within the grace window (`retry`) answers that sealed pair instead (`replay`,
/// which writes nothing) when the row names the current successor and was sealed under the
/// same key; so concurrent refreshes of one token on any number of brokers get one successor.
/// Serializable execution orders them: the first commits `rotate`, the others fail to
/// serialize and their retries find the row. A row sealed under another key (a key change)
/// falls back to `retry`, which replaces the row. Rows are answered only within the grace
/// window and deleted by [`FORGET_ROTATIONS`] after it.
///
/// `prior` is the retry check: the new refresh id exists only if an earlier attempt of this
/// call committed, and then nothing else runs and its pair is answered. Each row is written by
/// at most one CTE (PostgreSQL leaves two writes of one row in one statement undefined):
/// `ended` touches the family only on reuse, `superseded` the successor and its access tokens,
/// `consumed` the presented token, and only one action is chosen.
pub(super) const REFRESH: &str = concat!(
    "\
WITH prior AS (
    SELECT r.account_id, r.family_id, r.expires_at AS refresh_expires,
           x.expires_at AS access_expires
    FROM tokens r JOIN tokens x ON x.id = $11::text
    WHERE r.id = $9::text
), presented AS (
    SELECT t.id, t.family_id, t.account_id, t.client_id, t.metadata, t.replaced_by,
           t.session_ends_at, coalesce(t.rotated_at, t.issued_at) AS rotated_at,
           (t.superseded_at IS NOT NULL AND t.revoked_at = t.superseded_at) AS superseded,
           (t.revoked_at IS NOT NULL OR t.issued_at <= a.not_before) AS revoked
    FROM tokens t JOIN accounts a ON a.id = t.account_id
    WHERE t.id = $1::text AND t.secret_sha256 = $2::bytea AND t.kind = 'refresh'
      AND t.expires_at > $3::bigint AND NOT EXISTS (SELECT 1 FROM prior)
), decision AS (
    SELECT p.*,
        CASE
            WHEN p.revoked AND NOT p.superseded THEN 'inactive'
            WHEN NOT ($5::boolean OR p.client_id IS NOT DISTINCT FROM $6::text)
                THEN 'wrong_client'
            WHEN p.superseded THEN 'reuse'
            WHEN p.session_ends_at <= $3::bigint THEN 'inactive'
            WHEN p.replaced_by IS NULL THEN 'rotate'
            WHEN $3::bigint <= p.rotated_at + $4::bigint AND EXISTS (
                SELECT 1 FROM tokens s JOIN accounts sa ON sa.id = s.account_id
                WHERE s.id = p.replaced_by AND ",
    active!("s", "sa", "$3::bigint"),
    ") THEN CASE WHEN EXISTS (
                SELECT 1 FROM rotations r
                WHERE r.token_id = p.id AND r.successor_id = p.replaced_by
                  AND r.key_id = $14::text
            ) THEN 'replay' ELSE 'retry' END
            ELSE 'reuse'
        END AS action,
        least($7::bigint, p.session_ends_at - $3::bigint) AS access_ttl,
        least($8::bigint, p.session_ends_at - $3::bigint) AS refresh_ttl
    FROM presented p
), ended AS (
    UPDATE tokens x SET revoked_at = $3::bigint, revoked_by = $13::text
    FROM decision d, accounts a
    WHERE d.action = 'reuse' AND x.family_id = d.family_id AND a.id = x.account_id AND ",
    active!("x", "a", "$3::bigint"),
    "
    RETURNING x.id
), superseded AS (
    UPDATE tokens x SET revoked_at = $3::bigint,
        superseded_at = CASE WHEN x.id = d.replaced_by THEN $3::bigint END
    FROM decision d
    WHERE d.action = 'retry' AND x.family_id = d.family_id
      AND (x.id = d.replaced_by OR x.parent_id = d.replaced_by) AND x.revoked_at IS NULL
    RETURNING x.id
), consumed AS (
    UPDATE tokens x SET replaced_by = $9::text, rotated_at = coalesce(x.rotated_at, $3::bigint)
    FROM decision d
    WHERE d.action IN ('rotate', 'retry') AND x.id = d.id
    RETURNING x.id
), minted AS (
    INSERT INTO tokens (id, kind, account_id, family_id, parent_id, client_id, secret_sha256,
                        issued_at, expires_at, session_ends_at, metadata)
    SELECT n.id, n.kind, d.account_id, d.family_id, n.parent_id, d.client_id, n.digest,
           $3::bigint,
           $3::bigint + CASE n.kind WHEN 'refresh' THEN d.refresh_ttl ELSE d.access_ttl END,
           d.session_ends_at, d.metadata
    FROM decision d, (VALUES ($9::text, 'refresh', NULL::text, $10::bytea),
                             ($11::text, 'access', $9::text, $12::bytea))
         AS n (id, kind, parent_id, digest)
    WHERE d.action IN ('rotate', 'retry')
    RETURNING 1
), sealed AS (
    INSERT INTO rotations (token_id, successor_id, closes_at, refresh_expires, access_expires,
                           key_id, nonce, sealed)
    SELECT d.id, $9::text,
           CASE d.action WHEN 'rotate' THEN $3::bigint ELSE d.rotated_at END + $4::bigint,
           $3::bigint + d.refresh_ttl, $3::bigint + d.access_ttl, $14::text, $15::bytea,
           $16::bytea
    FROM decision d
    WHERE d.action IN ('rotate', 'retry') AND $14::text IS NOT NULL
    ON CONFLICT (token_id) DO UPDATE SET successor_id = excluded.successor_id,
        closes_at = excluded.closes_at, refresh_expires = excluded.refresh_expires,
        access_expires = excluded.access_expires, key_id = excluded.key_id,
        nonce = excluded.nonce, sealed = excluded.sealed
    RETURNING 1
)
SELECT 'rotate' AS action, account_id, family_id, refresh_expires, access_expires,
       0::bigint AS revoked, NULL::text AS key_id, NULL::bytea AS nonce,
       NULL::bytea AS sealed, NULL::bigint AS rotated_at
FROM prior
UNION ALL
SELECT d.action, d.account_id, d.family_id,
       coalesce(r.refresh_expires, $3::bigint + d.refresh_ttl),
       coalesce(r.access_expires, $3::bigint + d.access_ttl),
       (SELECT count(*) FROM ended)
       + (SELECT count(*) FROM tokens y WHERE y.family_id = d.family_id AND y.revoked_by = $13::text),
       r.key_id, r.nonce, r.sealed, d.rotated_at
FROM decision d LEFT JOIN rotations r ON d.action = 'replay' AND r.token_id = d.id"
);

/// Forgets the sealed successors whose grace window closed: `$1` now.
pub(super) const FORGET_ROTATIONS: &str = "DELETE FROM rotations WHERE closes_at <= $1::bigint";

/// The body of every revocation of tokens: revokes the active tokens that `target` selects
/// (a CTE with `id`, `kind`, `family_id`: one token, its family if it is a refresh token), and
/// counts (`earlier`) what an earlier attempt of this call (nonce `$3`) revoked in the family of
/// `named` (the target whatever its state: after a committed attempt it is no longer active).
macro_rules! revoke_tokens {
    ($target:literal, $allowed:literal, $named:literal) => {
        concat!(
            "revoked AS (
    UPDATE tokens x SET revoked_at = $2::bigint, revoked_by = $3::text
    FROM ",
            $target,
            " p, accounts a
    WHERE ",
            $allowed,
            " AND (x.id = p.id OR (p.kind = 'refresh' AND x.family_id = p.family_id))
      AND a.id = x.account_id AND ",
            active!("x", "a", "$2::bigint"),
            "
    RETURNING x.id
), earlier AS (
    SELECT count(*) AS n FROM tokens y, ",
            $named,
            " p
    WHERE y.family_id = p.family_id AND y.revoked_by = $3::text
)"
        )
    };
}

/// Revokes by secret: `$1` id, `$2` now, `$3` nonce, `$4` digest, `$5` any client, `$6` the
/// client. Answers `found` (an active token with that digest), `allowed` (its client passes)
/// and `revoked`. A retry of a committed attempt finds the token inactive and counts what that
/// attempt revoked: `named` finds the token whatever its state for that reason.
pub(super) const REVOKE_SECRET: &str = concat!(
    "WITH presented AS (
    SELECT t.id, t.kind, t.family_id, t.client_id
    FROM tokens t JOIN accounts a ON a.id = t.account_id
    WHERE t.id = $1::text AND t.secret_sha256 = $4::bytea AND ",
    active!("t", "a", "$2::bigint"),
    "
), named AS (
    SELECT id, kind, family_id FROM tokens WHERE id = $1::text AND secret_sha256 = $4::bytea
), ",
    revoke_tokens!(
        "presented",
        "($5::boolean OR p.client_id IS NOT DISTINCT FROM $6::text)",
        "named"
    ),
    "
SELECT (SELECT count(*) FROM presented) AS found,
       (SELECT count(*) FROM presented p
        WHERE $5::boolean OR p.client_id IS NOT DISTINCT FROM $6::text) AS allowed,
       (SELECT count(*) FROM revoked) + (SELECT n FROM earlier) AS revoked"
);

/// Revokes a token by id (a refresh token with its family): `$1` id, `$2` now, `$3` nonce.
pub(super) const REVOKE_TOKEN: &str = concat!(
    "WITH target AS (SELECT id, kind, family_id FROM tokens WHERE id = $1::text), ",
    revoke_tokens!("target", "TRUE", "target"),
    "
SELECT (SELECT count(*) FROM revoked) + (SELECT n FROM earlier)"
);

/// Revokes a family: `$1` family, `$2` now, `$3` nonce.
pub(super) const REVOKE_FAMILY: &str = concat!(
    "WITH target AS (
    SELECT id, 'refresh' AS kind, family_id FROM tokens WHERE family_id = $1::text LIMIT 1
), ",
    revoke_tokens!("target", "TRUE", "target"),
    "
SELECT (SELECT count(*) FROM revoked) + (SELECT n FROM earlier)"
);

/// Revokes the account that `target` names (a query for its `id`) as a not-before watermark
/// and counts the tokens it turned inactive; `$2` now. Answers one row: the count and the
/// account's id (NULL, with a count of 0, when no account matches). `greatest`: the watermark
/// never moves back. (A retry after an ambiguous commit counts 0: the watermark left nothing
/// active to count, and stamping every token of the account with the nonce would cost the
/// write this statement avoids.)
macro_rules! revoke_account {
    ($target:literal) => {
        concat!(
            "WITH target AS (",
            $target,
            "), counted AS (
    SELECT count(*) AS n FROM tokens t JOIN accounts a ON a.id = t.account_id
    WHERE t.account_id = (SELECT id FROM target) AND ",
            active!("t", "a", "$2::bigint"),
            "
), moved AS (
    UPDATE accounts SET not_before = greatest(not_before, $2::bigint)
    WHERE id = (SELECT id FROM target)
    RETURNING 1
)
SELECT n, (SELECT id FROM target) FROM counted"
        )
    };
}

/// Revokes an account by id: `$1` account, `$2` now; see `revoke_account!`.
pub(super) const REVOKE_ACCOUNT: &str =
    revoke_account!("SELECT id FROM accounts WHERE id = $1::text");

/// Finds the account of an email and revokes it, in one round trip: `$1` email, `$2` now; see
/// `revoke_account!`.
pub(super) const REVOKE_EMAIL: &str =
    revoke_account!("SELECT id FROM accounts WHERE email = $1::text");

/// The account of an email: `$1` email.
pub(super) const ACCOUNT_BY_EMAIL: &str = "SELECT id FROM accounts WHERE email = $1::text";

/// One page of an account's tokens, newest first: `$1` account, `$2`/`$3` the cursor's
/// (issued_at, id), `$4` limit, `$5` include inactive, `$6` now.
pub(super) const LIST_TOKENS: &str = concat!(
    "SELECT ",
    token_columns!(),
    " FROM tokens t JOIN accounts a ON a.id = t.account_id
WHERE t.account_id = $1::text AND (t.issued_at, t.id) < ($2::bigint, $3::text)
  AND ($5::boolean OR (",
    active!("t", "a", "$6::bigint"),
    "))
ORDER BY t.issued_at DESC, t.id DESC LIMIT $4::bigint"
);
