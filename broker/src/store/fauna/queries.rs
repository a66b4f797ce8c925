//! The fixed FQL v10 texts the Fauna store sends, one per operation.
//!
//! Every value a client supplies travels in `arguments` (tagged format), never in the text, so
//! no request can change what a query does. The texts are constants: the Fauna test double in
//! `tests/` recognises each by its SHA-256 and answers `invalid_query` for anything else, so a
//! change here fails the tests until the double learns the new text.
//!
//! Token documents carry the broker's bookkeeping in `data`:
//! `kind` (`"access"` | `"refresh"`), `family`, `parent` (an access token's refresh token id),
//! `email`, `cognito_sub` (the account's), `client_id`, `issued_at` (Time), `session_ends`
//! (Time: no token of the family outlives it), `metadata` (object), and, once rotated,
//! `replaced_by` (the successor's id) and `rotated_at` (Time); a refresh token that a retry of
//! its predecessor displaced is kept with `superseded: true`, so that presenting it again is
//! reuse. Revocation deletes token documents; Fauna itself
//! stops accepting a secret once its document is deleted or its `ttl` has passed, and expired
//! documents disappear from reads.
//!
//! **Type checking is off for these texts, on purpose.** A database created from the typed
//! schema in `deploy/fauna/schema.fsl` type checks every query before running it, unless the
//! request sends `X-Typecheck: false`, which the store does with every query. No FaunaDB runs
//! where the broker is tested, so whether the v10 checker accepts a text cannot be shown before
//! production, and a refused text would fail every call of its RPC. Some would likely be
//! refused: `"fam_" + account.id` adds an ID to a String, `Token.byDocument(account)` takes an
//! account that `Account.byId` may return as null, and `token.data.kind` reads through a
//! nullable `data`. With the checker off the same mistakes are runtime errors
//! (`invalid_null_access`, `type_mismatch`) where they happen, and every text tests its nulls
//! before reading through them. The two function calls ([`ROTATE`], [`REVOKE_SECRET`]) are
//! plain calls with arguments, which the checker accepts, so a token holder calling them
//! directly passes it; their bodies in the schema write `token!` after each null check, as the
//! checker wants, and a typechecked database checks them when the schema is pushed. The Fauna
//! test double refuses every other text unless the request turns the checker off.
//!
//! Operations that present a secret run with that secret as the bearer, so Fauna authenticates
//! it (401 for an unknown, expired or deleted token). Rotation and revocation by secret need to
//! write other tokens of the family, which a token may not do itself, so they call the
//! user-defined functions `rotateRefreshToken` and `revokeCurrentToken` from
//! `deploy/fauna/schema.fsl`, which run with the `server` role; the roles there let refresh
//! tokens call both and access tokens call the second only.

/// The part of issuing after `account` is bound: mint a refresh token and its access token in
/// a new family, and answer with both secrets. A macro so the two issue texts share it and
/// stay literals.
///
/// The family's name holds the call's `nonce`, which a retry of the same call sends again: a
/// retry whose first attempt committed (its answer lost) finds that attempt's tokens, which
/// nobody received, and deletes them before minting, so a retried issue never leaves two live
/// pairs. Only a retry looks (`retried`): the look reads the index of the account's tokens,
/// which every sign-in of the account writes, so a first attempt that looked would conflict
/// with each concurrent sign-in of the same account and be run again by Fauna, or fail with
/// 409 once Fauna's retries run out.
macro_rules! mint_session {
    () => {
        concat!(mint_tokens!(), minted_answer!())
    };
}

/// The minting half of [`mint_session`]: binds `now`, `family`, `refresh` and `access`.
macro_rules! mint_tokens {
    () => {
        r#"
let now = Time.now()
let family = "fam_" + account.id + "_" + nonce
if (retried) Token.byDocument(account).where(.data.family == family).forEach(.delete())
let refresh = Token.create({
  document: account,
  ttl: now.add(refresh_ttl, "seconds"),
  data: { kind: "refresh", family: family, email: email, cognito_sub: account.cognito_sub, client_id: client_id, issued_at: now, session_ends: now.add(session_ttl, "seconds"), metadata: metadata }
})
let access = Token.create({
  document: account,
  ttl: now.add(access_ttl, "seconds"),
  data: { kind: "access", family: family, parent: refresh.id, email: email, cognito_sub: account.cognito_sub, client_id: client_id, issued_at: now, session_ends: now.add(session_ttl, "seconds"), metadata: metadata }
})"#
    };
}

/// The answer half of [`mint_session`]: the minted pair.
macro_rules! minted_answer {
    () => {
        r#"
{
  account: account.id,
  family: family,
  now: now,
  refresh: { id: refresh.id, secret: refresh.secret, ttl: refresh.ttl },
  access: { id: access.id, secret: access.secret, ttl: access.ttl }
}"#
    };
}

