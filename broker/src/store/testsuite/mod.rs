//! The store conformance suite: the behaviours every [`TokenStore`] backend must show.
//!
//! A backend's tests implement [`StoreHarness`] (open a fresh, empty store on a given clock) and
//! call [`store_test_suite`]. Each case opens its own store and moves time only through the
//! [`ManualClock`], so expiry and grace windows are tested without sleeping. The suite talks to
//! the store through the trait alone, so the Fauna store runs it against its test double just as
//! the embedded store runs it against SQLite files.
//!
//! The cases follow `docs/design.md` "Cognito › Introspection and revocation (RFC 7662,
//! RFC 7009)": anything but an active token introspects as inactive (RFC 7662), revocation is
//! idempotent and a refresh token takes its family with it (RFC 7009), rotation allows one
//! retry of the immediate predecessor within a grace window and treats any other reuse as
//! theft, concurrent requests never fork a family, and revoking an account is a not-before
//! watermark.

use std::{
    any::Any,
    collections::{BTreeMap, HashSet},
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use tokio::task::{JoinError, JoinSet};

use super::{StoreErrorKind, StoreResult, TokenStore};
use crate::{
    model::clock::{Clock, ManualClock},
    model::{
        AccountId, ClientCheck, Email, FamilyId, Metadata, MintedPair, NewSession, PageRequest,
        RefreshOutcome, RevokeTarget, Rotation, SecretRevocation, TokenId, TokenInfo, TokenKind,
        TokenPage, TokenRecord, TokenState, UnixMicros, random_hex,
    },
};

/// Opens a fresh, empty store whose notion of "now" is the given clock.
#[async_trait]
pub trait StoreHarness: Send + Sync {
    /// Returns a new store with no accounts and no tokens, reading the time from `clock`.
    async fn open(&self, clock: Arc<ManualClock>) -> Arc<dyn TokenStore>;

    /// Whether revoked and expired tokens stay listable (as `Revoked` and `Expired`). A store
    /// that deletes them — Fauna deletes revoked token documents and hides expired ones — says
    /// no, and the suite then expects them to be absent from listings instead. Every other
    /// behaviour is the same.
    fn lists_inactive_tokens(&self) -> bool {
        true
    }
}

/// Runs every conformance case against fresh stores from `harness`.
///
/// Every case runs to the end, even after another one failed, so one run reports every broken
/// behaviour.
///
/// # Panics
///
/// Panics after the last case if any case failed (an assertion, an unexpected store error, or no
/// answer within a minute), naming each failed case with its message.
pub async fn store_test_suite(harness: &dyn StoreHarness) {
    let cases = cases();
    let total = cases.len();
    let mut failures = Vec::new();
    for (name, case) in cases {
        let clock = Arc::new(ManualClock::new());
        let store = harness.open(Arc::clone(&clock)).await;
        let lists_inactive = harness.lists_inactive_tokens();
        // A task of its own turns a failed assertion into a JoinError we can name, instead of
        // unwinding through the whole suite.
        let task = tokio::spawn(case(Ctx {
            store,
            clock,
            lists_inactive,
        }));
        let abort = task.abort_handle();
        match tokio::time::timeout(CASE_TIMEOUT, task).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                // Indent the message's own lines (assertion left/right) under the case name.
                let message = describe(err).replace('\n', "\n      ");
                failures.push(format!("{name}: {message}"));
            }
            Err(_) => {
                abort.abort();
                failures.push(format!("{name}: no result within {CASE_TIMEOUT:?}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "store conformance suite: {} of {total} cases failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

/// A deadlock guard, not a speed assertion: every case takes milliseconds.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);
/// The app client every session is issued for unless a case says otherwise.
const CLIENT: &str = "app-1";
/// Another app client.
const OTHER_CLIENT: &str = "app-2";
/// Default lifetimes, as the broker's defaults.
const ACCESS_TTL: Duration = Duration::from_secs(600);
const REFRESH_TTL: Duration = Duration::from_secs(3600);
/// The session lifetime: three refresh lifetimes, so a few rotations reach its end.
const SESSION_TTL: Duration = Duration::from_secs(3 * 3600);
/// The grace window most rotation cases use.
const GRACE: Duration = Duration::from_secs(10);
/// How far a store's write time may run ahead of its clock (the embedded store stamps writes
/// with strictly increasing microseconds, so a stopped clock is passed by a few of them).
const STAMP_SLACK: Duration = Duration::from_secs(1);

type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type Case = fn(Ctx) -> CaseFuture;

/// Lists the cases as (name, function); the name is the function's name.
macro_rules! cases {
    ($($case:ident),* $(,)?) => {
        vec![$((stringify!($case), (|ctx: Ctx| -> CaseFuture { Box::pin($case(ctx)) }) as Case)),*]
    };
}

mod concurrency;
mod helpers;
mod introspect;
mod issue;
mod listing;
mod refresh;
mod reuse;
mod revoke;
mod shutdown;

use helpers::*;

fn cases() -> Vec<(&'static str, Case)> {
    [
        issue::cases(),
        introspect::cases(),
        refresh::cases(),
        reuse::cases(),
        concurrency::cases(),
        revoke::cases(),
        listing::cases(),
        shutdown::cases(),
    ]
    .concat()
}
