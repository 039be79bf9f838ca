//! What operators see: CloudWatch datapoints (through the real aws-sdk-cloudwatch, a CBOR bridge
//! and moto, read back through the CloudWatch API), `/metrics` checked by a real Prometheus
//! parser, the status page rendered in headless Chromium, data freshness, and the `status`
//! command.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;

fn env_for(moto: &Moto, bridge: &CloudWatchBridge, bucket: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = moto.env();
    env.extend(kv(&[
        ("AWS_ENDPOINT_URL_CLOUDWATCH", &bridge.endpoint),
        ("LOADER_SOURCE__URL", &format!("s3://{bucket}")),
        ("LOADER_PIPELINE", "obs-test"),
        ("LOADER_CLOUDWATCH__ENABLED", "true"),
        ("LOADER_CLOUDWATCH__NAMESPACE", "LoaderTest"),
    ]));
    env.extend(kv(extra));
    env
}

/// Sum and maximum of every datapoint of `metric` (dimension Pipeline=obs-test) in the last hour,
/// read from moto through the CloudWatch API.
fn cloudwatch_stats(moto: &Moto, metric: &str) -> serde_json::Value {
    let out = python(
        r#"
import boto3, datetime, json, sys
cw = boto3.client("cloudwatch", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
now = datetime.datetime.now(datetime.timezone.utc)
r = cw.get_metric_statistics(Namespace="LoaderTest", MetricName=sys.argv[2],
    Dimensions=[{"Name": "Pipeline", "Value": "obs-test"}],
    StartTime=now - datetime.timedelta(hours=1), EndTime=now + datetime.timedelta(minutes=5),
    Period=3600, Statistics=["Sum", "Maximum", "SampleCount"])
points = r["Datapoints"]
print(json.dumps({"sum": sum(p["Sum"] for p in points), "max": max([p["Maximum"] for p in points] or [None]),
                  "count": sum(p["SampleCount"] for p in points), "unit": [p.get("Unit") for p in points]}))
"#,
        &[&moto.endpoint, metric],
    );
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn cloudwatch_datapoints_are_published_and_read_back_after_loads_and_a_failure() {
    let moto = Moto::start();
    let bridge = CloudWatchBridge::start(&moto, &[]);
    let bucket = Bucket::create(&moto, "cw-up").await;
    bucket.put("incoming/orders/a.csv", orders_csv(1, 30)).await;
    bucket.put("incoming/orders/b.csv", orders_csv(31, 20)).await;
    bucket.put("incoming/orders/c.csv", "id,amount\n1,2,3\n").await; // ragged: fails
    bucket.put("incoming/orders/d.csv", orders_csv(100, 5)).await;
    let dir = tempfile::tempdir().unwrap();
    // Three files per tick: d.csv (the newest) waits, so the backlog after the tick is 1.
    let env = env_for(&moto, &bridge, "cw-up", &[("LOADER_SCHEDULE__MAX_FILES_PER_TICK", "3")]);
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert_eq!(status.code(), Some(1), "one file failed\n{stdout}{stderr}");
    assert!(
        stdout.contains("loaded 2 (50 rows)") && stdout.contains("failed 1"),
        "{stdout}"
    );

    assert_eq!(cloudwatch_stats(&moto, "FilesLoaded")["sum"], 2.0);
    assert_eq!(cloudwatch_stats(&moto, "RowsLoaded")["sum"], 50.0);
    assert_eq!(cloudwatch_stats(&moto, "FilesFailed")["sum"], 1.0);
    let unprocessed = cloudwatch_stats(&moto, "UnprocessedFiles");
    assert_eq!(unprocessed["max"], 1.0, "listed 4, processed 3: {unprocessed}");
    assert_eq!(unprocessed["unit"][0], "Count");
    let bytes = cloudwatch_stats(&moto, "UnprocessedBytes");
    assert_eq!(bytes["max"], orders_csv(100, 5).len() as f64);
    let age = cloudwatch_stats(&moto, "OldestUnprocessedFileAge");
    assert!(
        age["max"].as_f64().unwrap() >= 0.0 && age["unit"][0] == "Seconds",
        "{age}"
    );
    let duration = cloudwatch_stats(&moto, "FileLoadDuration");
    assert_eq!(duration["count"], 3.0, "three loads timed: {duration}");

    // The second run loads d.csv: the backlog reaches 0.
    let (status, stdout, _) = run(dir.path(), &["once"], &env);
    assert!(status.success(), "{stdout}");
    assert_eq!(cloudwatch_stats(&moto, "FilesLoaded")["sum"], 3.0);
    let listed = python(
        r#"
import boto3, json, sys
cw = boto3.client("cloudwatch", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id="test", aws_secret_access_key="test")
ms = cw.list_metrics(Namespace="LoaderTest")["Metrics"]
print(json.dumps(sorted({(m["MetricName"], tuple((d["Name"], d["Value"]) for d in m["Dimensions"])) for m in ms})))
"#,
        &[&moto.endpoint],
    );
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[0].as_str().unwrap())
        .collect();
    for name in [
        "FileLoadDuration",
        "FilesFailed",
        "FilesLoaded",
        "OldestUnprocessedFileAge",
        "RowsLoaded",
        "UnprocessedBytes",
        "UnprocessedFiles",
    ] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    for m in listed.as_array().unwrap() {
        assert_eq!(m[1], serde_json::json!([["Pipeline", "obs-test"]]), "{m}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cloudwatch_outage_never_slows_loading_and_is_counted() {
    let moto = Moto::start();
    let bridge = CloudWatchBridge::start(&moto, &["--fail-rate", "1", "--delay-ms", "20000"]);
    let bucket = Bucket::create(&moto, "cw-down").await;
    for i in 0..5u64 {
        bucket
            .put(&format!("incoming/orders/{i}.csv"), orders_csv(i * 10 + 1, 10))
            .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let env = env_for(
        &moto,
        &bridge,
        "cw-down",
        &[
            ("LOADER_CLOUDWATCH__TIMEOUT", "1s"),
            ("LOADER_SCHEDULE__INTERVAL", "500ms"),
        ],
    );
    let loader = Loader::spawn(dir.path(), &env);
    loader.wait_up().await;
    let started = Instant::now();
    wait_until(Duration::from_secs(30), "all loaded", || async {
        loader.status().await["totals"]["files_loaded"] == 5
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "loading waited for CloudWatch: {:?}",
        started.elapsed()
    );
    wait_until(Duration::from_secs(20), "failed publishes counted", || async {
        let metrics = reqwest::get(loader.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics.lines().any(|l| {
            l.strip_prefix("s3_sql_loader_cloudwatch_publish_failures_total ")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|n| n >= 2)
        })
    })
    .await;
    assert_eq!(reqwest::get(loader.url("/healthz")).await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_pass_a_real_prometheus_parser_with_the_expected_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_old(&d.join("data/incoming/orders/a.csv"), orders_csv(1, 40).as_bytes());
    write_old(&d.join("data/incoming/orders/b.csv"), b"id,amount\n1,2,3\n");
    let loader = Loader::spawn(d, &kv(&[("LOADER_SCHEDULE__INTERVAL", "500ms")]));
    loader.wait_up().await;
    wait_until(Duration::from_secs(20), "both files done", || async {
        let s = loader.status().await;
        s["totals"]["files_loaded"] == 1 && s["totals"]["files_failed"] == 1
    })
    .await;
    // The Prometheus text format by default, OpenMetrics when asked for: each read by the
    // Prometheus Python client's own parser for that format (the OpenMetrics one is strict:
    // `# EOF`, counter names, sample order).
    let client = reqwest::Client::new();
    for (accept, parser, content_type) in [
        (None, "prometheus_client.parser", "text/plain; version=0.0.4"),
        (
            Some("application/openmetrics-text; version=1.0.0"),
            "prometheus_client.openmetrics.parser",
            "application/openmetrics-text; version=1.0.0",
        ),
    ] {
        let mut request = client.get(loader.url("/metrics"));
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let response = request.send().await.unwrap();
        let served = response.headers()["content-type"].to_str().unwrap().to_string();
        assert!(served.starts_with(content_type), "{served}");
        let text = response.text().await.unwrap();
        let parsed = python(
            &format!(
                r#"
import json, sys
from {parser} import text_string_to_metric_families
out = {{}}
for family in text_string_to_metric_families(sys.argv[1]):
    for s in family.samples:
        labels = ",".join(f"{{k}}={{v}}" for k, v in sorted(s.labels.items()))
        out[s.name + ("{{" + labels + "}}" if labels else "")] = s.value
    out["type:" + family.name] = family.type
print(json.dumps(out))
"#
            ),
            &[&text],
        );
        let m: serde_json::Value = serde_json::from_str(&parsed).unwrap();
        assert_eq!(m["s3_sql_loader_files_loaded_total"], 1.0, "{parser}: {m}");
        assert_eq!(m["s3_sql_loader_rows_loaded_total"], 40.0);
        assert_eq!(m["s3_sql_loader_files_failed_total"], 1.0);
        assert_eq!(m["s3_sql_loader_errors_total{kind=decode,stage=decode}"], 1.0, "{m}");
        assert_eq!(m["s3_sql_loader_backlog_files"], 0.0);
        assert_eq!(m["s3_sql_loader_load_duration_seconds_count"], 2.0);
        assert_eq!(m["s3_sql_loader_load_duration_seconds_bucket{le=+Inf}"], 2.0);
        assert!(m["s3_sql_loader_list_calls_total"].as_f64().unwrap() >= 1.0);
        assert!(m["s3_sql_loader_ticks_total{result=ok}"].as_f64().unwrap() >= 1.0);
        assert_eq!(m["type:s3_sql_loader_load_duration_seconds"], "histogram");
        assert_eq!(m["type:s3_sql_loader_files_loaded"], "counter");
        assert_eq!(m["type:s3_sql_loader_backlog_oldest_age_seconds"], "gauge");
        assert_eq!(m["s3_sql_loader_build_info{version=0.1.0}"], 1.0, "{parser}: {m}");
        // Per target table.
        assert_eq!(
            m["s3_sql_loader_table_files_total{outcome=loaded,table=orders}"], 1.0,
            "{m}"
        );
        assert_eq!(
            m["s3_sql_loader_table_files_total{outcome=failed,table=orders}"], 1.0,
            "{m}"
        );
        assert_eq!(m["s3_sql_loader_table_rows_total{table=orders}"], 40.0, "{m}");
        assert_eq!(
            m["s3_sql_loader_table_load_duration_seconds_count{table=orders}"], 2.0,
            "{m}"
        );
    }
    let s = loader.status().await;
    assert_eq!(s["tables"]["orders"]["files_loaded"], 1, "{s}");
    assert_eq!(s["tables"]["orders"]["rows_loaded"], 40, "{s}");
    assert_eq!(s["tables"]["orders"]["files_failed"], 1, "{s}");
    assert!(s["tables"]["orders"]["last_loaded_at"].is_string(), "{s}");
    let page = reqwest::get(loader.url("/")).await.unwrap().text().await.unwrap();
    assert!(
        page.contains("<tr class=\"table\"><td>orders</td><td class=\"num\">1</td><td class=\"num\">40</td>"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_data_is_reported_as_degraded_and_can_fail_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_old(&d.join("data/incoming/orders/a.csv"), orders_csv(1, 5).as_bytes());
    // The database never answers, so the file (a minute old) waits.
    let env = kv(&[
        (
            "LOADER_DATABASE__URL",
            &format!("postgres://x@127.0.0.1:{}/x", free_port()),
        ),
        ("LOADER_DATABASE__CONNECT_TIMEOUT", "1s"),
        ("LOADER_SCHEDULE__INTERVAL", "500ms"),
        ("LOADER_HEALTH__MAX_BACKLOG_AGE", "30s"),
        ("LOADER_HEALTH__FAIL_READINESS_WHEN_DEGRADED", "true"),
    ]);
    let loader = Loader::spawn(d, &env);
    loader.wait_up().await;
    wait_until(Duration::from_secs(20), "degraded", || async {
        loader.status().await["freshness"] == "degraded"
    })
    .await;
    let ready = reqwest::get(loader.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["freshness"], "degraded");
    let metrics = reqwest::get(loader.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("\ns3_sql_loader_freshness_degraded 1\n"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_command_shows_the_backlog_and_why_files_failed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_old(&d.join("data/incoming/orders/bad.csv"), b"id,amount\n1,2,3\n");
    let (status, _, _) = run(d, &["once"], &[]);
    assert_eq!(status.code(), Some(1));
    write_old(&d.join("data/incoming/orders/waiting.csv"), orders_csv(1, 3).as_bytes());
    let (status, stdout, stderr) = run(d, &["status"], &[]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("backlog:  1 file(s)"), "{stdout}");
    assert!(stdout.contains("failed:   1 file(s)"), "{stdout}");
    assert!(stdout.contains("failed/orders/bad.csv"), "{stdout}");
    assert!(
        stdout.contains("decode: row has 3 fields but the header has 2"),
        "{stdout}"
    );
}

/// Headless Chromium from Debian (`scripts/test` installs it); `CHROMIUM` overrides the path.
fn chromium() -> String {
    std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

fn chromium_run(args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} (scripts/test installs Debian's chromium): {e}",
                chromium()
            )
        });
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_renders_in_a_browser_with_its_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_old(&d.join("data/incoming/orders/a.csv"), orders_csv(1, 25).as_bytes());
    write_old(&d.join("data/incoming/orders/b.csv"), orders_csv(26, 12).as_bytes());
    write_old(
        &d.join("data/incoming/orders/<script>alert(1)</script>.csv"),
        b"id,amount\n1,2,3\n",
    );
    let loader = Loader::spawn(
        d,
        &kv(&[("LOADER_SCHEDULE__INTERVAL", "500ms"), ("LOADER_PIPELINE", "page-test")]),
    );
    loader.wait_up().await;
    wait_until(Duration::from_secs(20), "files done", || async {
        let s = loader.status().await;
        s["totals"]["files_loaded"] == 2 && s["totals"]["files_failed"] == 1
    })
    .await;
    let url = loader.url("/");
    let dom = chromium_run(&["--dump-dom"], &url);
    let text_of = |id: &str| -> String {
        let marker = format!("id=\"{id}\">");
        let start = dom.find(&marker).unwrap_or_else(|| panic!("#{id} in the DOM:\n{dom}")) + marker.len();
        dom[start..start + dom[start..].find('<').unwrap()].to_string()
    };
    assert_eq!(text_of("backlog-files"), "0");
    assert_eq!(text_of("files-loaded"), "2");
    assert_eq!(text_of("rows-loaded"), "37");
    assert_eq!(text_of("files-failed"), "1");
    assert_eq!(text_of("oldest-age"), "none");
    assert!(dom.contains("<title>s3-sql-loader · page-test</title>"));
    assert!(dom.contains("class=\"failure\""), "the failure is listed");
    assert!(
        dom.contains("&lt;script&gt;alert(1)&lt;/script&gt;.csv"),
        "the hostile key is shown as text"
    );
    assert!(!dom.contains("<script>"), "no script from a key made it into the page");
    assert!(dom.contains("<svg id=\"chart\""), "the chart is there");
    assert!(dom.contains("id=\"backlog-line\""), "the backlog line is drawn");

    let artifacts =
        PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into())).join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium_run(
        &[&format!("--screenshot={}", shot.display()), "--window-size=1100,900"],
        &url,
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real screenshot at {}",
        shot.display()
    );
    eprintln!("screenshot: {}", shot.display());
}
