//! The soak's sampler and its verdict: once a second it reads a process's resident memory, open
//! file descriptors and CPU time from `/proc/<pid>`, and the store writer's queue length from the
//! broker's Prometheus endpoint; after the run it judges whether memory and descriptors stayed
//! flat.
//!
//! `/proc` rather than a crate such as `procfs` or `sysinfo`: three small text files give all
//! of it, and those crates would bring far more than the three fields read here.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// What `/proc/<pid>` says about one process at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcReading {
    /// Resident set size (`VmRSS`), in KiB.
    pub(crate) rss_kib: u64,
    /// Open file descriptors (entries of `/proc/<pid>/fd`).
    pub(crate) fds: u64,
    /// User plus system CPU time so far, in clock ticks (`utime + stime` of `/proc/<pid>/stat`).
    pub(crate) cpu_ticks: u64,
}

/// Reads `/proc/<pid>` (or any directory laid out like it, such as `/proc/self`).
#[derive(Debug, Clone)]
pub(crate) struct ProcSource {
    dir: PathBuf,
}

impl ProcSource {
    /// The process `pid`.
    pub(crate) fn pid(pid: u32) -> Self {
        Self::at(Path::new("/proc").join(pid.to_string()))
    }

    /// The process whose `/proc` directory is `dir`.
    pub(crate) fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Reads the three figures now; fails if the process is gone.
    pub(crate) fn read(&self) -> anyhow::Result<ProcReading> {
        let read = |name: &str| {
            let path = self.dir.join(name);
            std::fs::read_to_string(&path)
                .with_context(|| format!("failed to read {}", path.display()))
        };
        let rss_kib = rss_kib(&read("status")?)?;
        let cpu_ticks = cpu_ticks(&read("stat")?)?;
        let fd_dir = self.dir.join("fd");
        let fds = std::fs::read_dir(&fd_dir)
            .with_context(|| format!("failed to list {}", fd_dir.display()))?
            .count() as u64;
        Ok(ProcReading {
            rss_kib,
            fds,
            cpu_ticks,
        })
    }
}

/// The `VmRSS` of a `/proc/<pid>/status` text, in KiB.
pub(crate) fn rss_kib(status: &str) -> anyhow::Result<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .context("no VmRSS line in the status file")?;
    let mut words = line.split_whitespace();
    let (Some(value), Some("kB")) = (words.next(), words.next()) else {
        bail!("VmRSS is not `<number> kB`: {line:?}");
    };
    value
        .parse()
        .with_context(|| format!("VmRSS is not a number: {value:?}"))
}

/// `utime + stime` of a `/proc/<pid>/stat` line, in clock ticks.
///
/// The second field, the command name in parentheses, may itself hold spaces and parentheses,
/// so the fields are counted from the last `)`: after it come field 3 (`state`) onwards, and
/// `utime` and `stime` are fields 14 and 15.
pub(crate) fn cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    let (_, rest) = stat
        .rsplit_once(')')
        .context("no command name in the stat line")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        let text = fields
            .get(n - 3)
            .with_context(|| format!("the stat line has no field {n}"))?;
        text.parse()
            .with_context(|| format!("field {n} of the stat line is not a number: {text:?}"))
    };
    Ok(field(14)? + field(15)?)
}

/// The value of the unlabelled sample `name` in a Prometheus text exposition.
pub(crate) fn gauge(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        // A sample line is `name value [timestamp]`.
        value.split_whitespace().next()?.parse().ok()
    })
}

/// The name of the writer queue gauge on the broker's metrics endpoint.
pub(crate) const QUEUE_GAUGE: &str = "tokenbroker_store_writer_queue_length";

/// Fetches the broker's metrics page and returns the writer queue length.
pub(crate) async fn queue_length(http: &reqwest::Client, url: &str) -> anyhow::Result<f64> {
    let text = http
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("failed to scrape {url}"))?
        .text()
        .await
        .with_context(|| format!("failed to read {url}"))?;
    gauge(&text, QUEUE_GAUGE).with_context(|| format!("{url} has no {QUEUE_GAUGE} sample"))
}

/// CPU use between two readings, in percent of one core (as `top` shows it).
pub(crate) fn cpu_percent(ticks: u64, ticks_per_second: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 || ticks_per_second == 0 {
        return 0.0;
    }
    ticks as f64 / ticks_per_second as f64 / seconds * 100.0
}

