//! The soak tool against a real broker, briefly: `tokenbroker-load soak` runs its mixed load
//! for a few seconds against a broker in this process (sampling this process), and every call
//! of every kind gets the answer its kind must get.

use tokenbroker::domain::admission::RateLimit;
use tokenbroker_tests::{TestBroker, expose};

/// Seconds of load: long enough for every kind of call and a few samples after the warm-up.
const SECONDS: &str = "6";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_gets_every_answer_right_and_exercises_admission() {
    let broker = TestBroker::spawn_with(|s| {
        s.metrics.listen = Some(([127, 0, 0, 1], 0).into());
        // Each flood address sends about 48 anonymous calls a second, over this limit; the legit
        // flows' 10 a second stay under it.
        s.limits.anonymous = Some(RateLimit {
            per_second: 30.0,
            burst: 30,
        });
    })
    .await;
    let metrics = broker.metrics_addr.expect("metrics listener");

    // tokio's process, not std's: the broker serves on this runtime while the tool runs.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokenbroker-load"))
        .args(["soak", "--target", &broker.addr.to_string()])
        .args(["--metrics", &metrics.to_string()])
        .args(["--pid", &std::process::id().to_string()])
        .args(["--duration", SECONDS])
        .args([
            "--flows-per-second",
            "5",
            "--flow-workers",
            "4",
            "--users",
            "20",
        ])
        .args(["--flood-addresses", "2", "--flood-rate", "60"])
        .args(["--wrong-key-rate", "10"])
        .env("TB_SOAK_TRIGGER_KEY", expose(&broker.keys.trigger))
        .env("TB_SOAK_SERVICE_KEY", expose(&broker.keys.service))
        .kill_on_drop(true)
        .output()
        .await
        .expect("tokenbroker-load runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|err| panic!("one JSON line on stdout ({err}): {stdout}\n{stderr}"));

    assert_eq!(summary["unexpected"], 0, "{stderr}");
    let kinds = summary["kinds"].as_object().expect("kinds");
    assert_eq!(kinds.len(), 11, "{summary}");
    for (name, counts) in kinds {
        assert!(
            counts["calls"].as_u64().unwrap() > 0,
            "no {name} call was made: {stderr}"
        );
        assert_eq!(counts["unexpected"], 0, "{name}: {stderr}");
        if counts["legit"] == true {
            assert_eq!(counts["throttled"], 0, "{name}: {stderr}");
        }
    }
    // The flood addresses went over their anonymous limit.
    let throttled: u64 = ["forged_refresh", "forged_revoke", "no_credential"]
        .iter()
        .map(|k| kinds[*k]["throttled"].as_u64().unwrap())
        .sum();
    assert!(throttled > 0, "admission control refused nothing: {stderr}");
    // The sampler saw this process every second after the warm-up.
    let steady = &summary["steady"];
    assert!(steady["samples"].as_u64().unwrap() >= 3, "{summary}");
    assert!(
        steady["rss_kib"]["min"].as_f64().unwrap() > 1024.0,
        "{summary}"
    );
    assert!(steady["fds"]["min"].as_f64().unwrap() >= 3.0, "{summary}");
    // The exit code is the verdict the summary states (flatness over a few seconds of a test
    // process is not asserted: its memory is the test harness's as well as the broker's).
    assert_eq!(
        output.status.success(),
        summary["passed"] == true,
        "{}: {stderr}",
        output.status
    );
    // The broker's own count of refused forged secrets agrees that garbage reached it.
    let scrape = broker.scrape().await;
    let unknown: f64 = scrape
        .lines()
        .find_map(|l| l.strip_prefix("tokenbroker_unknown_secrets_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("tokenbroker_unknown_secrets_total");
    assert!(unknown > 0.0, "{scrape}");
}
