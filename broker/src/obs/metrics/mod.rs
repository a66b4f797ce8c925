//! Prometheus metrics: fixed families of atomic counters and histograms, rendered in the text
//! exposition format 0.0.4 by a separate HTTP listener ([`MetricsServer`]).
//!
//! Every series is allocated when its family is built, one slot per combination of label
//! values, so recording is an index computation and one or two relaxed atomic additions: no
//! lock, no map, no allocation on the hot path (the broker serves tens of thousands of calls a
//! second on two cores). `prometheus-client` was the alternative; its label families sit
//! behind a lock and a hash map, and it brings its own encoder crates, for nothing this fixed
//! set of metrics needs.
//!
//! Each subsystem owns its metrics: a struct of [`Family`]s that implements [`MetricSet`], built
//! at start-up and added to the [`Registry`] the endpoint renders. A label is a type that
//! implements [`Label`] (usually a fieldless enum, declared with [`label!`](crate::label)), so a
//! series is picked by value (`family.get(CacheResult::Hit)`), never by position.

mod http;

use std::{
    fmt::{self, Write as _},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Deserialize;

pub use http::MetricsServer;

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

/// The values one label takes: its name, every value in rendering order, and which one `self`
/// is.
pub trait Label: Copy {
    /// The label's name, such as `result`.
    const NAME: &'static str;
    /// Every value, such as `["hit", "miss"]`.
    const VALUES: &'static [&'static str];
    /// Returns the position of `self` in [`Label::VALUES`].
    fn index(self) -> usize;
}

/// Declares a fieldless enum that is a [`Label`]: each variant with its rendered value.
///
/// ```
/// tokenbroker::label! {
///     /// Whether a lookup found its entry.
///     pub enum Found: "found" { Yes = "yes", No = "no" }
/// }
/// ```
#[macro_export]
macro_rules! label {
    ($(#[$doc:meta])* $vis:vis enum $name:ident : $label:literal {
        $($(#[$vdoc:meta])* $variant:ident = $value:literal),+ $(,)?
    }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// Every value, in the order of [`Label::VALUES`](crate::obs::metrics::Label::VALUES).
            #[allow(dead_code)]
            $vis const ALL: &'static [Self] = &[$(Self::$variant),+];
        }

        impl $crate::obs::metrics::Label for $name {
            const NAME: &'static str = $label;
            const VALUES: &'static [&'static str] = &[$($value),+];
            fn index(self) -> usize {
                self as usize
            }
        }
    };
}

label! {
    /// Whether a cache lookup found its entry, as the `result` label.
    pub enum CacheResult: "result" { Hit = "hit", Miss = "miss" }
}

label! {
    /// How an operation ended, as the `outcome` label.
    pub enum Outcome: "outcome" { Ok = "ok", Error = "error" }
}

/// The labels of a family: none (`()`), one [`Label`], or a pair of them.
pub trait Labels: Copy {
    /// The label names.
    fn names() -> Vec<&'static str>;
    /// Every label's values, in the order of [`Labels::names`].
    fn values() -> Vec<&'static [&'static str]>;
    /// Returns the series' position in row-major order of the label values.
    fn index(self) -> usize;
}

impl Labels for () {
    fn names() -> Vec<&'static str> {
        Vec::new()
    }
    fn values() -> Vec<&'static [&'static str]> {
        Vec::new()
    }
    fn index(self) -> usize {
        0
    }
}

impl<A: Label> Labels for A {
    fn names() -> Vec<&'static str> {
        vec![A::NAME]
    }
    fn values() -> Vec<&'static [&'static str]> {
        vec![A::VALUES]
    }
    fn index(self) -> usize {
        Label::index(self)
    }
}

