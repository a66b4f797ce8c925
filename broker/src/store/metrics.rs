//! The store layer's metrics: `tokenbroker_store_*`, the account cache's lookups and the Fauna
//! client's requests and retries.

use std::time::Duration;

use super::StoreErrorKind;
use crate::obs::metrics::{
    CacheResult, Counter, Family, Gauge, Histogram, Label, MetricSet, Zeros,
};

crate::label! {
    /// A [`super::TokenStore`] operation, as the `operation` label.
    pub enum Operation: "operation" {
        Issue = "issue",
        Refresh = "refresh",
        Introspect = "introspect",
        RevokeSecret = "revoke_secret",
        Revoke = "revoke",
        AccountByEmail = "account_by_email",
        ListTokens = "list_tokens",
    }
}

impl Operation {
    /// Returns the operation's name, as in the `operation` label.
    pub fn name(self) -> &'static str {
        Self::VALUES[self.index()]
    }

    /// Returns the name of the operation's span.
    pub fn span_name(self) -> &'static str {
        match self {
            Self::Issue => "store.issue",
            Self::Refresh => "store.refresh",
            Self::Introspect => "store.introspect",
            Self::RevokeSecret => "store.revoke_secret",
            Self::Revoke => "store.revoke",
            Self::AccountByEmail => "store.account_by_email",
            Self::ListTokens => "store.list_tokens",
        }
    }
}

impl Label for StoreErrorKind {
    const NAME: &'static str = "kind";
    const VALUES: &'static [&'static str] = &["unavailable", "timeout", "internal"];
    fn index(self) -> usize {
        match self {
            Self::Unavailable => 0,
            Self::Timeout => 1,
            Self::Internal => 2,
        }
    }
}

crate::label! {
    /// A Fauna query, as the `query` label.
    pub enum FaunaQuery: "query" {
        IssueByEmail = "issue_by_email",
        IssueForAccount = "issue_for_account",
        Rotate = "rotate",
        Introspect = "introspect",
        RevokeSecret = "revoke_secret",
        RevokeToken = "revoke_token",
        RevokeFamily = "revoke_family",
        RevokeAccount = "revoke_account",
        AccountByEmail = "account_by_email",
        ListTokens = "list_tokens",
        PublishPolicy = "publish_policy",
        RevokeEmail = "revoke_email",
        IssueOnceByEmail = "issue_once_by_email",
        IssueOnceForAccount = "issue_once_for_account",
        SealReplay = "seal_replay",
        ReplayState = "replay_state",
        SealSuccessor = "seal_successor",
        SuccessorState = "successor_state",
    }
}

crate::label! {
    /// How a Fauna HTTP request ended, as the `class` label.
    pub enum FaunaClass: "class" {
        Ok = "ok",
        Unauthorized = "unauthorized",
        QueryError = "query_error",
        Malformed = "malformed",
        Refused = "refused",
        Contended = "contended",
        Throttled = "throttled",
        Transient = "transient",
    }
}

crate::label! {
    /// A retried Fauna failure, as the `class` label of the retry counter.
    pub enum RetryClass: "class" {
        Contended = "contended",
        Throttled = "throttled",
        Transient = "transient",
    }
}

/// Every metric of the store layer.
#[derive(Debug)]
pub struct StoreMetrics {
    /// `tokenbroker_store_operation_duration_seconds{operation}`.
    pub duration: Family<Histogram, Operation>,
    /// `tokenbroker_store_errors_total{operation,kind}`.
    pub errors: Family<Counter, (Operation, StoreErrorKind)>,
    /// `tokenbroker_fauna_requests_total{query,class}`.
    pub fauna_requests: Family<Counter, (FaunaQuery, FaunaClass)>,
    /// `tokenbroker_fauna_retries_total{class}`.
    pub fauna_retries: Family<Counter, RetryClass>,
    /// `tokenbroker_account_cache_lookups_total{result}`.
    pub account_cache: Family<Counter, CacheResult>,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        Self {
            duration: Family::new(
                "tokenbroker_store_operation_duration_seconds",
                "Time of a token store operation (after the account cache), by operation.",
                Zeros::Show,
            ),
            errors: Family::new(
                "tokenbroker_store_errors_total",
                "Token store operations that failed, by operation and error kind.",
                Zeros::Hide,
            ),
            fauna_requests: Family::new(
                "tokenbroker_fauna_requests_total",
                "HTTP requests sent to Fauna (retries included), by query and response class.",
                Zeros::Hide,
            ),
            fauna_retries: Family::new(
                "tokenbroker_fauna_retries_total",
                "Fauna requests retried after a retryable failure, by failure class.",
                Zeros::Show,
            ),
            account_cache: Family::new(
                "tokenbroker_account_cache_lookups_total",
                "Email to account lookups in the in-memory account cache, by result.",
                Zeros::Show,
            ),
        }
    }
}

impl StoreMetrics {
    /// Records an operation's duration, and its error kind when it failed.
    pub fn operation(
        &self,
        operation: Operation,
        elapsed: Duration,
        error: Option<StoreErrorKind>,
    ) {
        self.duration.get(operation).observe(elapsed);
        if let Some(kind) = error {
            self.errors.get((operation, kind)).inc();
        }
    }
}

impl MetricSet for StoreMetrics {
    fn render(&self, out: &mut String) {
        self.duration.render(out);
        self.errors.render(out);
        self.fauna_requests.render(out);
        self.fauna_retries.render(out);
        self.account_cache.render(out);
    }
}

/// The embedded store's write queue, between the callers and the writer thread.
#[derive(Debug)]
pub struct WriterQueueMetrics {
    /// `tokenbroker_store_writer_queue_length`: writes (and a close) waiting for the writer.
    pub length: Family<Gauge, ()>,
    /// `tokenbroker_store_writes_refused_total`: writes refused because the queue was full.
    pub refused: Family<Counter, ()>,
    /// `tokenbroker_store_writes_abandoned_total`: writes dropped unrun because their caller
    /// had given up by the time the writer reached them.
    pub abandoned: Family<Counter, ()>,
}

impl Default for WriterQueueMetrics {
    fn default() -> Self {
        Self {
            length: Family::new(
                "tokenbroker_store_writer_queue_length",
                "Writes waiting for the embedded store's writer thread.",
                Zeros::Show,
            ),
            refused: Family::new(
                "tokenbroker_store_writes_refused_total",
                "Writes the embedded store refused because its write queue was full.",
                Zeros::Show,
            ),
            abandoned: Family::new(
                "tokenbroker_store_writes_abandoned_total",
                "Writes dropped unrun because their caller had given up before the writer reached them.",
                Zeros::Show,
            ),
        }
    }
}

impl MetricSet for WriterQueueMetrics {
    fn render(&self, out: &mut String) {
        self.length.render(out);
        self.refused.render(out);
        self.abandoned.render(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fauna_query_labels_name_the_queries_in_their_order() {
        let names: Vec<&str> = crate::store::fauna::queries::ALL
            .iter()
            .map(|(name, _)| *name)
            .collect();
        assert_eq!(FaunaQuery::VALUES, names.as_slice());
    }
}
