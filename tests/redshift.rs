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
    // One attempt each: the good files must load in the tick the bad one failed, not by retries.
    let mut env = env(moto.env(), &moto.endpoint, "warehouse", &db);
    env.extend(kv(&[("LOADER_RETRY__MAX_ATTEMPTS", "1")]));
    let loader = Loader::spawn(dir.path(), &env);
    loader.wait_up().await;
    wait_until(Duration::from_secs(60), "2 loaded, 1 failed", || async {
        let s = loader.status().await;
        s["totals"]["files_loaded"] == 2 && s["totals"]["files_failed"] == 1
    })
    .await;
    // The bad file was named by the COPY's own session's rows in stl_load_errors (which the
    // emulation writes as Redshift does, under the COPY's backend pid), read on that connection.
    assert_eq!(
        db.count("SELECT count(DISTINCT session)::bigint FROM stl_load_errors WHERE filename LIKE '%/c-bad.csv%'")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM s3_sql_loader_files WHERE state = 'loaded' AND attempts = 1")
            .await,
        2
    );
    assert!(bucket.keys("incoming/").await.is_empty());
    assert_eq!(
        bucket.keys("processed/").await,
        ["processed/orders/a.csv", "processed/orders/b.csv"]
    );
    let report: serde_json::Value =
        serde_json::from_slice(&bucket.get("failed/orders/c-bad.csv.error.json").await).unwrap();
    assert_eq!(report["error"]["kind"], "database", "{report}");
    assert_eq!(report["error"]["line"], 5, "{report}");
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Redshift rejected the file: "),
        "{report}"
    );
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

/// A permanent problem of one file (its header, its columns against the table) fails that file
/// alone, even when it comes first in its batch; the batch's other files load in the same tick.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_with_a_permanent_problem_fails_alone_even_first_in_its_batch() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "warehouse-first").await;
    let db = PgDb::create("redshift_first").await;
    sqlx::query("CREATE TABLE orders (id bigint, customer varchar(65535), amount varchar(65535), paid boolean, created_on date)")
        .execute(&db.pool)
        .await
        .unwrap();
    bucket.put("incoming/orders/a-dup.csv", "id,id\n1,2\n").await;
    let mut extra = String::from("id,customer,amount,paid,created_on,extra\n");
    extra.push_str("9,x,1.00,true,2026-11-01,e\n");
    bucket.put("incoming/orders/b-extra.csv", extra).await;
    bucket.put("incoming/orders/c.csv", orders_csv(1, 10)).await;
    bucket.put("incoming/orders/d.csv", orders_csv(11, 5)).await;
    let mut env = env(moto.env(), &moto.endpoint, "warehouse-first", &db);
    env.extend(kv(&[("LOADER_RETRY__MAX_ATTEMPTS", "1")]));
    let dir = tempfile::tempdir().unwrap();
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert_eq!(status.code(), Some(1), "two files failed\n{stdout}{stderr}");
    assert_eq!(
        bucket.keys("processed/").await,
        ["processed/orders/c.csv", "processed/orders/d.csv"],
        "{stdout}{stderr}"
    );
    let report = |key: &'static str| {
        let bucket = &bucket;
        async move { serde_json::from_slice::<serde_json::Value>(&bucket.get(key).await).unwrap() }
    };
    let dup = report("failed/orders/a-dup.csv.error.json").await;
    assert_eq!(dup["error"]["kind"], "schema", "{dup}");
    assert!(
        dup["error"]["message"].as_str().unwrap().contains("appears twice"),
        "{dup}"
    );
    let extra = report("failed/orders/b-extra.csv.error.json").await;
    assert_eq!(extra["error"]["kind"], "schema", "{extra}");
    assert_eq!(extra["error"]["column"], "extra", "{extra}");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 15);
    // The ledger commands read Redshift's ledger too.
    let (status, stdout, stderr) = run(dir.path(), &["ledger", "show", "orders/b-extra.csv", "--json"], &env);
    assert!(status.success(), "{stderr}");
    let shown: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["versions"][0]["state"], "failed", "{shown}");
    assert_eq!(shown["versions"][0]["error"]["column"], "extra", "{shown}");
    assert_eq!(shown["stored"][0]["area"], "failed/", "{shown}");
    assert_eq!(
        db.count("SELECT count(*) FROM s3_sql_loader_files WHERE state = 'loaded' AND attempts = 1")
            .await,
        2
    );
}

/// Redshift maps CSV fields to the COPY's columns by position (as the emulation does): files
/// whose headers order the columns differently never share a COPY, so each value lands in its
/// own column.
#[tokio::test(flavor = "multi_thread")]
async fn csv_files_with_columns_in_another_order_load_each_value_into_its_column() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "warehouse-order").await;
    let db = PgDb::create("redshift_order").await;
    bucket.put("incoming/pairs/a.csv", "a,b\n1,2\n").await;
    bucket.put("incoming/pairs/b.csv", "b,a\n3,4\n").await;
    let dir = tempfile::tempdir().unwrap();
    let env = env(moto.env(), &moto.endpoint, "warehouse-order", &db);
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert_eq!(status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(db.count("SELECT count(*) FROM pairs").await, 2);
    assert_eq!(db.count("SELECT count(*) FROM pairs WHERE a = 1 AND b = 2").await, 1);
    assert_eq!(db.count("SELECT count(*) FROM pairs WHERE a = 4 AND b = 3").await, 1);
    // One COPY (one manifest) per header.
    assert_eq!(bucket.keys("manifests/pairs/").await.len(), 2);
}