/// One second of the soak, as written to the CSV.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    /// Seconds since the load started.
    pub(crate) t: f64,
    pub(crate) rss_kib: u64,
    pub(crate) fds: u64,
    /// Percent of one core since the previous sample.
    pub(crate) cpu_percent: f64,
    pub(crate) queue: f64,
    /// Calls answered so far, of every kind.
    pub(crate) calls: u64,
    /// Unexpected answers so far.
    pub(crate) unexpected: u64,
}

impl Sample {
    /// The CSV header matching [`Sample::csv_row`].
    pub(crate) const CSV_HEADER: &'static str =
        "t_s,rss_kib,fds,cpu_percent,writer_queue,calls,unexpected";

    pub(crate) fn csv_row(&self) -> String {
        format!(
            "{:.1},{},{},{:.1},{},{},{}",
            self.t,
            self.rss_kib,
            self.fds,
            self.cpu_percent,
            self.queue,
            self.calls,
            self.unexpected
        )
    }
}

/// How one series behaved after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Band {
    pub(crate) min: f64,
    pub(crate) median: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
    /// Whether every value is within the tolerance of the median.
    pub(crate) flat: bool,
}

/// Judges `values`: flat when every one lies within `tolerance` (0.10 for ±10 %) of their
/// median. `None` for no values.
pub(crate) fn band(values: &[f64], tolerance: f64) -> Option<Band> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    let (min, max) = (sorted[0], sorted[n - 1]);
    let reach = median.abs() * tolerance;
    Some(Band {
        min,
        median,
        max,
        mean: sorted.iter().sum::<f64>() / n as f64,
        flat: min >= median - reach && max <= median + reach,
    })
}

/// The bands of the samples taken at or after `warmup` seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Steady {
    pub(crate) samples: usize,
    pub(crate) rss_kib: Band,
    pub(crate) fds: Band,
    pub(crate) cpu_percent: Band,
    pub(crate) queue: Band,
}

