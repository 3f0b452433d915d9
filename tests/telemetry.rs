//! Telemetry of a running node, seen the way an operator sees it: `/metrics`.

mod common;

use common::TestNode;
use std::time::{Duration, Instant};

fn scrape(node: &TestNode) -> String {
    reqwest::blocking::get(format!("{}/metrics", node.base))
        .and_then(|r| r.text())
        .expect("metrics")
}

/// The value of an unlabelled sample.
fn value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

/// Scrapes the sample ratio for `span`, checking it stays within [floor, 1] every time.
fn ratio_over(node: &TestNode, floor: f64, span: Duration, mut load: impl FnMut()) -> f64 {
    let end = Instant::now() + span;
    let mut ratio = value(&scrape(node), "mediamesh_trace_sample_ratio");
    while Instant::now() < end {
        load();
        ratio = value(&scrape(node), "mediamesh_trace_sample_ratio");
        assert!((floor..=1.0).contains(&ratio), "ratio {ratio} outside [{floor}, 1]");
    }
    ratio
}

#[test]
fn trace_sampling_rate_follows_the_error_rate_within_bounds() {
    let floor = 0.1;
    let node = TestNode::start(&["--trace-sample-floor", "0.1"]);
    let client = reqwest::blocking::Client::new();
    // Ten requests to `path`, all succeeding or all refused, then a pause.
    let burst = |path: &'static str, succeed: bool| {
        let (client, base) = (&client, &node.base);
        move || {
            for _ in 0..10 {
                let status = client.get(format!("{base}{path}")).send().expect("request").status();
                assert_eq!(status.is_success(), succeed, "{path}: {status}");
                assert!(succeed || status.is_client_error(), "{path}: {status}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let healthy = burst("/sdk/mediamesh.js", true);
    let failing = burst("/whep/no-such-room/no-such-session", false);
    let calm = ratio_over(&node, floor, Duration::from_secs(2), healthy);
    assert!(calm <= floor + 0.01, "healthy traffic keeps the floor: {calm}");
    let errors = ratio_over(&node, floor, Duration::from_secs(3), failing);
    assert!(errors >= 0.95, "mostly failing requests export every trace: {errors}");
    let recovered = ratio_over(&node, floor, Duration::from_secs(9), healthy);
    assert!(
        recovered <= floor + 0.05,
        "the rate returns towards the floor: {recovered}"
    );
}

#[test]
fn http_durations_are_labelled_by_route_pattern_not_by_path() {
    let node = TestNode::start(&[]);
    let client = reqwest::blocking::Client::new();
    for room in ["alpha", "bravo", "charlie"] {
        let status = client
            .delete(format!("{}/whep/{room}/session-{room}", node.base))
            .send()
            .expect("request")
            .status();
        assert_eq!(status, 401);
    }
    let metrics = scrape(&node);
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("mediamesh_http_request_duration_seconds_count{"))
        .collect();
    let expected = r#"mediamesh_http_request_duration_seconds_count{method="DELETE",route="/whep/{room}/{session}",status="401"} 3"#;
    assert!(series.contains(&expected), "{series:#?}");
    assert!(
        !metrics.contains("alpha") && !metrics.contains("session-bravo"),
        "room or session names in labels"
    );
}