/// Gets or creates the account by email and mints a refresh and an access token (server key).
///
/// Arguments: `email` (string), `cognito_sub` (string or null), `client_id` (string or null),
/// `nonce` (string), `retried` (bool: an earlier request of this call may have committed),
/// `access_ttl`, `refresh_ttl`, `session_ttl` (int seconds), `metadata` (object).
/// Result: `{ account, family, now, refresh: { id, secret, ttl }, access: { id, secret, ttl } }`.
/// A concurrent first sign-in of the same email contends on the unique email; Fauna re-runs
/// the loser, which then finds the winner's account.
pub const ISSUE_BY_EMAIL: &str = concat!(
    "let account = Account.byEmail(email).first() ?? Account.create({ email: email, cognito_sub: cognito_sub })",
    mint_session!()
);

/// Like [`ISSUE_BY_EMAIL`] for an account the broker already knows (server key).
///
/// Arguments: as [`ISSUE_BY_EMAIL`] plus `account_id` (string). Result: the same.
pub const ISSUE_FOR_ACCOUNT: &str =
    concat!("let account = Account.byId(account_id)!", mint_session!());

/// The idempotency claim around an issue text, for a replay shared by replicas: `claim!(<the
/// account's binding>)`. A live `Replay` document of the row (another call's, within its
/// window) is answered as it is, `{ claim: { account, family, sealed } }` (`sealed` is null
/// until that call has sealed its pair, [`SEAL_REPLAY`]), and nothing is written. Otherwise the
/// row's old document (past its window, or this very call's own earlier attempt, by `nonce`,
/// whose answer was lost) is deleted, the pair is minted as the issue texts do, and a new
/// `Replay` document without a pair claims the row until `window` seconds from now (its ttl, so
/// Fauna deletes it then). Two calls claiming one row at once contend on the unique `row`:
/// Fauna runs the loser again, and it finds the winner's claim.
macro_rules! claim {
    ($account:expr) => {
        concat!(
            r#"let claim = Replay.byRow(row).first()
if (claim != null && claim!.expires_at > Time.now() && claim!.nonce != nonce) {
  { claim: { account: claim!.account, family: claim!.family, sealed: claim!.sealed } }
} else {
  if (claim != null) claim!.delete()
"#,
            $account,
            mint_tokens!(),
            r#"
Replay.create({ row: row, nonce: nonce, account: account.id, family: family, expires_at: now.add(window, "seconds"), ttl: now.add(window, "seconds") })"#,
            minted_answer!(),
            "\n}"
        )
    };
}

/// [`ISSUE_BY_EMAIL`] under an idempotency claim (`claim`; server key).
///
/// Arguments: as [`ISSUE_BY_EMAIL`] plus `row` (string: the idempotency digest, hex) and
/// `window` (int seconds). Result: as [`ISSUE_BY_EMAIL`], or `{ claim: { account, family,
/// sealed } }`.
pub const ISSUE_ONCE_BY_EMAIL: &str = claim!(
    "let account = Account.byEmail(email).first() ?? Account.create({ email: email, cognito_sub: cognito_sub })"
);

/// [`ISSUE_FOR_ACCOUNT`] under an idempotency claim (`claim`; server key).
///
/// Arguments: as [`ISSUE_ONCE_BY_EMAIL`] plus `account_id`. Result: the same.
pub const ISSUE_ONCE_FOR_ACCOUNT: &str = claim!("let account = Account.byId(account_id)!");

/// Stores the sealed pair of a claim that this call made (`claim`; server key): the second
/// request of an idempotent issue, since Fauna mints the secrets inside the first and a query
/// cannot encrypt.
///
/// Arguments: `row`, `nonce` (the call's), `sealed` (`{ key_id, nonce, ciphertext }`, hex
/// strings, and `refresh_id`, `access_id`, the token ids the ciphertext is bound to). Result:
/// `true`, or `false` when the row is no longer this call's claim (its window closed).
pub const SEAL_REPLAY: &str = r#"let claim = Replay.byRow(row).first()
if (claim == null || claim!.nonce != nonce) {
  false
} else {
  claim!.update({ sealed: sealed })
  true
}"#;

/// The live claim of a row, for a call that found another call's claim still without its
/// pair (server key). Arguments: `row`. Result: `{ account, family, sealed }`, or null when no
/// claim of the row is within its window.
pub const REPLAY_STATE: &str = r#"let claim = Replay.byRow(row).first()
if (claim == null || claim!.expires_at <= Time.now()) {
  null
} else {
  { account: claim!.account, family: claim!.family, sealed: claim!.sealed }
}"#;

/// Rotates the bearer refresh token (bearer: the refresh secret).
///
/// Arguments: `access_ttl`, `refresh_ttl`, `grace` (int seconds), `client_id` (string or null),
/// `any_client` (bool: skip the client check when no `client_id` is given), `session_ttl` (int
/// seconds: the session of a family stored without `session_ends`, counted from now), `attempt`
/// (string: the call's nonce, the same on each retry of the call), `coalesce` (bool: answer a
/// retry within the grace window with `{ outcome: "coalesce", account, family, rotated_at,
/// successor }`, writing nothing, instead of superseding). The function cuts the
/// lifetimes, the grace and `session_ttl` to the `BrokerPolicy` ([`PUBLISH_POLICY`]) and lets
/// `any_client` count only where the policy does. The new tokens' ttls end at `session_ends` at
/// the latest. A retry of an attempt that committed replaces that attempt's undelivered pair.
/// Result: `{ outcome: "rotated", account, family, now, refresh, access }` (as issuing),
/// `{ outcome: "inactive" }`, `{ outcome: "wrong_client" }`, or
/// `{ outcome: "reuse", family, revoked }` (the family was deleted; `revoked` counts the tokens
/// that were not consumed), or `{ outcome: "no_policy" }` (no policy was published).
pub const ROTATE: &str = "rotateRefreshToken(access_ttl, refresh_ttl, grace, client_id, any_client, session_ttl, attempt, coalesce)";

/// Stores the sealed successor of a rotation for the grace window (server key): the second
/// request of a rotation with a replay key, since Fauna mints the secrets inside [`ROTATE`].
///
/// Arguments: `row` (hex: the labelled digest of the consumed refresh secret), `successor` (the
/// new refresh token's id), `sealed` (as [`SEAL_REPLAY`]'s), `refresh_expires`,
/// `access_expires` (Time), `closes` (Time: the grace window's end, the document's ttl).
/// Result: `true`.
pub const SEAL_SUCCESSOR: &str = r#"let prior = Rotation.byRow(row).first()
let fields = { row: row, successor: successor, sealed: sealed, refresh_expires: refresh_expires, access_expires: access_expires, ttl: closes }
if (prior == null) Rotation.create(fields) else prior!.replace(fields)
true"#;

/// The sealed successor of a consumed refresh token, while that successor is the family's
/// current refresh token (server key): what a presentation that [`ROTATE`] answered with
/// `coalesce` answers.
///
/// Arguments: `row` (as [`SEAL_SUCCESSOR`]'s), `successor` (the id `coalesce` named). Result:
/// `{ sealed, refresh_expires, access_expires }`, or null when none is sealed for that
/// successor or it is no longer current.
pub const SUCCESSOR_STATE: &str = r#"let rotation = Rotation.byRow(row).first()
let current = if (rotation == null || rotation!.successor != successor) null else Token.byId(successor)
if (current == null || current!.data.replaced_by != null || current!.data.superseded == true) {
  null
} else {
  { sealed: rotation!.sealed, refresh_expires: rotation!.refresh_expires, access_expires: rotation!.access_expires }
}"#;

/// The bearer token's own document, read from the database (bearer: the secret), or null for a
/// key or a token whose document is gone.
///
/// `Query.token()` is the token as authentication found it, which a node may have taken from
/// its key cache (up to 60 s old, so a just-deleted token still authenticates there); the
/// `Token.byId` read is of the document itself. Sent with `X-Linearized: true`, so the read is
/// of the latest committed state, whichever node serves it: a token revoked before the call
/// began is never reported active.
pub const INTROSPECT: &str = r#"let caller = Query.token()
let token = if (caller == null) null else Token.byId(caller!.id)
if (token == null) null else token"#;

/// Revokes the bearer token; a refresh token takes its family with it (bearer: the secret).
///
/// Arguments: `client_id` (string or null), `any_client` (bool, as for [`ROTATE`]). Result:
/// `{ outcome: "revoked", revoked }`, `{ outcome: "inactive" }` or `{ outcome: "wrong_client" }`.
pub const REVOKE_SECRET: &str = "revokeCurrentToken(client_id, any_client)";

/// Revokes a token by id, a refresh token with its family (server key).
///
/// Arguments: `token_id` (string of digits). Result: the number of unconsumed tokens deleted.
pub const REVOKE_TOKEN: &str = r#"let token = Token.byId(token_id)
if (token == null) {
  0
} else if (token.data.kind == "refresh") {
  let family = Token.byDocument(token.document).where(.data.family == token.data.family)
  let revoked = family.where(t => t.data.replaced_by == null && t.data.superseded != true).count()
  family.forEach(.delete())
  revoked
} else {
  token.delete()
  1
}"#;

/// Revokes every token of a family (server key).
///
/// Arguments: `account_id` (the account the family id names), `family` (string).
/// Result: the number of unconsumed tokens deleted.
pub const REVOKE_FAMILY: &str = r#"let account = Account.byId(account_id)
if (account == null) {
  0
} else {
  let tokens = Token.byDocument(account).where(.data.family == family)
  let revoked = tokens.where(t => t.data.replaced_by == null && t.data.superseded != true).count()
  tokens.forEach(.delete())
  revoked
}"#;

/// Revokes every token of an account (server key).
///
/// Arguments: `account_id`. Result: the number of unconsumed tokens deleted.
pub const REVOKE_ACCOUNT: &str = r#"let account = Account.byId(account_id)
if (account == null) {
  0
} else {
  let tokens = Token.byDocument(account)
  let revoked = tokens.where(t => t.data.replaced_by == null && t.data.superseded != true).count()
  tokens.forEach(.delete())
  revoked
}"#;

/// Revokes every token of the account with an email (server key): the lookup and the revocation
/// in one request.
///
/// Arguments: `email`. Result: `{ account, revoked }` (the account's id and the number of
/// unconsumed tokens deleted), or null when no account has the email.
pub const REVOKE_EMAIL: &str = r#"let account = Account.byEmail(email).first()
if (account == null) {
  null
} else {
  let tokens = Token.byDocument(account!)
  let revoked = tokens.where(t => t.data.replaced_by == null && t.data.superseded != true).count()
  tokens.forEach(.delete())
  { account: account!.id, revoked: revoked }
}"#;

/// Writes the broker's limits into the `BrokerPolicy` document that `rotateRefreshToken` and
/// `revokeCurrentToken` read (server key; the broker sends it once at start).
///
/// Arguments: `access_ttl`, `refresh_ttl`, `grace`, `session_ttl` (int seconds), `any_client`
/// (bool: whether a caller may skip the client check). Result: `true`.
pub const PUBLISH_POLICY: &str = r#"let current = BrokerPolicy.byId("1")
if (current == null) {
  BrokerPolicy.create({ id: "1", access_ttl: access_ttl, refresh_ttl: refresh_ttl, grace: grace, session_ttl: session_ttl, any_client: any_client })
} else {
  current!.replace({ access_ttl: access_ttl, refresh_ttl: refresh_ttl, grace: grace, session_ttl: session_ttl, any_client: any_client })
}
true"#;

/// The id of the account with an email, or null (server key). Arguments: `email`.
pub const ACCOUNT_BY_EMAIL: &str = "Account.byEmail(email).first()?.id";

/// One page of an account's token documents, newest first (server key).
///
/// Arguments: `account_id`, `after_issued_at` (Time), `after_id` (string; tokens with
/// `issued_at` before the first, or equal to it with a smaller id, are listed),
/// `include_consumed` (boolean), `limit` (int). Result: an array of token documents (empty for
/// an unknown account).
pub const LIST_TOKENS: &str = r#"let account = Account.byId(account_id)
if (account == null) {
  []
} else {
  Token.byDocument(account)
    .where(t => t.data.issued_at < after_issued_at || (t.data.issued_at == after_issued_at && t.id < after_id))
    .where(t => t.data.superseded != true && (include_consumed || t.data.replaced_by == null))
    .order(desc(.data.issued_at), desc(.id))
    .take(limit)
    .toArray()
}"#;

/// Every query, by a name used in query tags, metrics and the test double.
pub const ALL: &[(&str, &str)] = &[
    ("issue_by_email", ISSUE_BY_EMAIL),
    ("issue_for_account", ISSUE_FOR_ACCOUNT),
    ("rotate", ROTATE),
    ("introspect", INTROSPECT),
    ("revoke_secret", REVOKE_SECRET),
    ("revoke_token", REVOKE_TOKEN),
    ("revoke_family", REVOKE_FAMILY),
    ("revoke_account", REVOKE_ACCOUNT),
    ("account_by_email", ACCOUNT_BY_EMAIL),
    ("list_tokens", LIST_TOKENS),
    ("publish_policy", PUBLISH_POLICY),
    ("revoke_email", REVOKE_EMAIL),
    ("issue_once_by_email", ISSUE_ONCE_BY_EMAIL),
    ("issue_once_for_account", ISSUE_ONCE_FOR_ACCOUNT),
    ("seal_replay", SEAL_REPLAY),
    ("replay_state", REPLAY_STATE),
    ("seal_successor", SEAL_SUCCESSOR),
    ("successor_state", SUCCESSOR_STATE),
];
