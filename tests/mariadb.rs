//! The core scenarios against MariaDB: S3 (moto) through the real binary, CSV, JSON lines and
//! zstd; bad files; a commit whose move failed; two loaders at once; a frozen loader's claim
//! taken over.

mod common;

use std::time::Duration;

use common::faults::{Fault, Rule, S3Proxy};
use common::*;

fn env(moto: &Moto, bucket: &str, db: &MyDb, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = moto.env();
    env.extend(kv(&[
        ("LOADER_SOURCE__URL", &format!("s3://{bucket}")),
        ("LOADER_DATABASE__URL", &db.url),
        ("LOADER_SCHEDULE__INTERVAL", "1s"),
    ]));
    env.extend(kv(extra));
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_jsonl_and_zstd_files_load_into_mariadb_and_move() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "maria").await;
    let db = MyDb::create("e2e").await;
    bucket.put("incoming/orders/2026/11/a.csv", orders_csv(1, 100)).await;
    bucket
        .put(
            "incoming/orders/2026/12/b.csv.zst",
            zstd(orders_csv(101, 50).as_bytes()),
        )
        .await;
    bucket.put("incoming/events/x.jsonl", orders_jsonl(1, 20)).await;
    bucket
        .put("incoming/events/y.jsonl.zst", zstd(orders_jsonl(21, 5).as_bytes()))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let loader = Loader::spawn(dir.path(), &env(&moto, "maria", &db, &[]));
    loader.wait_up().await;
    wait_until(Duration::from_secs(60), "4 files loaded", || async {
        let s = loader.status().await;
        s["totals"]["files_loaded"] == 4 && s["backlog"]["files"] == 0
    })
    .await;
    assert!(bucket.keys("incoming/").await.is_empty());
    assert_eq!(bucket.keys("processed/").await.len(), 4);
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 150);
    assert_eq!(db.count("SELECT count(DISTINCT id) FROM orders").await, 150);
    assert_eq!(
        db.count("SELECT CAST(sum(id) AS SIGNED) FROM orders").await,
        (1..=150).sum::<i64>()
    );
    assert_eq!(db.count("SELECT count(*) FROM events").await, 25);
    assert_eq!(db.count("SELECT count(*) FROM events WHERE JSON_VALID(tags)").await, 25);
    assert_eq!(
        db.count("SELECT count(*) FROM s3_sql_loader_files WHERE state = 'loaded' AND attempts = 1")
            .await,
        4
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_files_fail_with_reports_and_leave_no_rows_in_mariadb() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "maria-bad").await;
    let db = MyDb::create("bad").await;
    let dir = tempfile::tempdir().unwrap();
    let env = env(&moto, "maria-bad", &db, &[]);
    bucket.put("incoming/orders/first.csv", orders_csv(1, 10)).await;
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    let mut typed = orders_csv(100, 3);
    typed.push_str("103,x,not-a-number,true,2026-11-01\n");
    bucket.put("incoming/orders/typed.csv", typed).await;
    bucket
        .put("incoming/orders/ragged.csv", "id,customer\n1,a,extra\n")
        .await;
    bucket
        .put("incoming/events/bad.jsonl", "{\"id\": 1}\n{\"id\": \n")
        .await;
    bucket.put("incoming/orders/good.csv", orders_csv(200, 5)).await;
    let (status, stdout, _) = run(dir.path(), &["once"], &env);
    assert_eq!(status.code(), Some(1));
    assert!(
        stdout.contains("loaded 1 (5 rows)") && stdout.contains("failed 3"),
        "{stdout}"
    );
    let typed: serde_json::Value =
        serde_json::from_slice(&bucket.get("failed/orders/typed.csv.error.json").await).unwrap();
    assert_eq!(
        (typed["error"]["kind"].as_str(), typed["error"]["line"].as_u64()),
        (Some("type"), Some(5))
    );
    assert_eq!(typed["error"]["column"], "amount");
    let jsonl: serde_json::Value =
        serde_json::from_slice(&bucket.get("failed/events/bad.jsonl.error.json").await).unwrap();
    assert_eq!(
        (jsonl["error"]["kind"].as_str(), jsonl["error"]["line"].as_u64()),
        (Some("decode"), Some(2))
    );
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 15);
    assert_eq!(
        db.count("SELECT count(*) FROM orders WHERE id >= 100 AND id < 200")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mariadb_commit_whose_move_failed_is_moved_later_without_duplicates() {
    let db = MyDb::create("crash_move").await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_old(&d.join("data/incoming/orders/a.csv"), orders_csv(1, 40).as_bytes());
    write_old(
        &d.join("data/processed/orders"),
        b"a file where the move needs a folder",
    );
    let env = kv(&[("LOADER_DATABASE__URL", &db.url)]);
    let (status, stdout, _) = run(d, &["once"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 40);
    std::fs::remove_file(d.join("data/processed/orders")).unwrap();
    let (status, stdout, stderr) = run(d, &["once"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("already loaded 1"), "{stdout}");
    assert_eq!(files_under(&d.join("data/processed")), ["orders/a.csv"]);
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_loaders_on_one_bucket_load_each_file_once_into_mariadb() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "maria-replicas").await;
    let db = MyDb::create("replicas").await;
    for i in 0..200u64 {
        bucket
            .put(&format!("incoming/orders/{i:03}.csv"), orders_csv(i * 10 + 1, 10))
            .await;
    }
    let env = env(
        &moto,
        "maria-replicas",
        &db,
        &[
            ("LOADER_WORKERS__CONCURRENCY", "3"),
            ("LOADER_SCHEDULE__MAX_FILES_PER_TICK", "200"),
        ],
    );
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Loader::spawn(dir_a.path(), &env);
    let mut b = Loader::spawn(dir_b.path(), &env);
    a.wait_up().await;
    b.wait_up().await;
    wait_until(Duration::from_secs(120), "200 files processed", || async {
        bucket.keys("processed/").await.len() == 200 && bucket.keys("incoming/").await.is_empty()
    })
    .await;
    for l in [&a, &b] {
        wait_until(Duration::from_secs(20), "idle", || async {
            l.status().await["in_flight"] == 0
        })
        .await;
    }
    for l in [&mut a, &mut b] {
        l.signal(libc::SIGTERM);
        assert!(l.wait_exit(Duration::from_secs(15)).expect("exits").success());
    }
    let (loaded_a, loaded_b) = (a.log_events("loaded").len(), b.log_events("loaded").len());
    assert_eq!(loaded_a + loaded_b, 200, "every file loaded exactly once");
    assert!(
        loaded_a > 0 && loaded_b > 0,
        "both loaders did work: {loaded_a} + {loaded_b}"
    );
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 2000);
    assert_eq!(db.count("SELECT count(DISTINCT id) FROM orders").await, 2000);
    assert_eq!(
        db.count("SELECT CAST(sum(attempts) AS SIGNED) FROM s3_sql_loader_files")
            .await,
        200
    );
}

/// The crash-loop guard on MariaDB: each attempt is counted and committed before its rows are
/// written (the file's claim is a named lock, so counting never waits on the load's own row
/// locks). A file whose load kills the loader every time ends in failed/ as `crashed_loader`
/// after `retry.max_attempts`, instead of stopping the pipeline; the files behind it load.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_whose_load_kills_the_loader_every_time_ends_in_failed_on_mariadb() {
    let moto = Moto::start();
    let bucket = Bucket::create(&moto, "maria-crash").await;
    let db = MyDb::create("crash").await;
    bucket.put("incoming/orders/big.csv", orders_csv(1, 300_000)).await;
    let dir = tempfile::tempdir().unwrap();
    let env = env(&moto, "maria-crash", &db, &[("LOADER_RETRY__MAX_ATTEMPTS", "2")]);
    // (The ledger exists once the first loader started.)
    let attempts = || async {
        sqlx::query_scalar::<_, i64>("SELECT CAST(COALESCE(MAX(attempts), 0) AS SIGNED) FROM s3_sql_loader_files")
            .fetch_one(&db.pool)
            .await
            .unwrap_or(0)
    };
    for kill in 1..=2 {
        let mut loader = Loader::spawn(dir.path(), &env);
        wait_until(Duration::from_secs(60), "the attempt counted", || async {
            attempts().await == kill
        })
        .await;
        loader.signal(libc::SIGKILL);
        loader.wait_exit(Duration::from_secs(10)).expect("killed");
        assert!(bucket.keys("processed/").await.is_empty(), "killed mid-load");
    }
    bucket.put("incoming/orders/small.csv", orders_csv(1, 3)).await;
    let (status, stdout, stderr) = run(dir.path(), &["once"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&bucket.get("failed/orders/big.csv.error.json").await).unwrap();
    assert_eq!(report["error"]["kind"], "crashed_loader", "{report}");
    assert_eq!(bucket.keys("processed/").await, vec!["processed/orders/small.csv"]);
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 3);
}

