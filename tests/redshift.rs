//! The Redshift flow (manifest, one transaction per batch, COPY by manifest, ledger rows, then
//! the moves) against PostgreSQL, with `redshift.copy = "postgres-emulation"` standing in for
//! COPY from S3 (which only Redshift has). The COPY statements themselves are checked by unit
//! tests in `src/sink/redshift/copy.rs`. No Redshift cluster is involved anywhere.

mod common;

use std::time::Duration;

use common::faults::{Fault, Rule, S3Proxy};
use common::*;

fn env(moto_env: Vec<(String, String)>, endpoint: &str, bucket: &str, db: &PgDb) -> Vec<(String, String)> {
    let mut env = moto_env;
    env.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
    env.extend(kv(&[
        ("AWS_ENDPOINT_URL", endpoint),
        ("LOADER_SOURCE__URL", &format!("s3://{bucket}")),
        (
            "LOADER_DATABASE__URL",
            &db.url.replacen("postgres://", "redshift://", 1),
        ),
        ("LOADER_REDSHIFT__IAM_ROLE", "arn:aws:iam::123456789012:role/loader"),
        ("LOADER_REDSHIFT__COPY", "postgres-emulation"),
        ("LOADER_SCHEDULE__INTERVAL", "1s"),
        ("LOADER_RETRY__INITIAL_BACKOFF", "200ms"),
    ]));
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_loads_by_manifest_in_one_transaction_and_a_bad_file_fails_alone() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "warehouse").await;
    let db = PgDb::create("redshift").await;
    bucket.put("incoming/orders/a.csv", orders_csv(1, 30)).await;
    bucket.put("incoming/orders/b.csv", orders_csv(31, 20)).await;
    let mut bad = orders_csv(100, 3);
    bad.push_str("103,x,1.5,maybe,2026-11-01\n");
    bucket.put("incoming/orders/c-bad.csv", bad).await;
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::spawn(dir.path(), &env(moto.env(), &moto.endpoint, "warehouse", &db));
    loader.wait_up().await;
    wait_until(Duration::from_secs(60), "2 loaded, 1 failed", || async {
        let s = loader.status().await;
        s["totals"]["files_loaded"] == 2 && s["totals"]["files_failed"] == 1
    })
    .await;
    assert!(bucket.keys("incoming/").await.is_empty());
    assert_eq!(
        bucket.keys("processed/").await,
        ["processed/orders/a.csv", "processed/orders/b.csv"]
    );
    let report: serde_json::Value =
        serde_json::from_slice(&bucket.get("failed/orders/c-bad.csv.error.json").await).unwrap();
    assert_eq!(report["error"]["kind"], "type", "{report}");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 50);
    assert_eq!(db.count("SELECT count(*) FROM orders WHERE id >= 100").await, 0);
    assert_eq!(
        db.count("SELECT sum(row_count)::bigint FROM s3_sql_loader_files WHERE state = 'loaded'")
            .await,
        50
    );

    // The manifests name the files of each COPY, mandatory, with their sizes.
    let manifests = bucket.keys("manifests/orders/").await;
    assert!(!manifests.is_empty());
    let mut listed = Vec::new();
    for key in &manifests {
        let m: serde_json::Value = serde_json::from_slice(&bucket.get(key).await).unwrap();
        for e in m["entries"].as_array().unwrap() {
            assert_eq!(e["mandatory"], true);
            assert!(e["meta"]["content_length"].as_u64().unwrap() > 0);
            listed.push(e["url"].as_str().unwrap().to_string());
        }
    }
    assert!(
        listed.contains(&"s3://warehouse/incoming/orders/a.csv".to_string()),
        "{listed:?}"
    );
    assert!(
        listed.contains(&"s3://warehouse/incoming/orders/b.csv".to_string()),
        "{listed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn files_move_only_after_the_commit_and_a_failed_move_never_reloads() {
    let moto = Moto::start();
    let proxy = S3Proxy::start(&moto.endpoint).await;
    let bucket = Bucket::create(&moto, "warehouse-move").await;
    let db = PgDb::create("redshift_move").await;
    bucket.put("incoming/orders/a.csv", orders_csv(1, 10)).await;
    bucket
        .put("incoming/orders/b.csv.gz", {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut gz, orders_csv(11, 10).as_bytes()).unwrap();
            gz.finish().unwrap()
        })
        .await;
    // Every copy to processed/ fails: the batch commits, the moves do not happen.
    proxy.set_rules(vec![Rule {
        method: Some("PUT"),
        path_contains: "/processed/".into(),
        fault: Fault::Status(500),
        rate: 1.0,
    }]);
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::spawn(dir.path(), &env(moto.env(), &proxy.endpoint, "warehouse-move", &db));
    loader.wait_up().await;
    wait_until(Duration::from_secs(60), "both committed", || async {
        db.count("SELECT count(*) FROM pg_tables WHERE tablename = 'orders'")
            .await
            == 1
            && db
                .count("SELECT count(*) FROM s3_sql_loader_files WHERE state = 'loaded'")
                .await
                == 2
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 20);
    assert_eq!(
        bucket.keys("incoming/").await.len(),
        2,
        "not moved while the copy to processed/ fails"
    );
    loader.wait_ticks(2).await; // more ticks: found loaded, never reloaded
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 20);

    proxy.set_rules(vec![]);
    wait_until(Duration::from_secs(60), "moved", || async {
        bucket.keys("incoming/").await.is_empty()
    })
    .await;
    assert_eq!(
        bucket.keys("processed/").await,
        ["processed/orders/a.csv", "processed/orders/b.csv.gz"]
    );
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 20);
    assert_eq!(db.count("SELECT count(DISTINCT id) FROM orders").await, 20);
}