/// JSON: each group of files with the same keys is loaded with a JSONPaths file naming the keys
/// as written, so `Amount` fills column `amount` in whatever order the keys come; a key the
/// table lacks fails its file with a report instead of being dropped.
#[tokio::test(flavor = "multi_thread")]
async fn json_keys_map_to_their_columns_in_any_case_and_order_and_a_new_key_fails_its_file() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "warehouse-json").await;
    let db = PgDb::create("redshift_json").await;
    bucket
        .put(
            "incoming/events/x.jsonl",
            "{\"id\": 1, \"Amount\": \"5.00\"}\n{\"id\": 2, \"Amount\": \"0.10\"}\n",
        )
        .await;
    bucket
        .put("incoming/events/y.jsonl", "{\"Amount\": \"6.10\", \"id\": 3}\n")
        .await;
    bucket
        .put(
            "incoming/events/z.jsonl",
            "{\"id\": 4, \"Amount\": \"7\", \"note\": \"new\"}\n",
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let env = env(moto.env(), &moto.endpoint, "warehouse-json", &db);
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert_eq!(status.code(), Some(1), "z failed\n{stdout}{stderr}");
    let rows: Vec<(i64, Option<String>)> = sqlx::query_as("SELECT id, amount FROM events ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        rows,
        [
            (1, Some("5.00".to_string())),
            (2, Some("0.10".to_string())),
            (3, Some("6.10".to_string()))
        ]
    );
    let report: serde_json::Value =
        serde_json::from_slice(&bucket.get("failed/events/z.jsonl.error.json").await).unwrap();
    assert_eq!(report["error"]["kind"], "schema", "{report}");
    assert_eq!(report["error"]["column"], "note", "{report}");
    // The JSONPaths files beside the manifests name the keys as the files wrote them.
    let mut paths = Vec::new();
    for key in bucket.keys("manifests/events/").await {
        if key.ends_with(".jsonpaths") {
            let v: serde_json::Value = serde_json::from_slice(&bucket.get(&key).await).unwrap();
            paths.push(v["jsonpaths"].clone());
        }
    }
    paths.sort_by_key(|p| p.to_string());
    // (z failed before any COPY: no paths file of its own.)
    assert_eq!(
        paths,
        [
            serde_json::json!(["$['Amount']", "$['id']"]),
            serde_json::json!(["$['id']", "$['Amount']"]),
        ]
    );
}

/// Redshift's COPY reads whatever a key holds when it runs. A file overwritten after it was
/// listed, while its batch loads, must not be recorded as loaded under the listed version: the
/// batch is rolled back and the new version loads, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_overwritten_while_its_batch_loads_is_loaded_once_as_its_new_version() {
    let moto = Moto::start();
    let proxy = S3Proxy::start(&moto.endpoint).await;
    let bucket = Bucket::create(&moto, "warehouse-overwrite").await;
    let db = PgDb::create("redshift_overwrite").await;
    bucket.put("incoming/orders/a.csv", orders_csv(1, 20_000)).await;
    bucket.put("incoming/orders/b.csv", orders_csv(100_001, 3)).await;
    // The COPY reads a.csv slowly, then b.csv.
    proxy.set_rules(vec![Rule {
        method: Some("GET"),
        path_contains: "incoming/orders/a.csv".into(),
        fault: Fault::Throttle(300_000),
        rate: 1.0,
    }]);
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::spawn(
        dir.path(),
        &env(moto.env(), &proxy.endpoint, "warehouse-overwrite", &db),
    );
    loader.wait_up().await;
    wait_until(Duration::from_secs(60), "the batch's COPY started", || async {
        !bucket.keys("manifests/orders/").await.is_empty()
    })
    .await;
    bucket.put("incoming/orders/b.csv", orders_csv(200_001, 5)).await;
    proxy.set_rules(vec![]);
    wait_until(Duration::from_secs(90), "both moved", || async {
        bucket.keys("incoming/").await.is_empty()
    })
    .await;
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 20_005);
    assert_eq!(
        db.count("SELECT count(*) FROM orders WHERE id > 100000 AND id < 200000")
            .await,
        0
    );
    assert_eq!(db.count("SELECT count(DISTINCT id) FROM orders").await, 20_005);
    assert_eq!(
        db.count("SELECT count(*) FROM s3_sql_loader_files WHERE object_key = 'orders/b.csv' AND state = 'loaded' AND row_count = 5")
            .await,
        1
    );
    assert_eq!(
        db.count("SELECT count(*) FROM s3_sql_loader_files WHERE object_key = 'orders/b.csv' AND state = 'loaded'")
            .await,
        1
    );
    assert!(
        loader.log().contains("orders/b.csv changed while its batch loaded"),
        "{}",
        loader.log()
    );
}
