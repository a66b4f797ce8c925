//! Prometheus metrics: a fixed registry of atomic counters and histograms, rendered in the text
//! exposition format 0.0.4 by a separate HTTP listener ([`MetricsServer`]).
//!
//! Every series is allocated when the registry is built, one slot per combination of label
//! values, so recording is an index computation and one or two relaxed atomic additions: no
//! lock, no map, no allocation on the hot path (the broker serves tens of thousands of calls a
//! second on two cores). `prometheus-client` was the alternative; its label families sit
//! behind a lock and a hash map, and it brings its own encoder crates, for nothing this fixed
//! set of metrics needs.
//!
//! **Adding a metric**: add a field to [`Metrics`], build it in [`Metrics::new`] and list it in
//! `Metrics::families`. Label values are a fixed list of `&'static str` per label; the caller
//! passes their indices (an enum's discriminant, usually).

mod http;
mod rpc;

use std::{
    fmt::{self, Write as _},
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;

pub use http::MetricsServer;
pub(crate) use rpc::grpc_code;
pub use rpc::{MeteredService, RPC_METHODS};

use crate::store::StoreErrorKind;

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Address of the HTTP listener serving `GET /metrics`, such as `0.0.0.0:9464`; unset (the
    /// default) serves no metrics. Port 0 picks a free port.
    pub listen: Option<SocketAddr>,
}

/// Upper bounds (seconds) of the latency histograms' buckets; `+Inf` is implied.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// The same bounds in nanoseconds, for the comparison on the hot path.
const BUCKET_NANOS: [u64; 14] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// gRPC status code names, indexed by code number.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// [`crate::store::TokenStore`] operations, as the `operation` label.
pub const STORE_OPERATIONS: [&str; 7] = [
    "issue",
    "refresh",
    "introspect",
    "revoke_secret",
    "revoke",
    "account_by_email",
    "list_tokens",
];

/// Store error kinds, as the `kind` label.
pub const STORE_ERROR_KINDS: [&str; 3] = ["unavailable", "timeout", "internal"];

/// How a Fauna HTTP request ended, as the `class` label (`store/fauna/wire.rs` classes).
pub const FAUNA_CLASSES: [&str; 8] = [
    "ok",
    "unauthorized",
    "query_error",
    "malformed",
    "refused",
    "contended",
    "throttled",
    "transient",
];

/// The retried Fauna classes, as the `class` label of the retry counter.
pub const FAUNA_RETRY_CLASSES: [&str; 3] = ["contended", "throttled", "transient"];

/// Token kinds, as the `kind` label.
pub const TOKEN_KINDS: [&str; 2] = ["access", "refresh"];

/// Why tokens were revoked, as the `cause` label.
pub const REVOKE_CAUSES: [&str; 2] = ["request", "reuse"];

/// Why admission control refused a call, as the `reason` label: a caller's (or role's) rate
/// limit, the per-address limit of calls without a credential, or the in-flight limit.
pub const THROTTLE_REASONS: [&str; 3] = ["caller_rate", "anonymous_rate", "concurrency"];

/// `hit` or `miss`, as the `result` label of cache lookups.
pub const CACHE_RESULTS: [&str; 2] = ["hit", "miss"];

/// `ok` or `error`, as the `outcome` label.
pub const OUTCOMES: [&str; 2] = ["ok", "error"];

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Returns the count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A latency histogram over [`LATENCY_BUCKETS`]. Buckets are kept per interval and summed when
/// rendered, so an observation is two atomic additions.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per interval; the last is above the largest bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let index = BUCKET_NANOS.partition_point(|&bound| bound < nanos);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Returns how many durations were recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

/// One kind of series ([`Counter`], [`Histogram`]): how it renders.
pub trait Series: Default {
    /// The `# TYPE` of the family.
    const TYPE: &'static str;
    /// Whether nothing was recorded (such series of large families are not rendered).
    fn is_zero(&self) -> bool;
    /// Appends the series' sample lines; `labels` is `a="x",b="y"` or empty.
    fn render(&self, name: &str, labels: &str, out: &mut String);
}

impl Series for Counter {
    const TYPE: &'static str = "counter";
    fn is_zero(&self) -> bool {
        self.get() == 0
    }
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let _ = writeln!(out, "{name}{} {}", braces(labels), self.get());
    }
}

