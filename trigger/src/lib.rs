//! The Cognito Pre Token Generation trigger: a thin Lambda in front of the broker.
//!
//! Cognito calls it before it issues its own tokens, on every sign-in and every token refresh.
//! [`handle`] reads the user from the event, asks the broker for a token pair (`IssueTokens`,
//! with an idempotency key derived from the event and a deadline well inside Cognito's 5 s) and
//! answers with the event whose `response` adds the access secret (and, only if configured, the
//! refresh secret) as claims, removes `email` from the ID token, and keeps the user's groups.
//!
//! The handler is a plain async function over the event, the [`Config`] and a [`Deps`] (the
//! broker call), so tests run it with a fake broker and `main` only wires the real one.
//!
//! # What a sign-in gets
//!
//! | event | reply |
//! | --- | --- |
//! | a user sign-in or refresh (any known `triggerSource`) with a verified email | the Fauna claims |
//! | `TokenGeneration_ClientCredentials` (V3, no user) | the event unchanged |
//! | an unknown `triggerSource` | logged; the Fauna claims if it carries an email, else unchanged |
//! | an unverified email (with `REQUIRE_VERIFIED_EMAIL`, the default) | the event unchanged, logged |
//! | broker down, slow or refusing; a sign-in without an email | `fail_closed`: a user-safe error; `fail_open`: the event unchanged, logged |
//!
//! # The idempotency key
//!
//! Cognito retries a trigger that fails or takes longer than 5 s, up to 3 attempts, so one
//! sign-in can reach the broker three times; the broker must hand out one pair, not three (the
//! first attempt may have minted a pair whose answer Cognito never saw). Cognito's event has no
//! sign-in id, and each attempt is a separate Lambda invocation with its own request id and
//! X-Ray trace, so nothing per-attempt may go into the key. The key is therefore a SHA-256 over
//! everything in the event that is the same across the attempts of one sign-in:
//! `(userPoolId, sub (or userName), callerContext.clientId, triggerSource)`, plus the request's
//! `clientMetadata` and `scopes`. The broker adds the caller and the email, and remembers a key
//! for its idempotency window (30 s by default, which covers three 5 s attempts).
//!
//! What separates two sign-ins is then time (the window) and anything the app varies: an app
//! that passes a per-sign-in nonce in `ClientMetadata` (which reaches this trigger from the
//! `RespondToAuthChallenge` family of APIs) gets a pair per sign-in however close together.
//! Without one, two sign-ins of the same user in the same app client by the same flow within
//! the window share a pair (and so a refresh-token family): indistinguishable from a retry by
//! anything Cognito sends. We rejected a wall-clock bucket in the key: the attempts of one
//! sign-in straddle a bucket edge often enough to mint extra pairs, and two sign-ins in one
//! bucket still collide, so it buys nothing the window does not.

pub mod config;
pub mod error;
pub mod event;
pub mod trace;

use std::{
    future::Future,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lambda_runtime::{Context, LambdaEvent};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use tokenbroker_client::{CallOptions, Client, ClientResult, TokenPair, pb};
use tracing::{debug, error, info, warn};

use crate::event::{ClaimsAndScopeOverrideDetails, ClaimsOverrideDetails, TokenGeneration};
pub use crate::{
    config::{ClaimName, ClaimTokens, Config, FailurePolicy},
    error::{TriggerError, TriggerErrorKind},
    event::{PreTokenGenEvent, Reply, ReplyShape, TriggerSource},
};

/// The broker accepts at most this many groups per call; more are left out of the call (they
/// stay in the tokens: the reply copies the event's group configuration whole).
const MAX_GROUPS: usize = 32;
/// The broker's limit on a group name, in bytes.
const MAX_GROUP_LEN: usize = 128;
/// Below this there is no point calling the broker at all.
const MIN_BUDGET: Duration = Duration::from_millis(10);
/// Lambda's longest function timeout: a deadline further than this from now is not a real one.
const MAX_LAMBDA_TIMEOUT: Duration = Duration::from_secs(900);
/// Names the key derivation, so a later change cannot replay pairs minted under the old one.
const KEY_VERSION: &str = "tokenbroker-trigger/idempotency/v1";

/// How one broker call is to be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallContext {
    /// The call's deadline.
    pub timeout: Duration,
    /// The W3C `traceparent` to send, when the invocation has a trace.
    pub traceparent: Option<String>,
}

/// What the handler needs from the outside world: the broker's IssueTokens.
pub trait Deps: Send + Sync {
    /// Calls IssueTokens with `call`'s deadline and trace context.
    fn issue_tokens(
        &self,
        request: pb::IssueTokensRequest,
        call: CallContext,
    ) -> impl Future<Output = ClientResult<TokenPair>> + Send;
}

impl Deps for Client {
    async fn issue_tokens(
        &self,
        request: pb::IssueTokensRequest,
        call: CallContext,
    ) -> ClientResult<TokenPair> {
        let mut options = CallOptions::new().with_timeout(call.timeout);
        if let Some(traceparent) = &call.traceparent {
            options = options.with_metadata("traceparent", traceparent)?;
        }
        self.issue_tokens_with(request, &options).await
    }
}

