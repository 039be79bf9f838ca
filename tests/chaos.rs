//! The chaos test: 300 files of 1,000 rows (and a few bad files) from an S3-protocol server into
//! PostgreSQL while loaders are killed with SIGKILL and restarted, two or three run at once, the
//! S3 path answers errors, resets and delays, and the database connections are cut. At the end
//! nothing may be lost, duplicated, half-loaded or left behind.
//!
//! Ignored by default (it takes a minute or two); `scripts/test` runs it with `--ignored`.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::faults::{Fault, Rule, S3Proxy, TcpProxy};
use common::*;
use rand::Rng;

const GOOD_FILES: u64 = 300;
const ROWS_PER_FILE: u64 = 1000;
const BAD_FILES: u64 = 5;
/// Ids of bad files' rows start here, so a leaked row is easy to see.
const BAD_IDS: u64 = 10_000_000;

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "long; scripts/test runs it with --ignored"]
async fn kills_faults_and_replicas_lose_nothing_and_duplicate_nothing() {
    chaos("chaos", "1").await;
}

/// The same with group commit: several files to a transaction, each under its own savepoint.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "long; scripts/test runs it with --ignored"]
async fn with_group_commit_kills_faults_and_replicas_lose_nothing_and_duplicate_nothing() {
    chaos("chaosgroups", "8").await;
}