impl Series for Histogram {
    const TYPE: &'static str = "histogram";
    fn is_zero(&self) -> bool {
        self.count() == 0
    }
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

/// Whether a family renders series that recorded nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zeros {
    /// Render every series (small families: a rate over a missing series is no rate at all).
    Show,
    /// Render only series that recorded something (large label products).
    Hide,
}

/// A metric family with `K` labels: one series per combination of label values, all allocated
/// up front, in row-major order of the label indices.
pub struct Family<M, const K: usize> {
    name: &'static str,
    help: &'static str,
    labels: [&'static str; K],
    values: [&'static [&'static str]; K],
    zeros: Zeros,
    series: Box<[M]>,
}

impl<M, const K: usize> fmt::Debug for Family<M, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Family")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<M: Series, const K: usize> Family<M, K> {
    /// Builds a family named `name` whose label `labels[i]` takes the values `values[i]`.
    pub fn new(
        name: &'static str,
        help: &'static str,
        labels: [&'static str; K],
        values: [&'static [&'static str]; K],
        zeros: Zeros,
    ) -> Self {
        let len = values.iter().map(|v| v.len()).product();
        Self {
            name,
            help,
            labels,
            values,
            zeros,
            series: (0..len).map(|_| M::default()).collect(),
        }
    }

    /// Returns the series for these label value indices.
    ///
    /// # Panics
    ///
    /// If an index is out of its label's range (a bug: indices come from fixed enums).
    pub fn get(&self, index: [usize; K]) -> &M {
        let mut at = 0;
        for (i, values) in index.iter().zip(&self.values) {
            assert!(*i < values.len(), "{}: label index out of range", self.name);
            at = at * values.len() + i;
        }
        &self.series[at]
    }

    fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, M::TYPE);
        let mut labels = String::new();
        for (at, series) in self.series.iter().enumerate() {
            if self.zeros == Zeros::Hide && series.is_zero() {
                continue;
            }
            labels.clear();
            let mut rest = at;
            let mut parts = [""; K];
            for k in (0..K).rev() {
                parts[k] = self.values[k][rest % self.values[k].len()];
                rest /= self.values[k].len();
            }
            for (k, value) in parts.iter().enumerate() {
                if k > 0 {
                    labels.push(',');
                }
                let _ = write!(labels, "{}=\"{value}\"", self.labels[k]);
            }
            series.render(self.name, &labels, out);
        }
    }
}

/// Something [`Metrics::render`] can write.
trait Render {
    fn render_into(&self, out: &mut String);
}

impl<M: Series, const K: usize> Render for Family<M, K> {
    fn render_into(&self, out: &mut String) {
        self.render(out);
    }
}