/// As on PostgreSQL: a loader frozen mid-load (SIGSTOP: its connections open, its named lock
/// held, its rows uncommitted) keeps the file only until its lease runs out; then another
/// loader ends the frozen loader's connection (which rolls its rows back) and loads the file,
/// once. The frozen loader, woken, commits nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_loaders_claim_expires_and_another_loader_takes_the_file_once_on_mariadb() {
    let moto = Moto::start();
    let proxy = S3Proxy::start(&moto.endpoint).await;
    let bucket = Bucket::create(&moto, "maria-frozen").await;
    let db = MyDb::create("frozen").await;
    bucket.put("incoming/orders/big.csv", orders_csv(1, 20_000)).await;
    proxy.set_rules(vec![Rule {
        method: Some("GET"),
        path_contains: "big.csv".into(),
        fault: Fault::Throttle(100_000),
        rate: 1.0,
    }]);
    let mut env = env(&moto, "maria-frozen", &db, &[("LOADER_CLAIM__LEASE", "2s")]);
    env.retain(|(k, _)| k != "AWS_ENDPOINT_URL");
    env.extend(kv(&[("AWS_ENDPOINT_URL", &proxy.endpoint)]));

    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Loader::spawn(dir_a.path(), &env);
    a.wait_up().await;
    wait_until(Duration::from_secs(30), "a load in flight", || async {
        a.status().await["in_flight"] == 1
    })
    .await;
    wait_until(Duration::from_secs(30), "the load reading the object", || async {
        proxy.throttled_bytes.load(std::sync::atomic::Ordering::Relaxed) > 256 << 10
    })
    .await;
    a.signal(libc::SIGSTOP); // frozen mid-load
    proxy.set_rules(vec![]);
    // Its lease is recorded against the connection that holds the file's lock.
    assert_eq!(
        db.count("SELECT count(*) FROM s3_sql_loader_files_claims c WHERE c.connection_id = IS_USED_LOCK(CONCAT('s3-sql-loader:', LEFT(c.file_id, 48)))")
            .await,
        1
    );

    let b = Loader::spawn(dir_b.path(), &env);
    b.wait_up().await;
    wait_until(
        Duration::from_secs(60),
        "the file loaded by the second loader",
        || async { b.status().await["totals"]["files_loaded"] == 1 },
    )
    .await;
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 20_000);
    assert!(
        !b.log_events("the claim's lease expired: ended the holder's connection; its transaction rolls back")
            .is_empty(),
        "{}",
        b.log()
    );

    a.signal(libc::SIGCONT);
    wait_until(Duration::from_secs(60), "the first loader notices", || async {
        let s = a.status().await;
        s["totals"]["transient_errors"].as_u64().unwrap_or(0)
            + s["totals"]["files_already_loaded"].as_u64().unwrap_or(0)
            >= 1
    })
    .await;
    assert!(a.log_events("loaded").is_empty(), "the frozen loader committed nothing");
    assert_eq!(db.count("SELECT count(*) FROM orders").await, 20_000);
    assert_eq!(db.count("SELECT count(DISTINCT id) FROM orders").await, 20_000);
    assert_eq!(bucket.keys("processed/").await, ["processed/orders/big.csv"]);
    assert_eq!(
        db.count("SELECT count(*) FROM s3_sql_loader_files_claims").await,
        0,
        "the claim is released after the load"
    );
}

