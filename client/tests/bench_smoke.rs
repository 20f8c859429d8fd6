//! `im-client bench` end to end, against the in-process baseline relay only
//! (no Redis, no server): it runs, delivers, measures, and reports every
//! key. How fast is not asserted.

use std::time::Duration;

use im_client::bench::{self, BenchOptions, relay::Relay};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_end_to_end_against_a_relay() {
    let target = Relay::start().await.expect("a relay on 127.0.0.1");
    let opts = BenchOptions {
        pairs: 2,
        duration: Duration::from_millis(300),
        idle_conns: 20,
        // The "server" is this very process: the figures mean nothing, but
        // every step of the idle measurement runs.
        server_pid: Some(std::process::id()),
        drain_timeout: Duration::from_secs(1),
        idle_settle: Duration::from_millis(20),
        rss_samples: 2,
        rss_interval: Duration::from_millis(5),
        ..BenchOptions::new(target.url())
    };
    let report = tokio::time::timeout(Duration::from_secs(30), bench::run(opts))
        .await
        .expect("the bench finishes")
        .expect("the bench succeeds");
    target.stop().await;

    for load in [&report.target, &report.baseline] {
        assert!(load.delivered > 0, "{load}");
        assert!(load.delivered_in_window > 0, "{load}");
        assert!(!load.histogram.is_empty());
        assert_eq!(load.latency.count, load.histogram.len());
        assert!(load.latency.p50_ms.is_some() && load.latency.p999_ms.is_some());
        assert_eq!(load.errors(), 0, "{load}");
        assert_eq!(load.sent, load.delivered, "{load}");
        assert!(!load.slowest.is_empty(), "{load}");
    }
    assert!(report.idle.skipped.is_none(), "{}", report.idle);
    assert_eq!(report.idle.server_opened, 20, "{}", report.idle);
    assert_eq!(report.idle.baseline_opened, 20, "{}", report.idle);
    assert_eq!(report.idle.large_frames_answered, 20, "{}", report.idle);

    // The last line of `im-client bench`: one JSON object with every key.
    let line = report.to_json().to_string();
    assert!(!line.contains('\n'));
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    for key in [
        "msgs_per_s",
        "baseline_msgs_per_s",
        "ratio",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "bytes_per_idle_conn",
        "baseline_bytes_per_idle_conn",
        "errors",
        "pairs",
        "duration_s",
        "slowest",
    ] {
        assert!(json.get(key).is_some(), "{key} missing from {line}");
    }
    for key in ["msgs_per_s", "baseline_msgs_per_s", "ratio", "p50_ms"] {
        assert!(json[key].is_number(), "{key} in {line}");
    }
    assert!(json["bytes_per_idle_conn"].is_number(), "{line}");
    assert!(
        json["bytes_per_idle_conn_after_large_frame"].is_number(),
        "{line}"
    );
    assert!(json["server_cpu_us_per_msg"].is_number(), "{line}");
    assert_eq!(json["errors"], 0, "{line}");
    println!("{report}");
}

#[tokio::test]
async fn the_idle_part_is_skipped_without_a_server_pid() {
    let target = Relay::start().await.expect("a relay on 127.0.0.1");
    let opts = BenchOptions {
        pairs: 1,
        duration: Duration::from_millis(50),
        idle_conns: 10,
        server_pid: None,
        ..BenchOptions::new(target.url())
    };
    let report = bench::run(opts).await.expect("the bench succeeds");
    target.stop().await;
    assert!(report.idle.skipped.is_some());
    let json = report.to_json();
    assert!(json["bytes_per_idle_conn"].is_null());
    assert!(json["bytes_per_idle_conn_after_large_frame"].is_null());
    assert!(json["baseline_bytes_per_idle_conn"].is_null());
}