/// The crash-loop guard on Redshift too: the batch's attempts are committed before its COPY,
/// so a loader killed during the COPY every time ends the file in failed/ as `crashed_loader`
/// after `retry.max_attempts`, instead of retrying it forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_whose_copy_kills_the_loader_every_time_ends_in_failed() {
    let moto = Moto::start();
    let proxy = S3Proxy::start(&moto.endpoint).await;
    let bucket = Bucket::create(&moto, "warehouse-crash").await;
    let db = PgDb::create("redshift_crash").await;
    bucket.put("incoming/orders/big.csv", orders_csv(1, 20_000)).await;
    // The COPY reads the file slowly: the loader is killed while it runs.
    proxy.set_rules(vec![Rule {
        method: Some("GET"),
        path_contains: "big.csv".into(),
        fault: Fault::Throttle(200_000),
        rate: 1.0,
    }]);
    let dir = tempfile::tempdir().unwrap();
    let mut env = env(moto.env(), &proxy.endpoint, "warehouse-crash", &db);
    env.extend(kv(&[("LOADER_RETRY__MAX_ATTEMPTS", "2")]));
    let attempts = || async {
        sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(attempts), 0)::bigint FROM s3_sql_loader_files")
            .fetch_one(&db.pool)
            .await
            .unwrap_or(0)
    };
    for kill in 1..=2 {
        let mut loader = Loader::spawn(dir.path(), &env);
        // The batch's manifest is written after its attempts are committed and before its
        // COPY. (The ledger itself cannot be watched: the COPY's transaction holds LOCK on it.)
        wait_until(Duration::from_secs(60), "the batch's manifest", || async {
            bucket.keys("manifests/").await.len() == kill as usize
        })
        .await;
        loader.signal(libc::SIGKILL);
        loader.wait_exit(Duration::from_secs(10)).expect("killed");
        wait_until(
            Duration::from_secs(30),
            "the attempt counted, the COPY rolled back",
            || async { attempts().await == kill },
        )
        .await;
        assert!(bucket.keys("processed/").await.is_empty(), "killed mid-COPY");
    }
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&bucket.get("failed/orders/big.csv.error.json").await).unwrap();
    assert_eq!(report["error"]["kind"], "crashed_loader", "{report}");
    assert_eq!(
        db.count("SELECT count(*) FROM s3_sql_loader_files WHERE state = 'failed'")
            .await,
        1
    );
}

/// A batch whose file cannot be read (every GET answers 500) still counts its attempts, which
/// are committed before anything is read, so the file ends in failed/ as `retries_exhausted`
/// with every attempt's error, instead of being retried forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_whose_file_cannot_be_read_ends_in_failed_after_max_attempts() {
    let moto = Moto::start();
    let proxy = S3Proxy::start(&moto.endpoint).await;
    let bucket = Bucket::create(&moto, "warehouse-poison").await;
    let db = PgDb::create("redshift_poison").await;
    bucket.put("incoming/orders/poison.csv", orders_csv(1, 10)).await;
    proxy.set_rules(vec![Rule {
        method: Some("GET"),
        path_contains: "incoming/orders/poison.csv".into(),
        fault: Fault::Status(500),
        rate: 1.0,
    }]);
    let mut env = env(moto.env(), &proxy.endpoint, "warehouse-poison", &db);
    env.extend(kv(&[("LOADER_RETRY__MAX_ATTEMPTS", "3")]));
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::spawn(dir.path(), &env);
    loader.wait_up().await;
    wait_until(Duration::from_secs(120), "the file failed", || async {
        loader.status().await["totals"]["files_failed"] == 1
    })
    .await;
    let report: serde_json::Value =
        serde_json::from_slice(&bucket.get("failed/orders/poison.csv.error.json").await).unwrap();
    assert_eq!(report["error"]["kind"], "retries_exhausted", "{report}");
    let history = report["error"]["history"].as_array().unwrap();
    assert_eq!(history.len(), 3, "{report}");
    assert!(history.iter().all(|a| a["stage"] == "get"), "{report}");
}