/// `validate` reads an existing MariaDB table: a DECIMAL(12,2) column refuses a value it would
/// round, a DOUBLE column a value that is not a number.
#[tokio::test(flavor = "multi_thread")]
async fn validate_checks_values_against_an_existing_mariadb_table() {
    let db = MyDb::create("validate").await;
    sqlx::query("CREATE TABLE amounts (id int, amount decimal(12,2), rate double)")
        .execute(&db.pool)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("ok.csv"), "id,amount,rate\n1,2.50,0.5\n").unwrap();
    std::fs::write(d.join("round.csv"), "id,amount,rate\n1,1.234,0.5\n").unwrap();
    std::fs::write(d.join("nan.csv"), "id,amount,rate\n1,1.23,high\n").unwrap();
    let env = kv(&[("LOADER_DATABASE__URL", db.url.as_str())]);
    let (status, stdout, stderr) = run(d, &["validate", "ok.csv", "--key", "amounts/ok.csv"], &env);
    assert!(status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("table:    exists: id integer, amount numeric, rate float"),
        "{stdout}"
    );
    let (status, stdout, _) = run(d, &["validate", "round.csv", "--key", "amounts/round.csv"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("\"1.234\" has more than 2 digits after the point: the column would round it"),
        "{stdout}"
    );
    let (status, stdout, _) = run(d, &["validate", "nan.csv", "--key", "amounts/nan.csv"], &env);
    assert_eq!(status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("\"high\" is not a valid number (line 2) (column rate)"),
        "{stdout}"
    );
}