/// Judges the samples after the warm-up; `None` when there are none.
pub(crate) fn steady(samples: &[Sample], warmup: f64, tolerance: f64) -> Option<Steady> {
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t >= warmup).collect();
    let series = |f: fn(&Sample) -> f64| -> Option<Band> {
        band(&after.iter().map(|s| f(s)).collect::<Vec<_>>(), tolerance)
    };
    Some(Steady {
        samples: after.len(),
        rss_kib: series(|s| s.rss_kib as f64)?,
        fds: series(|s| s.fds as f64)?,
        cpu_percent: series(|s| s.cpu_percent)?,
        queue: series(|s| s.queue)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let own = ProcSource::at(PathBuf::from("/proc/self"))
            .read()
            .expect("/proc/self is readable");
        // The test binary is at least a few MiB resident and holds stdin, stdout and stderr.
        assert!(own.rss_kib > 1024, "{own:?}");
        assert!(own.fds >= 3, "{own:?}");

        // Holding more files open shows in the count.
        let files: Vec<std::fs::File> = (0..20)
            .map(|_| std::fs::File::open("/proc/self/status").expect("open"))
            .collect();
        let more = ProcSource::at(PathBuf::from("/proc/self"))
            .read()
            .expect("/proc/self is readable");
        assert!(more.fds >= own.fds + 20, "{own:?} then {more:?}");
        drop(files);

        // Spinning for a while costs CPU time, which the stat line reports.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let later = ProcSource::pid(std::process::id())
            .read()
            .expect("our own pid is readable");
        assert!(later.cpu_ticks > own.cpu_ticks, "{own:?} then {later:?}");
    }

    #[test]
    fn a_gone_process_is_an_error() {
        let err = ProcSource::at(PathBuf::from("/proc/no-such-process"))
            .read()
            .unwrap_err();
        assert!(format!("{err:#}").contains("no-such-process"), "{err:#}");
    }

    #[test]
    fn parses_status_and_stat_lines() {
        let status = "Name:\tx\nVmPeak:\t  9999 kB\nVmRSS:\t   38612 kB\nThreads:\t5\n";
        assert_eq!(rss_kib(status).unwrap(), 38612);
        assert!(rss_kib("Name:\tx\n").is_err());
        assert!(rss_kib("VmRSS:\t12 MB\n").is_err());

        // A command name with spaces and a `)` must not shift the fields.
        let stat = "4242 (tokio) worker) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    1234 567 0 0 20 0 9 0 1000 100000 900 18446744073709551615";
        assert_eq!(cpu_ticks(stat).unwrap(), 1234 + 567);
        assert!(cpu_ticks("4242 (x) S 1 2").is_err());
        assert!(cpu_ticks("no parentheses").is_err());
    }

    #[test]
    fn reads_the_queue_gauge_and_nothing_like_it() {
        let scrape = "# HELP tokenbroker_store_writer_queue_length writes waiting\n\
                      # TYPE tokenbroker_store_writer_queue_length gauge\n\
                      tokenbroker_store_writer_queue_length_max 99\n\
                      tokenbroker_store_writer_queue_length 3\n";
        assert_eq!(gauge(scrape, QUEUE_GAUGE), Some(3.0));
        assert_eq!(gauge("other 1\n", QUEUE_GAUGE), None);
    }

    #[test]
    fn cpu_percent_is_of_one_core() {
        // 100 ticks a second: 50 ticks over half a second is one whole core.
        assert_eq!(cpu_percent(50, 100, Duration::from_millis(500)), 100.0);
        assert_eq!(cpu_percent(10, 100, Duration::from_secs(1)), 10.0);
        assert_eq!(cpu_percent(10, 100, Duration::ZERO), 0.0);
    }

    #[test]
    fn flat_means_within_the_tolerance_of_the_median() {
        let flat = band(&[100.0, 95.0, 105.0, 101.0, 99.0], 0.10).unwrap();
        assert!(flat.flat, "{flat:?}");
        assert_eq!(flat.median, 100.0);
        assert_eq!((flat.min, flat.max), (95.0, 105.0));

        // Right at the edge is still flat; just past it is not, up or down.
        assert!(band(&[100.0, 100.0, 110.0], 0.10).unwrap().flat);
        assert!(!band(&[100.0, 100.0, 111.0], 0.10).unwrap().flat);
        assert!(!band(&[100.0, 100.0, 89.0], 0.10).unwrap().flat);
        // A steady climb (a leak) fails even if each step is small.
        let climb: Vec<f64> = (0..100).map(|i| 100.0 + f64::from(i) * 0.3).collect();
        assert!(!band(&climb, 0.10).unwrap().flat);
        // An even count takes the mean of the middle two.
        assert_eq!(band(&[1.0, 2.0, 3.0, 4.0], 0.5).unwrap().median, 2.5);
        assert_eq!(band(&[], 0.10), None);
    }

    #[test]
    fn the_verdict_ignores_the_warm_up() {
        let sample = |t: f64, rss_kib: u64| Sample {
            t,
            rss_kib,
            fds: 30,
            cpu_percent: 10.0,
            queue: 0.0,
            calls: 0,
            unexpected: 0,
        };
        // Memory doubles during the warm-up, then holds.
        let samples: Vec<Sample> = (0..60u32)
            .map(|i| {
                let rss = if i < 10 {
                    20_000 + 2_000 * u64::from(i)
                } else {
                    40_000
                };
                sample(f64::from(i), rss)
            })
            .collect();
        let after = steady(&samples, 10.0, 0.10).unwrap();
        assert!(after.rss_kib.flat && after.fds.flat, "{after:?}");
        assert_eq!(after.samples, 50);
        let whole = steady(&samples, 0.0, 0.10).unwrap();
        assert!(!whole.rss_kib.flat, "{whole:?}");
        assert_eq!(steady(&samples, 100.0, 0.10), None);
    }

    #[test]
    fn csv_rows_match_the_header() {
        let row = Sample {
            t: 1.5,
            rss_kib: 38_612,
            fds: 33,
            cpu_percent: 11.04,
            queue: 2.0,
            calls: 400,
            unexpected: 0,
        }
        .csv_row();
        assert_eq!(row, "1.5,38612,33,11.0,2,400,0");
        assert_eq!(
            row.split(',').count(),
            Sample::CSV_HEADER.split(',').count()
        );
    }
}