impl<A: Label, B: Label> Labels for (A, B) {
    fn names() -> Vec<&'static str> {
        vec![A::NAME, B::NAME]
    }
    fn values() -> Vec<&'static [&'static str]> {
        vec![A::VALUES, B::VALUES]
    }
    fn index(self) -> usize {
        self.0.index() * B::VALUES.len() + self.1.index()
    }
}

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

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one away.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// Returns the value.
    pub fn get(&self) -> i64 {
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

impl Series for Gauge {
    const TYPE: &'static str = "gauge";
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

/// A metric family: one series per combination of its labels' values, all allocated up front,
/// in row-major order of the label values.
pub struct Family<M, L> {
    name: &'static str,
    help: &'static str,
    zeros: Zeros,
    series: Box<[M]>,
    labels: std::marker::PhantomData<fn(L)>,
}

impl<M, L> fmt::Debug for Family<M, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Family")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<M: Series, L: Labels> Family<M, L> {
    /// Builds a family named `name`, with a series for every combination of `L`'s values.
    pub fn new(name: &'static str, help: &'static str, zeros: Zeros) -> Self {
        let len = L::values().iter().map(|v| v.len()).product();
        Self {
            name,
            help,
            zeros,
            series: (0..len).map(|_| M::default()).collect(),
            labels: std::marker::PhantomData,
        }
    }

    /// Returns the series for these label values.
    pub fn get(&self, labels: L) -> &M {
        &self.series[labels.index()]
    }

    /// Appends the family's `# HELP`, `# TYPE` and sample lines.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, M::TYPE);
        let (names, values) = (L::names(), L::values());
        let mut labels = String::new();
        for (at, series) in self.series.iter().enumerate() {
            if self.zeros == Zeros::Hide && series.is_zero() {
                continue;
            }
            labels.clear();
            let mut rest = at;
            let mut parts = vec![""; names.len()];
            for k in (0..names.len()).rev() {
                parts[k] = values[k][rest % values[k].len()];
                rest /= values[k].len();
            }
            for (k, value) in parts.iter().enumerate() {
                if k > 0 {
                    labels.push(',');
                }
                let _ = write!(labels, "{}=\"{value}\"", names[k]);
            }
            series.render(self.name, &labels, out);
        }
    }
}

/// A subsystem's metrics, as the [`Registry`] renders them.
pub trait MetricSet: fmt::Debug + Send + Sync + 'static {
    /// Appends every family of the set.
    fn render(&self, out: &mut String);
}

/// Every [`MetricSet`] the endpoint renders, plus the build and process gauges.
#[derive(Debug)]
pub struct Registry {
    sets: Vec<Arc<dyn MetricSet>>,
    /// When the registry was built (the process start, near enough), in Unix seconds.
    start_time: f64,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// Returns a registry with no set yet.
    pub fn new() -> Self {
        Self {
            sets: Vec::new(),
            start_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        }
    }

    /// Adds `set`, rendered after the sets added before it; returns it for the caller to keep.
    pub fn register<S: MetricSet>(&mut self, set: S) -> Arc<S> {
        let set = Arc::new(set);
        self.add(Arc::clone(&set) as Arc<dyn MetricSet>);
        set
    }

    /// Adds a set that its owner already shares, rendered after the sets added before it.
    pub fn add(&mut self, set: Arc<dyn MetricSet>) {
        self.sets.push(set);
    }

    /// Renders every metric in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        for set in &self.sets {
            set.render(&mut out);
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

    label! {
        enum Colour: "colour" { Red = "red", Green = "green", Blue = "blue" }
    }

    #[derive(Debug)]
    struct Set {
        pairs: Family<Counter, (Colour, CacheResult)>,
        plain: Family<Counter, ()>,
        times: Family<Histogram, Colour>,
    }

    impl MetricSet for Set {
        fn render(&self, out: &mut String) {
            self.pairs.render(out);
            self.plain.render(out);
            self.times.render(out);
        }
    }

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
        let mut registry = Registry::new();
        let set = registry.register(Set {
            pairs: Family::new("x_pairs_total", "Pairs.", Zeros::Hide),
            plain: Family::new("x_plain_total", "Plain.", Zeros::Show),
            times: Family::new("x_seconds", "Times.", Zeros::Hide),
        });
        set.pairs.get((Colour::Green, CacheResult::Miss)).inc();
        set.pairs.get((Colour::Green, CacheResult::Miss)).inc();
        set.pairs.get((Colour::Blue, CacheResult::Hit)).inc();
        set.times.get(Colour::Red).observe(Duration::from_millis(1));
        let text = registry.render();
        assert!(
            text.contains("x_pairs_total{colour=\"green\",result=\"miss\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("x_pairs_total{colour=\"blue\",result=\"hit\"} 1\n"),
            "{text}"
        );
        assert_eq!(text.matches("x_pairs_total{").count(), 2, "{text}");
        assert!(text.contains("x_plain_total 0\n"), "{text}");
        assert!(text.contains("# TYPE x_seconds histogram\n"), "{text}");
        assert!(
            text.contains("x_seconds_count{colour=\"red\"} 1\n"),
            "{text}"
        );
        assert!(
            !text.contains("x_seconds_count{colour=\"green\"}"),
            "{text}"
        );
        assert!(text.contains("tokenbroker_build_info{"), "{text}");
    }
}