/// Every metric the broker records. One per [`crate::Application`], shared by `Arc`.
#[derive(Debug)]
pub struct Metrics {
    /// `tokenbroker_rpc_requests_total{method,code}`.
    pub rpc_requests: Family<Counter, 2>,
    /// `tokenbroker_rpc_duration_seconds{method,code}`.
    pub rpc_duration: Family<Histogram, 2>,
    /// `tokenbroker_store_operation_duration_seconds{operation}`.
    pub store_duration: Family<Histogram, 1>,
    /// `tokenbroker_store_errors_total{operation,kind}`.
    pub store_errors: Family<Counter, 2>,
    /// `tokenbroker_fauna_requests_total{query,class}`.
    pub fauna_requests: Family<Counter, 2>,
    /// `tokenbroker_fauna_retries_total{class}`.
    pub fauna_retries: Family<Counter, 1>,
    /// `tokenbroker_account_cache_lookups_total{result}`.
    pub account_cache: Family<Counter, 1>,
    /// `tokenbroker_cognito_verified_cache_lookups_total{result}`.
    pub verified_cache: Family<Counter, 1>,
    /// `tokenbroker_cognito_jwks_fetches_total{outcome}`.
    pub jwks_fetches: Family<Counter, 1>,
    /// `tokenbroker_tokens_issued_total{kind}`.
    pub tokens_issued: Family<Counter, 1>,
    /// `tokenbroker_tokens_revoked_total{cause}`.
    pub tokens_revoked: Family<Counter, 1>,
    /// `tokenbroker_audit_write_errors_total`.
    pub audit_write_errors: Family<Counter, 0>,
    /// `tokenbroker_throttled_total{reason}`.
    pub throttled: Family<Counter, 1>,
    /// When the registry was built (the process start, near enough), in Unix seconds.
    start_time: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Builds the registry with every series at zero.
    pub fn new() -> Self {
        use Zeros::{Hide, Show};
        let method_code: [&'static [&'static str]; 2] = [&RPC_METHODS, &GRPC_CODES];
        Self {
            rpc_requests: Family::new(
                "tokenbroker_rpc_requests_total",
                "TokenBroker RPCs handled, by method and gRPC status code.",
                ["method", "code"],
                method_code,
                Hide,
            ),
            rpc_duration: Family::new(
                "tokenbroker_rpc_duration_seconds",
                "Time to handle a TokenBroker RPC, by method and gRPC status code.",
                ["method", "code"],
                method_code,
                Hide,
            ),
            store_duration: Family::new(
                "tokenbroker_store_operation_duration_seconds",
                "Time of a token store operation (after the account cache), by operation.",
                ["operation"],
                [&STORE_OPERATIONS],
                Show,
            ),
            store_errors: Family::new(
                "tokenbroker_store_errors_total",
                "Token store operations that failed, by operation and error kind.",
                ["operation", "kind"],
                [&STORE_OPERATIONS, &STORE_ERROR_KINDS],
                Hide,
            ),
            fauna_requests: Family::new(
                "tokenbroker_fauna_requests_total",
                "HTTP requests sent to Fauna (retries included), by query and response class.",
                ["query", "class"],
                [&crate::store::fauna::queries::NAMES, &FAUNA_CLASSES],
                Hide,
            ),
            fauna_retries: Family::new(
                "tokenbroker_fauna_retries_total",
                "Fauna requests retried after a retryable failure, by failure class.",
                ["class"],
                [&FAUNA_RETRY_CLASSES],
                Show,
            ),
            account_cache: Family::new(
                "tokenbroker_account_cache_lookups_total",
                "Email to account lookups in the in-memory account cache, by result.",
                ["result"],
                [&CACHE_RESULTS],
                Show,
            ),
            verified_cache: Family::new(
                "tokenbroker_cognito_verified_cache_lookups_total",
                "Cognito tokens looked up in the verified-token cache, by result.",
                ["result"],
                [&CACHE_RESULTS],
                Show,
            ),
            jwks_fetches: Family::new(
                "tokenbroker_cognito_jwks_fetches_total",
                "Fetches of a Cognito user pool's JWKS, by outcome.",
                ["outcome"],
                [&OUTCOMES],
                Show,
            ),
            tokens_issued: Family::new(
                "tokenbroker_tokens_issued_total",
                "Tokens minted (by IssueTokens and by rotation), by kind.",
                ["kind"],
                [&TOKEN_KINDS],
                Show,
            ),
            tokens_revoked: Family::new(
                "tokenbroker_tokens_revoked_total",
                "Tokens made inactive by a revocation, by cause (a Revoke call or reuse detection).",
                ["cause"],
                [&REVOKE_CAUSES],
                Show,
            ),
            audit_write_errors: Family::new(
                "tokenbroker_audit_write_errors_total",
                "Audit events that could not be written (their operations failed).",
                [],
                [],
                Show,
            ),
            throttled: Family::new(
                "tokenbroker_throttled_total",
                "Calls refused with RESOURCE_EXHAUSTED by admission control, by reason.",
                ["reason"],
                [&THROTTLE_REASONS],
                Show,
            ),
            start_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        }
    }

    /// Every family, in the order they are rendered.
    fn families(&self) -> [&dyn Render; 13] {
        [
            &self.rpc_requests,
            &self.rpc_duration,
            &self.store_duration,
            &self.store_errors,
            &self.fauna_requests,
            &self.fauna_retries,
            &self.account_cache,
            &self.verified_cache,
            &self.jwks_fetches,
            &self.tokens_issued,
            &self.tokens_revoked,
            &self.audit_write_errors,
            &self.throttled,
        ]
    }

    /// Records a store operation's duration, and its error kind when it failed.
    pub fn store_operation(
        &self,
        operation: usize,
        elapsed: Duration,
        error: Option<StoreErrorKind>,
    ) {
        self.store_duration.get([operation]).observe(elapsed);
        if let Some(kind) = error {
            let kind = match kind {
                StoreErrorKind::Unavailable => 0,
                StoreErrorKind::Timeout => 1,
                StoreErrorKind::Internal => 2,
            };
            self.store_errors.get([operation, kind]).inc();
        }
    }

    /// Renders every metric in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        for family in self.families() {
            family.render_into(&mut out);
        }
        let _ = writeln!(
            out,
            "# HELP tokenbroker_build_info The broker's version.\n\
             # TYPE tokenbroker_build_info gauge\n\
             tokenbroker_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        let _ = writeln!(
            out,
            "# HELP process_start_time_seconds Start time of the process since the Unix epoch in seconds.\n\
             # TYPE process_start_time_seconds gauge\n\
             process_start_time_seconds {}",
            self.start_time
        );
        render_process(&mut out);
        out
    }
}