/// Handles one Pre Token Generation invocation: returns the event with its `response` set, the
/// event unchanged (nothing to add, or `fail_open`), or an error for Cognito (`fail_closed`).
///
/// # Errors
///
/// With [`FailurePolicy::FailClosed`]: the broker cannot be reached or does not answer in time
/// (`Unavailable`, `Timeout`), refuses the call (`Rejected`), or a user sign-in carries no
/// email or is not a JSON object (`InvalidEvent`). The error's Lambda message is user-safe; the
/// detail is logged here.
pub async fn handle<D: Deps>(
    event: LambdaEvent<Value>,
    config: &Config,
    deps: &D,
) -> Result<Value, TriggerError> {
    let (mut payload, context) = event.into_parts();
    match enrich(&payload, &context, config, deps, SystemTime::now()).await {
        Ok(Some(reply)) => {
            let response = serde_json::to_value(&reply).map_err(|err| {
                TriggerError::new(
                    TriggerErrorKind::Internal,
                    format!("cannot encode the reply: {err}"),
                )
            })?;
            if let Some(event) = payload.as_object_mut() {
                event.insert("response".to_owned(), response);
            }
            Ok(payload)
        }
        Ok(None) => Ok(payload),
        Err(err) => match config.failure_policy {
            FailurePolicy::FailClosed => {
                error!(
                    error = %err,
                    error_type = err.kind().error_type(),
                    policy = config.failure_policy.as_str(),
                    "sign-in refused without fauna claims"
                );
                Err(err)
            }
            FailurePolicy::FailOpen => {
                warn!(
                    error = %err,
                    error_type = err.kind().error_type(),
                    policy = config.failure_policy.as_str(),
                    "sign-in continues without fauna claims"
                );
                Ok(payload)
            }
        },
    }
}

/// Works out the reply, or `None` for "leave the event as it is".
async fn enrich<D: Deps>(
    payload: &Value,
    context: &Context,
    config: &Config,
    deps: &D,
    now: SystemTime,
) -> Result<Option<Reply>, TriggerError> {
    if !payload.is_object() {
        return Err(TriggerError::new(
            TriggerErrorKind::InvalidEvent,
            "the event is not a JSON object",
        ));
    }
    let event = PreTokenGenEvent::deserialize(payload).map_err(|err| {
        TriggerError::new(
            TriggerErrorKind::InvalidEvent,
            format!("the event cannot be read: {err}"),
        )
    })?;
    let source = event.trigger_source.as_str();
    let client_id = event.caller_context.client_id.as_str();
    if event.trigger_source == TriggerSource::ClientCredentials {
        debug!(
            trigger_source = source,
            client_id, "client credentials grant passed through"
        );
        return Ok(None);
    }
    if !event.trigger_source.is_known() {
        warn!(
            trigger_source = source,
            version = event.version.as_deref().unwrap_or(""),
            "unknown trigger source; handled by what the event holds"
        );
    }
    let Some(email) = event.email() else {
        if event.trigger_source.is_known() {
            return Err(TriggerError::new(
                TriggerErrorKind::InvalidEvent,
                format!("{source} event without an email attribute"),
            ));
        }
        info!(
            trigger_source = source,
            "event without a user passed through"
        );
        return Ok(None);
    };
    if config.require_verified_email && !event.email_verified() {
        warn!(
            trigger_source = source,
            client_id, "email not verified; sign-in continues without fauna claims"
        );
        return Ok(None);
    }
    let shape = event.reply_shape();
    let budget = broker_budget(context.deadline, now, config)?;
    let call = CallContext {
        timeout: budget,
        traceparent: context
            .xray_trace_id
            .as_deref()
            .and_then(trace::traceparent_from_xray),
    };
    let started = Instant::now();
    let pair = match tokio::time::timeout(
        budget,
        deps.issue_tokens(issue_request(&event, email), call),
    )
    .await
    {
        Ok(pair) => pair?,
        Err(_) => {
            return Err(TriggerError::new(
                TriggerErrorKind::Timeout,
                format!("no answer from the broker within {} ms", budget.as_millis()),
            ));
        }
    };
    info!(
        trigger_source = source,
        client_id,
        account_id = %pair.account_id,
        family_id = %pair.family_id,
        access_token_id = %pair.access.token_id,
        replayed = pair.replayed,
        broker_ms = started.elapsed().as_millis() as u64,
        "fauna claims added"
    );
    Ok(Some(reply(shape, &event, &pair, config)))
}