/// One chaos run; `group_files`: `workers.group_files` (1: one file per transaction).
async fn chaos(name: &str, group_files: &str) {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, name).await;
    let db = PgDb::create(name).await;
    for f in 0..GOOD_FILES {
        let csv = orders_csv(f * ROWS_PER_FILE + 1, ROWS_PER_FILE);
        if f % 7 == 0 {
            bucket
                .put(&format!("incoming/orders/{:03}/part.csv.gz", f), gzip(csv.as_bytes()))
                .await;
        } else {
            bucket.put(&format!("incoming/orders/{:03}/part.csv", f), csv).await;
        }
    }
    for b in 0..BAD_FILES {
        // 999 good rows, then one that does not fit: all or nothing must keep all 1000 out.
        let mut csv = orders_csv(BAD_IDS + b * ROWS_PER_FILE + 1, ROWS_PER_FILE - 1);
        csv.push_str(&format!(
            "{},x,not-a-number,true,2026-11-01\n",
            BAD_IDS + b * ROWS_PER_FILE + ROWS_PER_FILE
        ));
        bucket.put(&format!("incoming/orders/bad-{b}.csv"), csv).await;
    }

    let s3 = S3Proxy::start(&moto.endpoint).await;
    s3.set_rules(vec![
        S3Proxy::everything(Fault::Status(503), 0.04),
        S3Proxy::everything(Fault::Status(500), 0.02),
        Rule {
            method: Some("GET"),
            path_contains: "incoming/".into(),
            fault: Fault::Reset,
            rate: 0.03,
        },
        S3Proxy::everything(Fault::Delay(Duration::from_millis(300)), 0.05),
        // Slow downloads keep loads in flight long enough for kills and cuts to land mid-COPY.
        Rule {
            method: Some("GET"),
            path_contains: "incoming/".into(),
            fault: Fault::Throttle(150_000),
            rate: 0.5,
        },
    ]);
    let pg_addr: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let pg = TcpProxy::start(pg_addr).await;
    let mut env = moto.env();
    env.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
    env.extend(kv(&[
        ("AWS_ENDPOINT_URL", &s3.endpoint),
        ("LOADER_SOURCE__URL", &format!("s3://{name}")),
        (
            "LOADER_DATABASE__URL",
            &format!("postgres://postgres@127.0.0.1:{}/{}", pg.port, db.name),
        ),
        ("LOADER_DATABASE__CONNECT_TIMEOUT", "3s"),
        ("LOADER_SCHEDULE__INTERVAL", "500ms"),
        ("LOADER_SCHEDULE__MAX_FILES_PER_TICK", "40"),
        ("LOADER_WORKERS__CONCURRENCY", "3"),
        ("LOADER_RETRY__MAX_ATTEMPTS", "1000"),
        ("LOADER_RETRY__INITIAL_BACKOFF", "200ms"),
        ("LOADER_RETRY__MAX_BACKOFF", "2s"),
        ("LOADER_CLAIM__LEASE", "3s"),
        ("LOADER_WORKERS__FILES_PER_SECOND", "4"),
        ("LOADER_WORKERS__GROUP_FILES", group_files),
    ]));

    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut loaders: Vec<Option<Loader>> = vec![
        Some(Loader::spawn(dirs[0].path(), &env)),
        Some(Loader::spawn(dirs[1].path(), &env)),
        None,
    ];
    let (mut kills, mut kills_mid_load, mut cuts, mut starts) = (0u32, 0u32, 0u32, 2u32);
    let started = Instant::now();
    let mut rng = rand::rng();
    // Chaos: until at least 12 kills, 4 connection cuts and 40 seconds.
    while kills < 12 || cuts < 4 || started.elapsed() < Duration::from_secs(40) {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "chaos phase took too long"
        );
        tokio::time::sleep(Duration::from_millis(rng.random_range(800..2500))).await;
        match rng.random_range(0..10) {
            0..=5 => {
                let running: Vec<usize> = (0..3).filter(|i| loaders[*i].is_some()).collect();
                let victim = running[rng.random_range(0..running.len())];
                let mut loader = loaders[victim].take().unwrap();
                let busy = reqwest::get(loader.url("/status")).await.ok();
                let busy = match busy {
                    Some(r) => r
                        .json::<serde_json::Value>()
                        .await
                        .map(|s| s["in_flight"] != 0)
                        .unwrap_or(false),
                    None => false,
                };
                loader.signal(libc::SIGKILL);
                kills_mid_load += u32::from(busy);
                loader.wait_exit(Duration::from_secs(10)).expect("killed");
                kills += 1;
                // Restart it, or keep one fewer running (never fewer than two).
                if running.len() == 2 || rng.random_bool(0.5) {
                    loaders[victim] = Some(Loader::spawn(dirs[victim].path(), &env));
                    starts += 1;
                }
            }
            6..=7 => {
                pg.cut_all();
                cuts += 1;
            }
            _ => {
                if let Some(slot) = (0..3).find(|i| loaders[*i].is_none()) {
                    loaders[slot] = Some(Loader::spawn(dirs[slot].path(), &env));
                    starts += 1;
                }
            }
        }
    }
    let chaos_for = started.elapsed();
    // Settle: no more kills or cuts (S3 faults stay on) until incoming/ is empty.
    wait_until(Duration::from_secs(300), "incoming/ empty", || async {
        bucket.keys("incoming/").await.is_empty()
    })
    .await;
    for loader in loaders.iter_mut().flatten() {
        wait_until(Duration::from_secs(30), "idle", || async {
            loader.status().await["in_flight"] == 0
        })
        .await;
        loader.signal(libc::SIGTERM);
        assert!(loader.wait_exit(Duration::from_secs(30)).expect("exits").success());
    }

    // A loader killed while it probed the store's copy guard leaves its two small probe
    // objects; the next probe deletes them once they are a minute old. They are not files.
    let (probes, processed): (Vec<String>, Vec<String>) = bucket
        .keys("processed/")
        .await
        .into_iter()
        .partition(|k| k.starts_with("processed/.s3-sql-loader-probe-"));
    assert!(
        probes.iter().all(|k| k.ends_with("-a") || k.ends_with("-b")),
        "{probes:?}"
    );
    let failed: Vec<String> = bucket
        .keys("failed/")
        .await
        .into_iter()
        .filter(|k| !k.ends_with(".error.json"))
        .collect();
    let left = bucket.keys("incoming/").await.len();
    let good_max = (GOOD_FILES * ROWS_PER_FILE) as i64;
    let rows = db.count("SELECT count(*) FROM orders").await;
    let distinct = db.count("SELECT count(DISTINCT id) FROM orders").await;
    let good_distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT id) FROM orders WHERE id <= $1")
        .bind(good_max)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let leaked: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id > $1")
        .bind(good_max)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let expected = good_max;
    // Groups, from every loader's log (each start writes its own).
    let (mut groups, mut grouped_files) = (0i64, 0i64);
    for dir in &dirs {
        for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            for event in text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            {
                if event["message"] == "group loaded in one transaction" && event["committed"].as_i64() > Some(0) {
                    groups += 1;
                    grouped_files += event["committed"].as_i64().unwrap_or(0);
                }
            }
        }
    }
    let table = [
        ("chaos phase (s)", chaos_for.as_secs() as i64),
        ("loader starts", starts as i64),
        ("SIGKILLs", kills as i64),
        ("SIGKILLs with loads in flight", kills_mid_load as i64),
        ("database connection cuts", cuts as i64),
        (
            "S3 requests through the proxy",
            s3.requests.load(std::sync::atomic::Ordering::Relaxed) as i64,
        ),
        (
            "S3 faults injected",
            s3.faults.load(std::sync::atomic::Ordering::Relaxed) as i64,
        ),
        ("groups committed", groups),
        ("files committed in groups", grouped_files),
        ("files in", (GOOD_FILES + BAD_FILES) as i64),
        ("files processed", processed.len() as i64),
        ("copy probe objects left by kills", probes.len() as i64),
        ("files failed", failed.len() as i64),
        ("files left in incoming/", left as i64),
        ("rows expected", expected),
        ("rows in the table", rows),
        ("duplicate rows", rows - distinct),
        ("lost rows", expected - good_distinct),
        ("rows of bad files in the table", leaked),
    ];
    println!("\nchaos test results (workers.group_files = {group_files})");
    for (what, n) in table {
        println!("  {what:<32} {n:>10}");
    }
    assert_eq!(processed.len() as u64, GOOD_FILES, "{processed:?}");
    assert_eq!(failed.len() as u64, BAD_FILES, "{failed:?}");
    assert_eq!(left, 0);
    assert_eq!(rows - distinct, 0, "duplicate rows");
    assert_eq!(expected - good_distinct, 0, "lost rows");
    assert_eq!(leaked, 0, "rows of bad files");
    assert_eq!(rows, expected);
    assert!(kills >= 10);
    if group_files != "1" {
        assert!(groups >= 5, "too few groups committed: {groups}");
    }
    assert!(kills_mid_load >= 5, "too few kills landed mid-load: {kills_mid_load}");
    for b in 0..BAD_FILES {
        let report: serde_json::Value =
            serde_json::from_slice(&bucket.get(&format!("failed/orders/bad-{b}.csv.error.json")).await).unwrap();
        assert_eq!(report["error"]["kind"], "type", "{report}");
    }
}