/// Appends the process's resident memory and open file descriptors where `/proc` has them
/// (Linux); elsewhere nothing. Read at scrape time only.
fn render_process(out: &mut String) {
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
    if let Some(bytes) = rss {
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\n\
             process_resident_memory_bytes {bytes}"
        );
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(
            out,
            "# HELP process_open_fds Number of open file descriptors.\n\
             # TYPE process_open_fds gauge\n\
             process_open_fds {}",
            entries.count()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_inclusive() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // exactly the first bound: le="0.0005"
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render("x_seconds", "", &mut out);
        assert!(out.contains("x_seconds_bucket{le=\"0.0005\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_count 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum 60.0035\n"), "{out}");
    }

    #[test]
    fn families_index_row_major_and_hide_zeros_when_asked() {
        let m = Metrics::new();
        m.rpc_requests.get([1, 16]).inc();
        m.rpc_requests.get([1, 16]).inc();
        m.store_errors.get([6, 1]).inc();
        let text = m.render();
        assert!(
            text.contains(&format!(
                "tokenbroker_rpc_requests_total{{method=\"{}\",code=\"UNAUTHENTICATED\"}} 2\n",
                RPC_METHODS[1]
            )),
            "{text}"
        );
        assert!(
            text.contains(
                "tokenbroker_store_errors_total{operation=\"list_tokens\",kind=\"timeout\"} 1\n"
            ),
            "{text}"
        );
        assert_eq!(text.matches("tokenbroker_rpc_requests_total{").count(), 1);
        assert!(text.contains("tokenbroker_tokens_revoked_total{cause=\"reuse\"} 0\n"));
        assert!(text.contains("tokenbroker_audit_write_errors_total 0\n"));
        assert!(text.contains("# TYPE tokenbroker_rpc_duration_seconds histogram\n"));
    }
}