/// Returns the broker call's deadline: the configured timeout, capped by what is left of the
/// Lambda's deadline (epoch milliseconds) less the margin kept for answering Cognito.
///
/// A deadline of `0` (`Context::default()`) or one further than Lambda's longest timeout (15
/// minutes) from now is not a real deadline and is ignored: `cargo lambda watch` sends a
/// constant `600000`, ten minutes after 1970.
///
/// # Errors
///
/// `Timeout` when less than a few milliseconds are left.
pub fn broker_budget(
    deadline_ms: u64,
    now: SystemTime,
    config: &Config,
) -> Result<Duration, TriggerError> {
    let mut budget = config.timeout;
    let deadline = UNIX_EPOCH + Duration::from_millis(deadline_ms);
    let plausible = match deadline.duration_since(now) {
        Ok(ahead) => ahead <= MAX_LAMBDA_TIMEOUT,
        Err(behind) => behind.duration() <= MAX_LAMBDA_TIMEOUT,
    };
    if plausible {
        let left = deadline
            .duration_since(now)
            .unwrap_or_default()
            .saturating_sub(config.deadline_margin);
        budget = budget.min(left);
    } else {
        debug!(deadline_ms, "implausible lambda deadline ignored");
    }
    if budget < MIN_BUDGET {
        return Err(TriggerError::new(
            TriggerErrorKind::Timeout,
            "no time left before the Lambda deadline to call the broker",
        ));
    }
    Ok(budget)
}

/// Returns the idempotency key for an event: the same for Cognito's retries of one sign-in,
/// different across pools, users, app clients, trigger sources, client metadata and scopes (see
/// the crate docs for why nothing else goes in).
pub fn idempotency_key(event: &PreTokenGenEvent) -> String {
    let mut hasher = Sha256::new();
    let mut part = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    part(KEY_VERSION.as_bytes());
    part(event.user_pool_id.as_bytes());
    part(event.sub().unwrap_or(&event.user_name).as_bytes());
    part(event.caller_context.client_id.as_bytes());
    part(event.trigger_source.as_str().as_bytes());
    // BTreeMap: sorted, so the order Cognito happened to send does not matter.
    part(&(event.request.client_metadata.len() as u64).to_be_bytes());
    for (key, value) in &event.request.client_metadata {
        part(key.as_bytes());
        part(value.to_string().as_bytes());
    }
    let mut scopes: Vec<&str> = event.request.scopes.iter().map(String::as_str).collect();
    scopes.sort_unstable();
    part(&(scopes.len() as u64).to_be_bytes());
    for scope in scopes {
        part(scope.as_bytes());
    }
    format!("cognito-{}", hex::encode(hasher.finalize()))
}

/// Builds the IssueTokens request for the event's user.
fn issue_request(event: &PreTokenGenEvent, email: &str) -> pb::IssueTokensRequest {
    let groups = event
        .groups()
        .filter(|group| !group.is_empty() && group.len() <= MAX_GROUP_LEN)
        .take(MAX_GROUPS)
        .map(str::to_owned)
        .collect();
    pb::IssueTokensRequest {
        subject: Some(pb::issue_tokens_request::Subject::Claims(
            pb::AssertedClaims {
                email: email.trim().to_owned(),
                cognito_sub: event.sub().unwrap_or_default().to_owned(),
                user_pool_id: event.user_pool_id.clone(),
                client_id: event.caller_context.client_id.clone(),
                groups,
            },
        )),
        idempotency_key: idempotency_key(event),
        ..Default::default()
    }
}

/// Builds the reply: the Fauna claims where configured, `email` suppressed in the ID token if
/// configured, and the request's group configuration copied (never an empty override, which
/// would remove the user's groups).
fn reply(shape: ReplyShape, event: &PreTokenGenEvent, pair: &TokenPair, config: &Config) -> Reply {
    let mut claims = Map::new();
    claims.insert(
        config.access_claim.as_str().to_owned(),
        Value::String(pair.access.secret.expose_secret().to_owned()),
    );
    if let Some(name) = &config.refresh_claim {
        claims.insert(
            name.as_str().to_owned(),
            Value::String(pair.refresh.secret.expose_secret().to_owned()),
        );
    }
    let suppress = if config.suppress_email {
        vec!["email".to_owned()]
    } else {
        Vec::new()
    };
    let groups = event
        .request
        .group_configuration
        .clone()
        .filter(Value::is_object);
    match shape {
        ReplyShape::V1 => Reply::V1(ClaimsOverrideDetails {
            id_token: TokenGeneration {
                claims_to_add_or_override: claims,
                claims_to_suppress: suppress,
            },
            group_override_details: groups,
        }),
        ReplyShape::V2 => {
            let tokens = config.claim_tokens;
            let (id_claims, access_claims) = match (tokens.id, tokens.access) {
                (true, true) => (claims.clone(), claims),
                (true, false) => (claims, Map::new()),
                (false, _) => (Map::new(), claims),
            };
            Reply::V2(ClaimsAndScopeOverrideDetails {
                id_token_generation: TokenGeneration {
                    claims_to_add_or_override: id_claims,
                    claims_to_suppress: suppress,
                },
                access_token_generation: TokenGeneration {
                    claims_to_add_or_override: access_claims,
                    claims_to_suppress: Vec::new(),
                },
                group_override_details: groups,
            })
        }
    }
}

#[cfg(test)]
mod tests;
